"""Reference gated-prefix attention (P-Tuning v2 and APT) in plain PyTorch.

This is the numerical contract of ``fastprefix.kernels.gated_prefix_attention`` and the path used on
CPU. For query t, prefix token j (always visible) and real key u:

    logit[t, j] = cap(scale * g[t, j] * (q_t . Pk_j))
    logit[t, u] = cap(scale * (q_t . k_u)) + attn_bias[t, u]  or -inf   (hidden by padding / causality / window)
    out_t       = sum_j p[t, j] g[t, j] Pv_j + sum_u p[t, u] v_u,   p = softmax over all L + Sk logits

``cap(x) = softcap * tanh(x / softcap)`` (the identity without ``softcap``); the bias (broadcastable to
``[B, H, Sq, Sk]``) reaches the real keys only; ``window = (left, right)`` hides real key u from query t
(at position ``t' = t + Sk - Sq``) unless ``t' - left <= u <= t' + right`` (-1 = unbounded); the prefix is
always visible. A zero gate gives a logit of 0 (not -inf): the prefix token still takes softmax mass and
adds no value. Inputs are assumed validated (``fastprefix.ops`` does that once).

Three exact formulations, picked by the gate's shape and the features (a window is a mask, so every
formulation takes it; a bias or a softcap changes the logits themselves and takes the explicit one):

- no gate, or one gate row for all queries (P-Tuning v2, APT's pooled gate on encoders): the gate folds into the
  prefix, ``scale * g * (q . Pk) = scale * q . (g * Pk)`` and value ``g * Pv``, so the whole thing is one
  ``scaled_dot_product_attention`` over ``[g * Pk ; K]`` (GQA through ``enable_gqa``, the prefix
  broadcast over the batch until the concatenation);
- a gate per query (APT's token gate, its causal pooled gate) on CPU: the real keys go through PyTorch's
  fused CPU attention, which also returns their log-sum-exp; the L prefix scores are computed apart and the two partial
  softmaxes merged by log-sum-exp. Its backward (:class:`_TokenGatedAttention`) calls the fused
  backward with the merged output and the real keys' share of the gradient, which is exact;
- anything else (other devices, ``attn_bias``, ``softcap``): the scores of the prefix and of the keys built
  explicitly and softmaxed together (:func:`_explicit_attention`), autograd through every op (the bias's
  gradient, summed over its broadcast dims, included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)
# PyTorch's fused CPU attention that also returns the log-sum-exp (private, but stable since torch 2.2)
_FUSED_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


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
        acc = torch.float32 if hidden.dtype in _HALF else hidden.dtype
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
    return layer_scale * torch.sigmoid(torch.addmm(bias, hidden.flatten(0, -2), weight).view(*hidden.shape[:-1], -1))


def _window(window, causal):
    """The part of ``window = (left, right)`` that hides more than ``causal`` does: ``(left, right)`` with -1
    for an unbounded side (the right side is 0 under ``causal``), or None when it adds nothing."""
    if window is None:
        return None
    left, right = window
    if causal:
        right = 0
    if left == -1 and (right == -1 or causal):
        return None
    return left, right


def _visible_keys(key_padding_mask, causal, Sq, Sk, device, window=None):
    """``[B|1, 1, Sq, Sk]`` bool, True = query t may see real key u; None when every key is visible.
    ``window`` is :func:`_window`'s normalised pair or None."""
    visible = None
    if key_padding_mask is not None:
        visible = key_padding_mask[:, None, None, :]
    if causal or window is not None:
        t = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)  # each query's absolute position
        u = torch.arange(Sk, device=device)[None, :]
        left, right = window if window is not None else (-1, 0)
        band = u <= t + right if right >= 0 else torch.ones_like(u, dtype=torch.bool)
        if left >= 0:
            band = band & (u >= t - left)
        visible = band[None, None] if visible is None else visible & band
    return visible


def _gate3(gate):
    """A gate broadcastable to ``[B, Sq, L]`` as a 3-dim tensor (a view)."""
    return gate.reshape((1,) * (3 - gate.dim()) + tuple(gate.shape))


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None,
                           attn_bias=None, window=None, softcap=None):
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
        attn_bias: None or broadcastable to ``[B, H, Sq, Sk]`` (q's dtype or float32): added to the real
            keys' logits after the cap; the prefix gets none.
        window: None or ``(left, right)``, -1 = unbounded: query t sees real key u iff
            ``t' - left <= u <= t' + right`` with ``t' = t + Sk - Sq``. The prefix is always visible.
        softcap: None or a number > 0: every logit x (prefix ones after the gate) becomes
            ``softcap * tanh(x / softcap)``, before the bias and the masks.

    Returns:
        ``[B, H, Sq, D]`` in the dtype of ``q``.
    """
    Sq, D = q.shape[-2:]
    scale = D ** -0.5 if scale is None else scale
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        # an all-real mask (what transformers hands over for an unpadded batch) hides nothing: dropping it
        # keeps the attention on its mask-free fast path (one host sync; the reference path is for CPU)
        key_padding_mask = None
    if gate is None and gate_hidden is not None:
        gate = apt_gate(gate_hidden, gate_weight, gate_bias, layer_scale)
    if gate is not None:
        gate = _gate3(gate)
    window = _window(window, causal)
    if attn_bias is not None or softcap is not None:
        return _explicit_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window,
                                   attn_bias, softcap)
    if gate is None or gate.shape[1] == 1:
        return _folded_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window)
    if q.device.type == "cpu" and _FUSED_CPU:
        return _token_gated_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window)
    return _explicit_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window)


def _folded_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window=None):
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
    visible = _visible_keys(key_padding_mask, causal, Sq, Sk, q.device, window)
    if visible is not None:  # the prefix columns are always visible
        prefix_cols = visible.new_ones(*visible.shape[:-1], L).expand(*visible.shape[:-2], Sq, L)
        visible = torch.cat([prefix_cols, visible.expand(*visible.shape[:-2], Sq, Sk)], dim=-1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=H != Hkv)


def _real_keys_mask(key_padding_mask, causal, Sq, Sk, dtype, device, window=None):
    """(additive mask, is_causal) for the fused CPU attention over the real keys.

    A hidden key gets the dtype's lowest finite value, not -inf: a query that sees no real key then
    gets a log-sum-exp of about that value (the fused op reports 0 for an all -inf row), so the real
    keys' share of the merged softmax underflows to exactly 0, forward and backward.
    """
    if key_padding_mask is None and causal and Sq == Sk and window is None:
        return None, True  # the fused op's own causal mask is top-left aligned: the same when Sq == Sk
    visible = _visible_keys(key_padding_mask, causal, Sq, Sk, device, window)
    if visible is None:
        return None, False
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask, False


class _TokenGatedAttention(torch.autograd.Function):
    """A gate per query: fused attention over the real keys, merged by log-sum-exp with the prefix.

    Shapes (G = H / Hkv heads per key/value head, 5-dim views ``[B, Hkv, G, Sq, .]``):
    ``s = scale * q . Pk``, ``z = g * s`` (prefix logits), real keys' output ``o_k`` and log-sum-exp
    ``lse_k``. One softmax over ``[z ; lse_k]`` (L + 1 columns) gives the prefix probabilities ``p`` of
    the full softmax and the real keys' total mass ``w``: ``out = w o_k + (p g) @ Pv``.

    Backward with ``e = dO . Pv`` and ``delta = dO . out``: ``dz = p (g e - delta)``,
    ``dPv = (p g)^T dO``, ``dg = dz s + p e``, ``ds = dz g``, ``dq += scale ds Pk``, ``dPk = scale ds^T q``.
    The real keys' part is the fused backward called with ``w dO`` and the merged output: its
    ``delta = w dO . out`` and its probabilities ``exp(logit - lse_k)`` times ``w`` are exactly the merged
    softmax's, so it returns the exact ``dq, dk, dv``.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, mask, is_causal, scale):
        B, H, Sq, D = q.shape
        Hkv = k.shape[1]
        acc = torch.float32 if q.dtype in _HALF else q.dtype
        q5 = q.unflatten(1, (Hkv, H // Hkv))
        g5 = gate[:, None, None].to(acc)  # [B|1, 1, 1, Sq, L]
        # einsum over the 5-dim views lets torch pick one large GEMM per key/value head
        s = torch.einsum(_eq(prefix_k, "bkgsd,{p}ld->bkgsl"), q5, prefix_k * scale).to(acc)
        o_k, lse_k = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        lse_k5 = lse_k.reshape(B, Hkv, H // Hkv, Sq, 1).to(acc)
        probs = torch.softmax(torch.cat([s * g5, lse_k5], dim=-1), dim=-1)
        p, w = probs[..., :-1], probs[..., -1:]
        pg = (p * g5).to(q.dtype)
        out5 = torch.einsum(_eq(prefix_v, "bkgsl,{p}ld->bkgsd"), pg, prefix_v).to(acc)
        out5.addcmul_(w, o_k.unflatten(1, (Hkv, -1)))
        # in o_k's memory layout ([B, Sq, H, D]): what the fused backward expects of the output and of its
        # gradient, and what transformers transposes to next, so neither side copies
        out = torch.empty_like(o_k)
        out.unflatten(1, (Hkv, -1)).copy_(out5)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, s, p, w, pg)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, s, p, w, pg = ctx.saved_tensors
        Hkv = k.shape[1]
        acc = s.dtype
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            (d_out * w.flatten(1, 2)).to(q.dtype), q, k, v, out, lse_k, 0.0, ctx.is_causal, attn_mask=mask,
            scale=ctx.scale)
        do5 = d_out.unflatten(1, (Hkv, -1))
        g5 = gate[:, None, None].to(acc)
        e = torch.einsum(_eq(prefix_v, "bkgsd,{p}ld->bkgsl"), do5, prefix_v).to(acc)  # dO . Pv_j
        delta = torch.linalg.vecdot(do5.to(acc), out.unflatten(1, (Hkv, -1)).to(acc)).unsqueeze(-1)
        dz = p * torch.addcmul(-delta, g5, e)
        grads = [None] * 9
        if ctx.needs_input_grad[5]:
            grads[5] = torch.addcmul(dz * s, p, e).sum(dim=(1, 2)).sum_to_size(gate.shape).to(gate.dtype)
        ds = (dz * g5).to(q.dtype)  # d(logit) / d(s); the scale goes onto Pk and q below
        dq.unflatten(1, (Hkv, -1)).add_(torch.einsum(_eq(prefix_k, "bkgsl,{p}ld->bkgsd"), ds, prefix_k * ctx.scale))
        grads[0], grads[1], grads[2] = dq, dk, dv
        if ctx.needs_input_grad[3]:
            q5 = q.unflatten(1, (Hkv, -1))
            grads[3] = (torch.einsum(_eq(prefix_k, "bkgsl,bkgsd->{p}ld"), ds, q5) * ctx.scale).to(prefix_k.dtype)
        if ctx.needs_input_grad[4]:
            grads[4] = torch.einsum(_eq(prefix_v, "bkgsl,bkgsd->{p}ld"), pg, do5).to(prefix_v.dtype)
        return tuple(grads)


def _eq(prefix, pattern):
    """An einsum equation with the prefix's batch letter when it has one (``[B, Hkv, L, D]``)."""
    return pattern.format(p="bk" if prefix.dim() == 4 else "k")


def _token_gated_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window=None):
    Sq, Sk = q.shape[2], k.shape[2]
    mask, is_causal = _real_keys_mask(key_padding_mask, causal, Sq, Sk, q.dtype, q.device, window)
    return _TokenGatedAttention.apply(q, k, v, prefix_k, prefix_v, gate, mask, is_causal, scale)


def _repeat_kv(x, group):
    """Repeat the head axis (dim -3) of ``x`` ``group`` times for GQA."""
    return x if group == 1 else x.repeat_interleave(group, dim=-3)


def _explicit_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, window=None,
                        attn_bias=None, softcap=None):
    """Scores of the prefix and of the keys built explicitly and softmaxed together (any device, every feature:
    the cap on both score blocks, then the bias on the keys', then the masks)."""
    H, Sq = q.shape[1], q.shape[2]
    Hkv, Sk = k.shape[1], k.shape[2]
    group = H // Hkv
    pk, pv = _repeat_kv(prefix_k, group), _repeat_kv(prefix_v, group)
    k, v = _repeat_kv(k, group), _repeat_kv(v, group)
    if pk.dim() == 3:  # shared prefix: broadcast over the batch, no copy
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
    g = None if gate is None else gate.unsqueeze(-3)  # one gate for every head: [B|1, 1, Sq, L]
    s_prefix = torch.matmul(q, pk.transpose(-1, -2)) * scale  # [B, H, Sq, L]
    if g is not None:
        s_prefix = s_prefix * g
    s_keys = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    if softcap is not None:
        s_prefix = torch.tanh(s_prefix / softcap) * softcap
        s_keys = torch.tanh(s_keys / softcap) * softcap
    if attn_bias is not None:  # a float32 bias on 16-bit scores promotes them: the softmax is float32 anyway
        s_keys = s_keys + attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    visible = _visible_keys(key_padding_mask, causal, Sq, Sk, q.device, window)
    if visible is not None:
        s_keys = s_keys.masked_fill(~visible, float("-inf"))
    # half precision: softmax in fp32 as eager transformers does
    scores = torch.cat([s_prefix.to(s_keys.dtype), s_keys], dim=-1)
    p = F.softmax(scores, dim=-1, dtype=torch.float32 if q.dtype in _HALF else None).to(q.dtype)
    L = s_prefix.shape[-1]
    p_prefix = p[..., :L] if g is None else p[..., :L] * g
    return torch.matmul(p_prefix, pv) + torch.matmul(p[..., L:], v)
