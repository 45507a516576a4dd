"""Fold ADePT's token-wise FFN offset into the embedding table, so inference costs exactly what PT costs.

ADePT's offset depends only on the token id (X' = X + ReLU(X @ A + a) @ B + b with X = E[id]), so it can be
applied once to every row of the table: with E' = E + ReLU(E @ A + a) @ B + b, plain prompt tuning on E'
(``[prompt ; E'[ids]]``) gives ADePT's inference output (dropout is off at inference).
"""

from __future__ import annotations

import torch

from . import _validate as check


def fold_adept_offsets(weight, down_weight, down_bias, up_weight, up_bias, *, chunk_rows=2048):
    """Return the folded table ``E' = E + ReLU(E @ A + a) @ B + b`` as a new tensor.

    The table is processed ``chunk_rows`` rows at a time, so beyond the result the peak extra memory is
    about ``chunk_rows * (2 d + r)`` float64 values (~140 MB for d = 4096 at the default), whatever the
    vocabulary size. The offset is computed in float64 and each row rounded once to the table's dtype:
    each element is within one rounding of the exact E', and the result does not depend on the
    chunking in practice (BLAS may sum in a different order for a different number of rows, which moves
    float64 results by ~1e-16 relative, far below the rounding to fp32/fp16/bf16; a float64 table itself
    can differ in its last bit between chunkings). The inputs are not modified and the result does not
    require grad (folding is for inference).

    Args:
        weight: ``[V, d]`` embedding table E.
        down_weight: ``[d, r]`` A; down_bias: ``[r]`` a; up_weight: ``[r, d]`` B; up_bias: ``[d]`` b.
        chunk_rows: rows of E processed at once (>= 1).

    Returns:
        ``[V, d]`` tensor with ``weight``'s dtype and device.
    """
    check.named("weight", weight, [("V", None), ("d", None)])
    check.floating("weight", weight)
    check.adept_ffn(weight, down_weight, down_bias, up_weight, up_bias)
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")

    with torch.no_grad():
        A, a, B, b = (p.detach().double() for p in (down_weight, down_bias, up_weight, up_bias))
        folded = torch.empty_like(weight, memory_format=torch.contiguous_format).detach()
        for start in range(0, weight.shape[0], chunk_rows):
            x = weight[start:start + chunk_rows].detach().double()
            offset = torch.relu(torch.addmm(a, x, A))
            folded[start:start + chunk_rows] = torch.addmm(b, offset, B).add_(x)
    return folded
