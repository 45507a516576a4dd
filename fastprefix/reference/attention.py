"""Reference gated-prefix attention (P-Tuning v2 and APT) in plain PyTorch.

This is the numerical contract of ``fastprefix.kernels.gated_prefix_attention`` and the path used on
CPU. It builds the scores of the prefix and of the real keys separately and softmaxes them together,
which is exactly softmax over ``[g * Pk ; K]`` followed by a weighted sum over ``[g * Pv ; V]``:

    logit[t, j] = scale * g[t, j] * (q_t . Pk_j)        (prefix token j, always visible)
    logit[t, u] = scale * (q_t . k_u)  or -inf          (real key u, hidden by padding / causality)
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u

A zero gate gives a logit of 0 (not -inf): the prefix token still takes softmax mass and adds no value.
Inputs are assumed validated (``fastprefix.ops`` does that once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def apt_gate(hidden, weight, bias, layer_scale, *, mode="token", key_padding_mask=None):
    """APT gate ``layer_scale * sigmoid(h @ W + b)``.

    Args:
        hidden: ``[B, S, d]`` hidden states entering the layer.
        weight: ``[d, L]``; bias: ``[L]``; layer_scale: 0-dim (stored raw, not squashed).
        mode: ``"token"`` (one gate row per query token) or ``"pooled"`` (from the mean of the real
            tokens' hidden states).
        key_padding_mask: ``[B, S]`` bool, True = real token; only used by ``"pooled"``.

    Returns:
        ``[B, S, L]`` for ``"token"``, ``[B, 1, L]`` for ``"pooled"``.
    """
    if mode == "pooled":
        if key_padding_mask is None:
            hidden = hidden.mean(dim=1, keepdim=True)
        else:
            keep = key_padding_mask.to(hidden.dtype).unsqueeze(-1)
            # clamp: an all-padding row pools to 0 rather than NaN
            hidden = (hidden * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    elif mode != "token":
        raise ValueError(f"mode must be 'token' or 'pooled', got {mode!r}")
    return layer_scale * torch.sigmoid(hidden @ weight + bias)


def _repeat_kv(x, group):
    """Repeat the head axis (dim -3) of ``x`` ``group`` times for GQA."""
    return x if group == 1 else x.repeat_interleave(group, dim=-3)


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None):
    """Attention over ``[g * prefix ; keys]`` without a kernel.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``H % Hkv == 0``.
        prefix_k, prefix_v: ``[Hkv, L, D]`` (shared by the batch) or ``[B, Hkv, L, D]``.
        gate: None (P-Tuning v2) or broadcastable to ``[B, Sq, L]``.
        gate_hidden, gate_weight, gate_bias, layer_scale: the APT token-level gate inputs
            ``[B, Sq, d]``, ``[d, L]``, ``[L]``, 0-dim, used instead of ``gate``.
        key_padding_mask: ``[B, Sk]`` bool, True = real key. The prefix is always visible.
        causal: query t (at position ``Sk - Sq + t``) sees keys ``u <= Sk - Sq + t``.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, Sq, D]`` in the dtype of ``q``.
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    if gate is None and gate_hidden is not None:
        gate = apt_gate(gate_hidden, gate_weight, gate_bias, layer_scale)

    pk = _repeat_kv(prefix_k, group)
    pv = _repeat_kv(prefix_v, group)
    k = _repeat_kv(k, group)
    v = _repeat_kv(v, group)
    if pk.dim() == 3:  # shared prefix: broadcast over the batch, no copy
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)

    s_prefix = torch.matmul(q, pk.transpose(-1, -2)) * scale  # [B, H, Sq, L]
    if gate is not None:
        g = gate.unsqueeze(-3)  # one gate for every head: [.., 1, Sq|1, L]
        s_prefix = s_prefix * g
    s_keys = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]

    hide = None
    if key_padding_mask is not None:
        hide = ~key_padding_mask[:, None, None, :]
    if causal:
        t = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        future = torch.arange(Sk, device=q.device)[None, :] > t
        hide = future if hide is None else hide | future
    if hide is not None:
        s_keys = s_keys.masked_fill(hide, float("-inf"))

    logits = torch.cat([s_prefix, s_keys], dim=-1)
    # half precision: softmax in fp32 as eager transformers does
    p = F.softmax(logits, dim=-1, dtype=torch.float32 if q.dtype in _HALF else None).to(q.dtype)
    L = s_prefix.shape[-1]
    p_prefix, p_keys = p[..., :L], p[..., L:]
    if gate is not None:
        p_prefix = p_prefix * g
    return torch.matmul(p_prefix, pv) + torch.matmul(p_keys, v)
