"""Quality harness entry point: ``python benchmarks/quality.py [options]``.

Same as ``python -m lingua_integrations.evaluation.quality``; see that module (and
docs/quality.md) for the cases, metrics and methods. Needs ``tools/reference/setup.sh``
for the reference columns (or pass ``--no-reference``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_integrations.evaluation.quality import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
