"""Real-data cases and metrics for tests, benchmarks and the quality harness."""

from .nq import NQCase, build_cases, contains_answer, load_rows, normalize_answer

__all__ = ["NQCase", "build_cases", "contains_answer", "load_rows", "normalize_answer"]
