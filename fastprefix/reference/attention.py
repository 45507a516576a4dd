"""The reference gated-prefix attention (P-Tuning v2 and APT) in plain PyTorch: the contract every kernel
matches, and the path on CPU. For query t, prefix token j (always visible) and real key u:

    logit[t, j] = cap(scale * g[t, j] * (q_t . Pk_j))
    logit[t, u] = cap(scale * (q_t . k_u)) + attn_bias[t, u]  or -inf   (hidden by padding / causality / window)
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u,   p = softmax over all L + Sk logits

``cap(x) = softcap * tanh(x / softcap)`` (the identity without ``softcap``). A zero gate gives a logit of 0 (not
-inf): the prefix token still takes softmax mass and adds no value. The call comes as an
:class:`fastprefix.spec.AttentionSpec` (validated and normalised once by ``fastprefix.ops``).

:func:`attention_probs` is THE explicit formulation (scores built and softmaxed together): the float64 twin
the kernels are tested against, what ``output_attentions`` returns, and DeBERTa's attention map.
:func:`gated_prefix_attention` picks the cheapest exact formulation for the call:

- no gate, or one gate row for all queries (P-Tuning v2, APT's pooled gate on encoders): the gate folds into the
  prefix, ``scale * g * (q . Pk) = scale * q . (g * Pk)`` and value ``g * Pv``, so the whole thing is one
  ``scaled_dot_product_attention`` over ``[g * Pk ; K]`` (GQA through ``enable_gqa``);
- a gate per query (APT's token gate, its causal pooled gate), or per-row adapter lengths (``prefix_lengths``),
  on CPU: the split algorithm over PyTorch's fused CPU attention (:mod:`fastprefix.reference.split`), also with
  a bias that needs no gradient when there are per-row lengths (T5's position bias on a frozen base: it joins the
  CPU op's mask, so a ``"__base__"`` row is the base model's SDPA bit for bit);
- a bias or a softcap (they change the logits themselves), or another device: the explicit formulation,
  autograd through every op (the bias's gradient, summed over its broadcast dims, included).

Per-row adapters (``spec.prefix_index``) take each row's prefix from the table first (a copy here; the Triton
kernels read the table in place). A packed row (``spec.cu_seqlens``) runs its sequences right-padded through the same
choice (``fastprefix.sequences.unpacked_call``), and its output is packed back; the explicit formulation itself
(:func:`attention_probs`, the float64 twin of the packed paths) takes the row as it is, with a block-diagonal
visibility (``fastprefix.spec.visible_keys``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sequences import all_real, packed_output, unpacked_call
from ..spec import HAS_CPU_OP, acc_dtype, gate3, visible_keys
from . import split

_HALF = (torch.float16, torch.bfloat16)


def apt_gate(hidden, weight, bias, layer_scale, *, mode="token", key_padding_mask=None, causal=False, past=None):
    """APT gate ``layer_scale * sigmoid(h @ W + b)``.

    Args:
        hidden: ``[B, S, d]`` hidden states entering the layer.
        weight: ``[d, L]``; bias: ``[L]``; layer_scale: 0-dim (stored raw, not squashed).
        mode: ``"token"`` (one gate row per query token) or ``"pooled"`` (from the mean of the real
            tokens' hidden states).
        key_padding_mask: ``[B, S]`` bool, True = real token; only used by ``"pooled"``.
        causal: ``"pooled"`` on causal attention: position t pools the real tokens at positions ``<= t``.
            The logit is linear in ``h``, so the running mean of the logits ``h W`` (a cumulative sum, O(S*L))
            is the logit of the running mean hidden state. A position with no real token so far pools to 0.
        past: with ``causal``, ``(total [B, L], count [B])``: the logit sum (no bias) and number of the real
            tokens before ``hidden`` (decoding with a cache).

    Returns:
        ``[B, S, L]`` for ``"token"`` and causal ``"pooled"``, ``[B, 1, L]`` for ``"pooled"``.
    """
    if mode == "pooled" and causal:
        B, S, _ = hidden.shape
        # half precision: accumulate the running sums in float32, as the softmax does
        acc = acc_dtype(hidden.dtype)
        logits = torch.mm(hidden.flatten(0, -2), weight).view(B, S, -1).to(acc)
        if key_padding_mask is None:
            count = torch.arange(1, S + 1, device=hidden.device, dtype=acc).expand(B, S)
        else:
            logits = logits * key_padding_mask.unsqueeze(-1)
            count = key_padding_mask.to(acc).cumsum(dim=1)
        total = logits.cumsum(dim=1)
        if past is not None:
            total, count = total + past[0].to(acc).unsqueeze(1), count + past[1].to(acc).unsqueeze(1)
        mean = (total / count.clamp_min(1).unsqueeze(-1)).to(hidden.dtype)
        return layer_scale * torch.sigmoid(mean + bias)
    if mode == "pooled":
        if key_padding_mask is None:
            hidden = hidden.mean(dim=1, keepdim=True)
        else:
            keep = key_padding_mask.to(hidden.dtype).unsqueeze(-1)
            # clamp: an all-padding row pools to 0 rather than NaN
            hidden = (hidden * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    elif mode != "token":
        raise ValueError(f"mode must be 'token' or 'pooled', got {mode!r}")
    return layer_scale * token_alpha(hidden, weight, bias)


def token_alpha(hidden, weight, bias):
    """APT's gate before its layer scale, ``sigmoid(h @ W + b)``: ``[..., d]`` -> ``[..., L]``."""
    return torch.sigmoid(torch.addmm(bias, hidden.flatten(0, -2), weight).view(*hidden.shape[:-1], -1))


def gate_of(spec):
    """The call's gate as a 3-dim tensor ``[B|1, Sq|1, L]`` in the inputs' dtype (APT's token gate computed
    from ``spec.gate_inputs``), or None (P-Tuning v2)."""
    if spec.gate_inputs is not None:
        return gate3(apt_gate(*spec.gate_inputs))
    return spec.gate


def _repeat_kv(x, group):
    """Repeat the head axis (dim -3) of ``x`` ``group`` times for GQA."""
    return x if group == 1 else x.repeat_interleave(group, dim=-3)


def attention_probs(q, k, prefix_k, spec, gate=None):
    """Each query's probabilities over ``[prefix ; keys]``, ``[B, H, Sq, L + Sk]``, built explicitly.

    The prefix scores ``cap(g * scale * q . Pk)`` and the real keys' ``cap(scale * q . k) + attn_bias`` (-inf where
    hidden) softmaxed together; half precision softmaxes in float32, as eager transformers does.

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, Hkv, Sk, D]``; prefix_k: ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``;
        spec: the call's :class:`fastprefix.spec.AttentionSpec`; gate: None or the 3-dim gate (:func:`gate_of`).
    """
    H, Sq = q.shape[1], q.shape[2]
    Hkv, Sk = k.shape[1], k.shape[2]
    pk = _repeat_kv(prefix_k, H // Hkv)
    if pk.dim() == 3:  # shared prefix: broadcast over the batch, no copy
        pk = pk.unsqueeze(0)
    s_prefix = torch.matmul(q, pk.transpose(-1, -2)) * spec.scale  # [B, H, Sq, L]
    if gate is not None:
        s_prefix = s_prefix * gate.unsqueeze(-3)  # one gate for every head: [B|1, 1, Sq|1, L]
    s_keys = torch.matmul(q, _repeat_kv(k, H // Hkv).transpose(-1, -2)) * spec.scale  # [B, H, Sq, Sk]
    if spec.softcap is not None:
        s_prefix = torch.tanh(s_prefix / spec.softcap) * spec.softcap
        s_keys = torch.tanh(s_keys / spec.softcap) * spec.softcap
    slots = spec.prefix_visible(pk.shape[-2])
    if slots is not None:  # the slots after each row's adapter's length (after the cap: hidden is -inf)
        s_prefix = s_prefix.masked_fill(~slots[:, None, None, :], float("-inf"))
    if spec.attn_bias is not None:  # a float32 bias on 16-bit scores promotes them: the softmax is float32 anyway
        s_keys = s_keys + spec.attn_bias
    visible = visible_keys(spec.key_padding_mask, spec.causal, spec.window, Sq, Sk, q.device, spec.cu_seqlens)
    if visible is not None:
        s_keys = s_keys.masked_fill(~visible, float("-inf"))
    scores = torch.cat([s_prefix.to(s_keys.dtype), s_keys], dim=-1)
    p = F.softmax(scores, dim=-1, dtype=torch.float32 if q.dtype in _HALF else None).to(q.dtype)
    if slots is not None:  # a query that sees nothing (no prefix slot, no real key) gets 0, not NaN
        p = torch.where((scores != float("-inf")).any(dim=-1, keepdim=True), p, 0)
    return p


def explicit_attention(q, k, v, prefix_k, prefix_v, spec, gate=None):
    """The output of :func:`attention_probs`' formulation: any device, every feature, autograd through every op."""
    H, Hkv = q.shape[1], k.shape[1]
    p = attention_probs(q, k, prefix_k, spec, gate)
    L = prefix_k.shape[-2]
    pv = _repeat_kv(prefix_v, H // Hkv)
    if pv.dim() == 3:
        pv = pv.unsqueeze(0)
    p_prefix = p[..., :L] if gate is None else p[..., :L] * gate.unsqueeze(-3)
    return torch.matmul(p_prefix, pv) + torch.matmul(p[..., L:], _repeat_kv(v, H // Hkv))


def _folded_attention(q, k, v, prefix_k, prefix_v, spec, gate):
    """No gate or one gate row ``[B|1, 1, L]`` for all queries: one SDPA over ``[g * Pk ; K]``."""
    B, H, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    pk, pv = prefix_k, prefix_v
    if gate is not None:
        g = gate.transpose(1, 2).unsqueeze(1)  # [B|1, 1, L, 1]: one scale per prefix row, every head
        pk, pv = pk * g, pv * g
    L = pk.shape[-2]
    keys = torch.cat([pk.expand(B, Hkv, L, -1), k], dim=2)
    values = torch.cat([pv.expand(B, Hkv, L, -1), v], dim=2)
    visible = visible_keys(spec.key_padding_mask, spec.causal, spec.window, Sq, Sk, q.device, spec.cu_seqlens)
    if visible is not None:  # the prefix columns are always visible
        prefix_cols = visible.new_ones(*visible.shape[:-1], L).expand(*visible.shape[:-2], Sq, L)
        visible = torch.cat([prefix_cols, visible.expand(*visible.shape[:-2], Sq, Sk)], dim=-1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=spec.scale, enable_gqa=H != Hkv)


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec):
    """Attention over ``[g * prefix ; keys]`` without a kernel.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``H % Hkv == 0``.
        prefix_k, prefix_v: ``[Hkv, L, D]`` (shared by the batch) or ``[B, Hkv, L, D]``.
        spec: the call's :class:`fastprefix.spec.AttentionSpec` (mask, causal, window, bias, gate, softcap, scale).

    Returns:
        ``[B, H, Sq, D]`` in the dtype of ``q``.
    """
    if spec.cu_seqlens is not None:  # a packed row: its sequences right-padded, the output packed back
        *args, inner, packing = unpacked_call(q, k, v, prefix_k, prefix_v, spec)
        return packed_output(_attention(*args, inner), packing)
    return _attention(q, k, v, prefix_k, prefix_v, spec)


def _split_takes_the_bias(q, spec) -> bool:
    """Per-row adapter lengths with a bias that needs no gradient (T5's position bias on a frozen base), on CPU: the
    split algorithm, the bias in the CPU op's mask. A row whose adapter is empty (``"__base__"``) then gets the CPU
    op's own output with weight exactly 1: bit for bit what the base model's SDPA gives it."""
    bias = spec.attn_bias
    return (bias is not None and spec.prefix_lengths is not None and spec.softcap is None and q.device.type == "cpu"
            and HAS_CPU_OP and not (bias.requires_grad and torch.is_grad_enabled()))


def _attention(q, k, v, prefix_k, prefix_v, spec):
    """:func:`gated_prefix_attention` of a call that is not packed."""
    prefix_k, prefix_v = spec.row_prefixes(prefix_k, prefix_v)  # per-row adapters: each row's prefix (a copy)
    if spec.key_padding_mask is not None and all_real(spec.key_padding_mask):
        # an all-real mask (what transformers hands over for an unpadded batch) hides nothing: dropping it
        # keeps the attention on its mask-free fast path
        spec = spec.replace(key_padding_mask=None)
    gate = gate_of(spec)
    if _split_takes_the_bias(q, spec):
        return split.split_attention(q, k, v, prefix_k, prefix_v, spec, gate)
    if spec.attn_bias is not None or spec.softcap is not None:
        return explicit_attention(q, k, v, prefix_k, prefix_v, spec, gate)
    if (gate is None or gate.shape[1] == 1) and spec.prefix_lengths is None:
        return _folded_attention(q, k, v, prefix_k, prefix_v, spec, gate)
    if q.device.type == "cpu" and HAS_CPU_OP:
        return split.split_attention(q, k, v, prefix_k, prefix_v, spec, gate)
    return explicit_attention(q, k, v, prefix_k, prefix_v, spec, gate)
