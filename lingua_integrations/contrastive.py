"""Question-aware token importance (LongLLMLingua's contrastive perplexity).

``s_i = ppl(x_i | x_<i) - ppl(x_i | question, x_<i)``: a token matters when knowing the
question makes it *more* predictable. Both terms are surprisals of the same token, one
from the plain context stream and one from the stream conditioned on the question.
"""

from __future__ import annotations

import torch


def contrastive_scores(unconditioned: torch.Tensor, conditioned: torch.Tensor) -> torch.Tensor:
    """Element-wise ``unconditioned - conditioned`` surprisal; NaN where either is unknown."""
    if unconditioned.shape != conditioned.shape:
        raise ValueError(f"score streams differ in length: {unconditioned.shape} vs {conditioned.shape}")
    return unconditioned - conditioned
