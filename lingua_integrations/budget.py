"""The budget controller: who gets how many tokens.

LLMLingua's controller keeps the instruction and the question (their own rates default
to 1.0) and spends the rest of the budget on the contexts in two steps: a *coarse* step
keeps whole contexts in rank order until the context budget plus a slack is used, and a
*fine* step hands the leftover rate to token-level compression. LongLLMLingua adds a
*dynamic compression ratio*: better-ranked documents get a gentler rate, spread
linearly over the ranks by ``delta``.

The fine step works on windows of ``window`` small-LM tokens (ITPC); a *plan* says,
for each window, which runs of tokens get which rate: ``[[(length, rate), ...], ...]``.
"""

from __future__ import annotations

import re
from typing import Sequence

_SLACK = re.compile(r"^\s*([+\-*/])\s*([0-9]*\.?[0-9]+)\s*$")


def apply_slack(target: float, context_budget: str) -> float:
    """Apply a slack like ``"+100"`` or ``"*1.5"`` to a token target (no ``eval``)."""
    m = _SLACK.match(str(context_budget))
    if not m:
        raise ValueError(f"context_budget {context_budget!r} must look like '+100', '-50', '*1.5' or '/2'")
    op, value = m.group(1), float(m.group(2))
    if op == "+":
        return target + value
    if op == "-":
        return target - value
    if op == "*":
        return target * value
    if value == 0:
        raise ValueError("context_budget cannot divide by zero")
    return target / value


def select_contexts(
    ranked: Sequence[int],
    lengths: Sequence[int],
    budget: float,
    force_ids: Sequence[int] | None = None,
    force_number: int | None = None,
) -> list[int]:
    """Coarse selection: take contexts in rank order until the budget goes negative.

    The context that crosses the budget is kept (token-level compression trims it).
    ``force_ids`` are always kept and come first; ``force_number`` caps how many are
    added by rank. Returns indices in the order they were taken (rank order).
    """
    used = list(force_ids or [])
    added = 0
    for idx in ranked:
        if force_number is not None and added >= force_number:
            break
        budget -= lengths[idx]
        if idx not in used:
            used.append(idx)
            added += 1
        if budget < 0:
            break
    return used


def reorder(used: Sequence[int], how: str) -> list[int]:
    """``"original"``: caller's order; ``"sort"``: rank order (most relevant first);
    ``"two_stage"``: best at both ends, to fight lost-in-the-middle."""
    if how == "original":
        return sorted(used)
    if how == "sort":
        return list(used)
    if how == "two_stage":
        return [u for i, u in enumerate(used) if i % 2 == 0] + [u for i, u in enumerate(used) if i % 2 == 1][::-1]
    raise ValueError(f"reorder_context {how!r} must be 'original', 'sort' or 'two_stage'")


def dynamic_ratios(n: int, delta: float) -> list[float]:
    """Rate offsets for ``n`` documents in rank order: ``+delta`` for the best, ``-delta``
    for the worst, linear in between (LongLLMLingua's dynamic compression ratio)."""
    if n <= 1 or delta <= 0:
        return [0.0] * n
    step = abs(delta) / (n - 1)
    return [i * step for i in range(-(n - 1), n, 2)][::-1]


def clamp_rate(base: float, delta: float = 0.0) -> float:
    return max(0.0, min(1.0, base + delta))


def reference_plan(lengths: Sequence[int], tau: float, deltas: Sequence[float], window: int) -> list[list[tuple[int, float]]]:
    """The reference's window plan, from *estimated* lengths (each context's tokens + 2
    for its separator, plus one leading token). Kept for the drop-in API's fidelity."""
    plan: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    filled = 1
    for length, delta in zip(lengths, deltas):
        rate = clamp_rate(tau, delta)
        if filled + length >= window:
            current.append((window - filled, rate))
            plan.append(current)
            filled = filled + length - window
            if filled > window:
                k = filled // window
                plan.extend([[(window, rate)] for _ in range(k)])
                filled -= k * window
            current = [(filled, rate)] if filled else []
        else:
            filled += length
            current.append((length, rate))
    if current:
        plan.append(current)
    return plan


def exact_plan(token_rates: Sequence[float], window: int) -> list[list[tuple[int, float]]]:
    """Window plan from one rate per token: windows of ``window`` tokens, split into runs
    of equal rate. Used by the default mode, where token positions are known exactly."""
    plan = []
    for w in range(0, len(token_rates), window):
        runs: list[tuple[int, float]] = []
        for rate in token_rates[w : w + window]:
            if runs and runs[-1][1] == rate:
                runs[-1] = (runs[-1][0] + 1, rate)
            else:
                runs.append((1, rate))
        plan.append(runs)
    return plan
