"""The split algorithm in plain PyTorch: the naive twin of ``fastprefix.kernels.attention.split``, forward and
backward, and the reference path's attention for a per-query gate on CPU.

For query t of head h (kv head ``h // G``, ``G = H / Hkv``), prefix row j and the real keys' own softmax
output ``o_k`` and natural log-sum-exp ``lse_k`` (from PyTorch's fused attention over the real keys)::

    s[t, j] = scale * (q_t . Pk_j),   z = g * s                       prefix logits (a zero gate: logit 0)
    p, w    = softmax over [z[t, :] ; lse_k[t]]                       prefix probabilities, real keys' mass
    out_t   = sum_j p[t, j] g[t, j] Pv_j + w[t] o_k[t]

Backward with ``e = dO . Pv_j`` and ``delta = dO . out``: ``dz = p (g e - delta)``, ``dPv = (p g)^T dO``,
``dg = dz s + p e``, ``ds = dz g``, ``dq += scale ds Pk``, ``dPk = scale ds^T q``. The real keys' part is the
fused backward called with ``w dO`` and the merged output: its ``delta = w dO . out`` and its probabilities
``exp(logit - lse_k)`` times ``w`` are exactly the merged softmax's, so it returns the exact ``dq, dk, dv``.

Shapes: 5-dim views ``[B, Hkv, G, Sq, .]``, so one einsum per kv head covers its GQA group (no K/V or
prefix expansion). A query that sees no real key gets ``w = 0`` exactly (the CPU op's log-sum-exp of a row
masked with the lowest finite value underflows), and the prefix keeps the row finite.
"""

from __future__ import annotations

import torch

from ..spec import acc_dtype, cpu_op_mask


def _eq(prefix, pattern):
    """An einsum equation with the prefix's batch letter when it has one (``[B, Hkv, L, D]``)."""
    return pattern.format(p="bk" if prefix.dim() == 4 else "k")


def _prefix_scores(q, prefix_k, scale):
    """``s = scale * q . Pk``: ``[B, Hkv, G, Sq, L]`` in the accumulator dtype."""
    Hkv = prefix_k.shape[-3]
    q5 = q.unflatten(1, (Hkv, q.shape[1] // Hkv))
    # einsum over the 5-dim views lets torch pick one large GEMM per key/value head
    return torch.einsum(_eq(prefix_k, "bkgsd,{p}ld->bkgsl"), q5, prefix_k * scale).to(acc_dtype(q.dtype))


def merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale, *, out=None, with_lse=False):
    """Merge the gated prefix into the real keys' attention by log-sum-exp.

    Args:
        q: ``[B, H, Sq, D]``; prefix_k, prefix_v: ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``; gate: None or a 3-dim
            tensor broadcastable to ``[B, Sq, L]``; o_k: ``[B, H, Sq, D]`` and lse_k: ``[B, H, Sq]`` (natural
            log; -inf for a query that sees no real key) of the real keys; scale: the softmax scale.
        out: where to write the output (e.g. ``[B, Sq, H, D]`` memory seen as ``[B, H, Sq, D]``), or None.
        with_lse: also return the merged log-sum-exp (the backward does not need it).

    Returns:
        ``(out [B, H, Sq, D] in q's dtype, lse [B, H, Sq] natural log in q's dtype or None, saved)``:
        ``saved = (s, p, w, pg)`` is what :func:`merge_backward` takes back.
    """
    B, H, Sq, D = q.shape
    Hkv = prefix_k.shape[-3]
    acc = acc_dtype(q.dtype)
    s = _prefix_scores(q, prefix_k, scale)
    g5 = 1.0 if gate is None else gate[:, None, None].to(acc)  # [B|1, 1, 1, Sq|1, L|1]
    lse_k5 = lse_k.reshape(B, Hkv, H // Hkv, Sq, 1).to(acc)
    logits = torch.cat([s * g5, lse_k5], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    p, w = probs[..., :-1], probs[..., -1:]
    pg = (p * g5).to(q.dtype)
    out5 = torch.einsum(_eq(prefix_v, "bkgsl,{p}ld->bkgsd"), pg, prefix_v).to(acc)
    out5.addcmul_(w, o_k.unflatten(1, (Hkv, -1)))
    if out is None:
        out = torch.empty_like(q)
    out.unflatten(1, (Hkv, -1)).copy_(out5)
    lse = torch.logsumexp(logits, dim=-1).flatten(1, 2).to(q.dtype) if with_lse else None
    return out, lse, (s, p, w, pg)


def merge_backward(d_out, q, prefix_k, prefix_v, gate, out, saved, scale, needs=(True, True, True)):
    """The prefix's share of the backward of :func:`merge_forward` (given the merged ``out``).

    Returns:
        ``(dq_prefix [B, H, Sq, D], dprefix_k, dprefix_v, dgate, w_dout)``: ``dq_prefix`` is the prefix's part
        of dq (the real keys' part comes from the vendor backward called with ``w_dout = w * dO``); the prefix
        gradients in their dtypes (None where ``needs`` = (prefix_k, prefix_v, gate) says no), ``dgate``
        summed to the gate's shape.
    """
    s, p, w, pg = saved
    Hkv = prefix_k.shape[-3]
    acc = s.dtype
    do5 = d_out.unflatten(1, (Hkv, -1))
    g5 = 1.0 if gate is None else gate[:, None, None].to(acc)
    e = torch.einsum(_eq(prefix_v, "bkgsd,{p}ld->bkgsl"), do5, prefix_v).to(acc)  # dO . Pv_j
    delta = torch.linalg.vecdot(do5.to(acc), out.unflatten(1, (Hkv, -1)).to(acc)).unsqueeze(-1)
    dz = p * torch.addcmul(-delta, g5, e) if gate is not None else p * (e - delta)
    dgate = dpk = dpv = None
    if gate is not None and needs[2]:
        dgate = torch.addcmul(dz * s, p, e).sum(dim=(1, 2)).sum_to_size(gate.shape).to(gate.dtype)
    ds = (dz * g5).to(q.dtype)  # d(logit) / d(s); the scale goes onto Pk and q below
    dq = torch.einsum(_eq(prefix_k, "bkgsl,{p}ld->bkgsd"), ds, prefix_k * scale).flatten(1, 2)
    if needs[0]:
        q5 = q.unflatten(1, (Hkv, -1))
        dpk = (torch.einsum(_eq(prefix_k, "bkgsl,bkgsd->{p}ld"), ds, q5) * scale).to(prefix_k.dtype)
    if needs[1]:
        dpv = torch.einsum(_eq(prefix_v, "bkgsl,bkgsd->{p}ld"), pg, do5).to(prefix_v.dtype)
    return dq, dpk, dpv, dgate, (d_out * w.flatten(1, 2)).to(q.dtype)


class _SplitAttention(torch.autograd.Function):
    """The split algorithm over PyTorch's fused CPU attention (the real keys + their log-sum-exp), exact both ways."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, mask, is_causal, scale):
        o_k, lse_k = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        # in o_k's memory layout ([B, Sq, H, D]): what the fused backward expects of the output and of its
        # gradient, and what transformers transposes to next, so neither side copies
        out, _, saved = merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale, out=torch.empty_like(o_k))
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, *saved)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, *saved = ctx.saved_tensors
        dq_prefix, dpk, dpv, dgate, w_dout = merge_backward(d_out, q, prefix_k, prefix_v, gate, out, saved, ctx.scale,
                                                            ctx.needs_input_grad[3:6])
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            w_dout, q, k, v, out, lse_k, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        dq.add_(dq_prefix)
        return dq, dk, dv, dpk, dpv, dgate, None, None, None


def split_attention(q, k, v, prefix_k, prefix_v, spec, gate):
    """Attention over ``[g * prefix ; keys]`` by the split algorithm on CPU tensors (any float dtype).

    ``spec``: the call's :class:`fastprefix.spec.AttentionSpec` (padding, causal, window; not packed: the caller
    unpacks a packed call first; no bias or softcap: those take the explicit formulation); ``gate``: None or the 3-dim gate in q's dtype. Returns
    ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory.
    """
    mask, is_causal = cpu_op_mask(q, k.shape[2], spec.key_padding_mask, spec.causal, spec.window)
    return _SplitAttention.apply(q, k, v, prefix_k, prefix_v, gate, mask, is_causal, spec.scale)
