"""The naive twin of ``fastprefix.kernels.prefix_merge``'s forward kernel: merge the gated prefix into the
real keys' attention by log-sum-exp, written out in full (any device; exact in float64).

For query t of head h (GQA group of kv head ``h // (H / Hkv)``):

    z[t, j] = g[t, j] * scale * (q_t . Pk_j)
    lse[t]  = log(sum_j exp z[t, j] + exp lse_k[t])
    out_t   = sum_j exp(z[t, j] - lse[t]) g[t, j] Pv_j + exp(lse_k[t] - lse[t]) o_k[t]

where ``o_k`` and ``lse_k`` are the real keys' own softmax output and natural log-sum-exp.
"""

from __future__ import annotations

import torch


def prefix_merge(q, prefix_k, prefix_v, gate, o_k, lse_k, scale):
    """Merged output and log-sum-exp.

    Args:
        q: ``[B, H, Sq, D]``; prefix_k, prefix_v: ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``;
        gate: None or broadcastable to ``[B, Sq, L]``; o_k: ``[B, H, Sq, D]``; lse_k: ``[B, H, Sq]``
        (natural log; -inf for a query that sees no real key); scale: the softmax scale.

    Returns:
        out ``[B, H, Sq, D]`` and lse ``[B, H, Sq]`` (natural log), in q's dtype.
    """
    H, Hkv = q.shape[1], prefix_k.shape[-3]
    pk = prefix_k.repeat_interleave(H // Hkv, dim=-3)
    pv = prefix_v.repeat_interleave(H // Hkv, dim=-3)
    g = torch.ones((), dtype=q.dtype, device=q.device) if gate is None else gate
    g = g.reshape((1,) * (3 - g.dim()) + tuple(g.shape)).unsqueeze(1)  # [B|1, 1, Sq|1, L|1]
    z = g * scale * (q @ pk.transpose(-1, -2))  # [B, H, Sq, L]
    lse = torch.logsumexp(torch.cat([z, lse_k.unsqueeze(-1)], dim=-1), dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    w = torch.exp(lse_k - lse).unsqueeze(-1)
    return (p * g) @ pv + w * o_k, lse
