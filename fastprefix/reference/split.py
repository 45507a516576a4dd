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

Layout: head-major ``[H, B, Sq, .]`` views of the ``[B, Sq, H, .]`` memory transformers hands over, so a prefix
shared by the batch is one GEMM per head with the batch folded into its rows, no operand or result is transposed
in memory, and the gate broadcasts over the heads (GQA repeats the small prefix per group, never K/V). A query that sees no real key gets ``w = 0`` exactly (the CPU op's log-sum-exp of a row
masked with the lowest finite value underflows), and the prefix keeps the row finite.
"""

from __future__ import annotations

import torch

from ..spec import acc_dtype, cpu_op_mask


def _heads(x):
    """``[B, H, S, X]`` seen head-major, ``[H, B, S, X]`` (a view: no copy)."""
    return x.transpose(0, 1)


def _prefix_heads(prefix, H):
    """A prefix ``[Hkv, L, D]`` or ``[B, Hkv, L, D]`` as ``[H, 1|B, L, D]``: each kv head repeated for its GQA group
    (a copy of the small prefix, not of the batch)."""
    p = (prefix.unsqueeze(0) if prefix.dim() == 3 else prefix).transpose(0, 1)
    G = H // p.shape[0]
    return p if G == 1 else p.repeat_interleave(G, dim=0)


def _per_head(a, b):
    """``a [H, B, M, K] @ b [H, 1|B, K, N]`` per head (and row of the batch): ``[H, B, M, N]``, contiguous.

    A prefix shared by the batch (``b``'s batch axis 1) folds the batch into the rows: one GEMM per head, which
    reads ``a`` in place when it is a head-major view of ``[B, S, H, K]`` memory (what transformers hands over).
    """
    H, B, M, K = a.shape
    if b.shape[1] == 1:
        return torch.bmm(a.reshape(H, B * M, K), b[:, 0]).view(H, B, M, -1)
    return torch.bmm(a.reshape(H * B, M, K), b.reshape(H * B, K, -1)).view(H, B, M, -1)


def _per_head_t(a, b, shared):
    """``a^T b`` per head over the rows, ``a [H, B, M, X]``, ``b [H, B, M, Y]``: ``[H, 1, X, Y]`` summed over the
    batch when ``shared`` (a prefix shared by the batch), else ``[H, B, X, Y]``."""
    H, B, M, X = a.shape
    if shared:
        return torch.bmm(a.reshape(H, B * M, X).transpose(1, 2), b.reshape(H, B * M, -1)).unsqueeze(1)
    return torch.bmm(a.reshape(H * B, M, X).transpose(1, 2), b.reshape(H * B, M, -1)).view(H, B, X, -1)


def _prefix_grad(d, prefix):
    """``[H, 1|B, L, D]`` per query head back to the prefix's layout, summed over each GQA group."""
    Hkv = prefix.shape[-3]
    d = d.unflatten(0, (Hkv, -1)).sum(dim=1) if d.shape[0] != Hkv else d
    d = d.transpose(0, 1)  # [1|B, Hkv, L, D]
    return (d[0] if prefix.dim() == 3 else d).to(prefix.dtype)


def _gate_heads(gate, acc):
    """The 3-dim gate ``[B|1, Sq|1, L]`` broadcast over the heads, ``[1, B|1, Sq|1, L]`` (1.0 for no gate)."""
    return 1.0 if gate is None else gate.unsqueeze(0).to(acc)


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
        ``saved = (s, p, w, pg)``, head-major (``[H, B, Sq, L]``, ``w [H, B, Sq, 1]``), is what
        :func:`merge_backward` takes back.
    """
    H = q.shape[1]
    acc = acc_dtype(q.dtype)
    # head-major throughout: the GEMMs' outputs need no transposing copy, and the gate broadcasts over the heads
    s = _per_head(_heads(q), _prefix_heads(prefix_k * scale, H).transpose(-1, -2)).to(acc)  # [H, B, Sq, L]
    g = _gate_heads(gate, acc)
    lse_k4 = _heads(lse_k).unsqueeze(-1).to(acc)  # [H, B, Sq, 1]
    # the softmax over [z ; lse_k] without building it: z is finite, so the row maximum m is too (a query that
    # sees no real key has lse_k = -inf and gets w = 0 exactly)
    z = s * g if gate is not None else s
    m = torch.maximum(z.amax(dim=-1, keepdim=True), lse_k4)
    p = z.sub(m) if gate is None else z.sub_(m)
    p.exp_()
    w = (lse_k4 - m).exp_()
    total = p.sum(dim=-1, keepdim=True).add_(w)
    p.div_(total)
    w.div_(total)
    pg = (p * g if gate is not None else p).to(q.dtype)
    merged = _per_head(pg, _prefix_heads(prefix_v, H)).to(acc).addcmul_(w, _heads(o_k))  # [H, B, Sq, D]
    if out is None:
        out = torch.empty_like(q)
    _heads(out).copy_(merged)
    lse = _heads(m.add_(total.log_())).squeeze(-1).to(q.dtype) if with_lse else None
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
    H = q.shape[1]
    acc = s.dtype
    shared = prefix_k.dim() == 3
    do = _heads(d_out)
    g = _gate_heads(gate, acc)
    pk = _prefix_heads(prefix_k * scale, H)
    e = _per_head(do, _prefix_heads(prefix_v, H).transpose(-1, -2)).to(acc)  # dO . Pv_j
    delta = torch.linalg.vecdot(do.to(acc), _heads(out).to(acc)).unsqueeze(-1)
    dz = p * torch.addcmul(-delta, g, e) if gate is not None else p * (e - delta)
    dgate = dpk = dpv = None
    if gate is not None and needs[2]:
        dgate = torch.addcmul(dz * s, p, e).sum(dim=0).sum_to_size(gate.shape).to(gate.dtype)
    ds = (dz * g if gate is not None else dz).to(q.dtype)  # d(logit) / d(s); the scale goes onto Pk and q below
    dq = _heads(_per_head(ds, pk))
    if needs[0]:
        dpk = _prefix_grad(_per_head_t(ds, _heads(q), shared) * scale, prefix_k)
    if needs[1]:
        dpv = _prefix_grad(_per_head_t(pg, do, shared), prefix_v)
    return dq, dpk, dpv, dgate, (d_out * _heads(w)).to(q.dtype)


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
