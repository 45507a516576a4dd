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

Memory: the forward keeps what FlashAttention keeps (the inputs, the merged output and the log-sum-exps), and the
backward recomputes ``s`` and ``p`` from the merged log-sum-exp (one more small GEMM), as the Triton kernels do: a
training step holds no ``[B, H, Sq, L]`` tensor per layer (3 of them before, 27 MiB over MiniLM's six layers at
batch 8 x 128 tokens, L = 32). The softmax runs in base 2 (``exp2`` is several times cheaper than ``exp`` on CPU;
the factor ``log2(e)`` rides on the small prefix).

Layout: head-major ``[H, B, Sq, .]`` views of the ``[B, Sq, H, .]`` memory transformers hands over, so a prefix
shared by the batch is one GEMM per head with the batch folded into its rows, no operand or result is transposed
in memory, and the gate broadcasts over the heads (GQA repeats the small prefix per group, never K/V). A query
that sees no real key gets ``w = 0`` exactly (the CPU op's log-sum-exp of a row masked with the lowest finite value
underflows), and the prefix keeps the row finite.
"""

from __future__ import annotations

import torch

from ..spec import LN2, LOG2E, acc_dtype, cpu_op_mask, no_real_key_below


def _heads(x):
    """``[B, H, S, X]`` seen head-major, ``[H, B, S, X]`` (a view: no copy)."""
    return x.transpose(0, 1)


def _prefix_heads(prefix, H):
    """A prefix ``[Hkv, L, D]`` or ``[B, Hkv, L, D]`` as ``[H, 1|B, L, D]``: each kv head repeated for its GQA group
    (a copy of the small prefix, not of the batch)."""
    p = (prefix.unsqueeze(0) if prefix.dim() == 3 else prefix).transpose(0, 1)
    G = H // p.shape[0]
    return p if G == 1 else p.repeat_interleave(G, dim=0)


def _per_head(a, b, out=None, accumulate=False):
    """``a [H, B, M, K] @ b [H, 1|B, K, N]`` per head (and row of the batch): ``[H, B, M, N]``.

    A prefix shared by the batch (``b``'s batch axis 1) folds the batch into the rows: one GEMM per head, which
    reads ``a`` in place when it is a head-major view of ``[B, S, H, K]`` memory (what transformers hands over).
    ``out``: write (or with ``accumulate`` add) the product there, straight from the GEMM when its memory can be
    seen as the GEMM's rows (a head-major view of ``[B, S, H, N]`` memory), which spares a temporary and a pass.
    """
    H, B, M, K = a.shape
    shared = b.shape[1] == 1
    a3 = a.reshape(H, B * M, K) if shared else a.reshape(H * B, M, K)
    b3 = b[:, 0] if shared else b.reshape(H * B, K, -1)
    if out is None:
        return torch.bmm(a3, b3).view(H, B, M, -1)
    try:
        rows = out.view(a3.shape[0], a3.shape[1], -1)
    except RuntimeError:  # out's memory is not the GEMM's rows: compute apart
        product = torch.bmm(a3, b3).view(H, B, M, -1)
        return out.add_(product) if accumulate else out.copy_(product)
    if accumulate:
        rows.baddbmm_(a3, b3)
    else:
        torch.bmm(a3, b3, out=rows)
    return out


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


def _prefix_logits2(q, prefix_k, gate, scale, acc, slots):
    """The prefix logits in base 2, ``s2 = log2(e) * scale * (q . Pk)`` ``[H, B, Sq, L]`` in ``acc``, and the gated
    ``z2 = g * s2`` (hidden slots -inf), a buffer the caller may overwrite: ``(s2, z2)``. Without a gate ``s2`` is
    None (only the gate's gradient reads it) and ``z2`` is the GEMM's own output, no copy. Base 2 because ``exp2`` is
    several times cheaper than ``exp`` on CPU; the factor rides on the small prefix, not on the scores."""
    s2 = _per_head(_heads(q), _prefix_heads(prefix_k * (scale * LOG2E), q.shape[1]).transpose(-1, -2)).to(acc)
    s2, z2 = (s2, s2 * _gate_heads(gate, acc)) if gate is not None else (None, s2)
    if slots is not None:
        z2.masked_fill_(~slots[None, :, None, :], float("-inf"))
    return s2, z2


def _real_lse2(lse_k, dtype, acc):
    """The real keys' natural log-sum-exp ``[B, H, Sq]`` as ``[H, B, Sq, 1]`` in base 2. A query that sees no real key
    has no mass there: the CPU op's log-sum-exp of such a row is near the lowest finite value (its mask's,
    ``fastprefix.spec.no_real_key_below``), so it counts as -inf."""
    lse_k4 = _heads(lse_k).unsqueeze(-1).to(acc)
    return lse_k4.masked_fill(lse_k4 < no_real_key_below(dtype), float("-inf")).mul_(LOG2E)


def merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale, *, out=None, with_lse=False, slots=None):
    """Merge the gated prefix into the real keys' attention by log-sum-exp.

    Args:
        q: ``[B, H, Sq, D]``; prefix_k, prefix_v: ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``; gate: None or a 3-dim
            tensor broadcastable to ``[B, Sq, L]``; o_k: ``[B, H, Sq, D]`` and lse_k: ``[B, H, Sq]`` (natural
            log; -inf for a query that sees no real key) of the real keys; scale: the softmax scale.
        out: where to write the output (e.g. ``[B, Sq, H, D]`` memory seen as ``[B, H, Sq, D]``), or None.
        with_lse: also return the merged log-sum-exp (the backward does not need it).
        slots: None, or ``[B, L]`` bool, False for a row's hidden prefix slots (per-row adapter lengths). A query
            that then sees nothing at all gets 0 (and a log-sum-exp of -inf).

    Returns:
        ``(out [B, H, Sq, D] in q's dtype, lse [B, H, Sq] natural log in q's dtype or None, lse2)``: ``lse2``
        ``[H, B, Sq, 1]`` is the merged log-sum-exp in base 2 (+inf for a query that sees nothing, so that every
        probability recomputed from it is 0), all :func:`merge_probs` needs to rebuild the probabilities. Nothing
        of size ``[.., Sq, L]`` outlives the call (the backward recomputes it, as FlashAttention's does).
    """
    H = q.shape[1]
    acc = acc_dtype(q.dtype)
    # head-major throughout: the GEMMs' outputs need no transposing copy, and the gate broadcasts over the heads
    _, z = _prefix_logits2(q, prefix_k, gate, scale, acc, slots)
    lse_k4 = _real_lse2(lse_k, q.dtype, acc)
    # the softmax over [z ; lse_k] without building it. A query that sees nothing at all (no real key, every
    # prefix slot hidden) gets m = 0 and a total of 1: all its exponentials are 0, not NaN.
    m = torch.maximum(z.amax(dim=-1, keepdim=True), lse_k4)
    m.masked_fill_(m == float("-inf"), 0.0)
    p = z.sub_(m).exp2_()
    w = (lse_k4 - m).exp2_()
    total = p.sum(dim=-1, keepdim=True).add_(w)
    empty = total == 0
    total.masked_fill_(empty, 1.0)
    p.div_(total)
    w.div_(total)
    lse2 = m.add_(total.log2_())
    pg = (p.mul_(_gate_heads(gate, acc)) if gate is not None else p).to(q.dtype)
    if out is None:
        out = torch.empty_like(q)
    pv, o_k = _prefix_heads(prefix_v, H), _heads(o_k)
    if acc == q.dtype:  # the GEMM writes the output's memory, then the real keys' share is added in place
        _per_head(pg, pv, out=_heads(out)).addcmul_(w, o_k)
    else:  # half precision: merge in float32, round once
        _heads(out).copy_(_per_head(pg, pv).to(acc).addcmul_(w, o_k))
    lse = None
    if with_lse:
        lse = _heads((lse2 * LN2).masked_fill_(empty, float("-inf"))).squeeze(-1).to(q.dtype)
    return out, lse, lse2.masked_fill_(empty, float("inf"))


def real_mass(lse_k, lse2, dtype):
    """The real keys' share of each query's softmax, ``w = exp(lse_k - lse)`` ``[H, B, Sq, 1]`` in the accumulation
    dtype, from the forward's merged base-2 log-sum-exp ``lse2`` (:func:`merge_forward`); ``dtype``: q's."""
    return _real_lse2(lse_k, dtype, acc_dtype(dtype)).sub_(lse2).exp2_()


def merge_probs(q, prefix_k, gate, lse2, scale, slots=None):
    """The forward's prefix probabilities again, from its merged base-2 log-sum-exp ``lse2`` (:func:`merge_forward`).

    Returns:
        ``(s2, p)`` head-major ``[H, B, Sq, L]`` in the accumulation dtype: the base-2 prefix logits (None without a
        gate: only the gate's gradient reads them) and the probabilities; what :func:`merge_backward` takes.
    """
    s2, z = _prefix_logits2(q, prefix_k, gate, scale, acc_dtype(q.dtype), slots)
    return s2, z.sub_(lse2).exp2_()


def weighted_grad(d_out, w):
    """``w * dO`` in dO's dtype (``w`` from :func:`real_mass`): the gradient the vendor backward takes for the real
    keys."""
    return (d_out * _heads(w)).to(d_out.dtype)


def merge_backward(d_out, q, prefix_k, prefix_v, gate, out, probs, scale, dq, needs=(True, True, True)):
    """The prefix's share of the backward of :func:`merge_forward` (given the merged ``out``).

    ``probs``: :func:`merge_probs` (its buffers are reused here). ``dq``: the real keys' part of dq
    ``[B, H, Sq, D]`` (the vendor backward called with :func:`weighted_grad`); the prefix's part is added into it,
    in place.

    Returns:
        ``(dprefix_k, dprefix_v, dgate)``: the prefix gradients in their dtypes (None where ``needs`` =
        (prefix_k, prefix_v, gate) says no), ``dgate`` summed to the gate's shape.
    """
    s2, p = probs
    H = q.shape[1]
    acc = p.dtype
    shared = prefix_k.dim() == 3
    do = _heads(d_out)
    e = _per_head(do, _prefix_heads(prefix_v, H).transpose(-1, -2)).to(acc)  # dO . Pv_j, [H, B, Sq, L]
    delta = torch.linalg.vecdot(do.to(acc), _heads(out).to(acc)).unsqueeze(-1)
    # in place where the values are not needed again: beside s2 and p, two [H, B, Sq, L] buffers, e and dz
    dgate = dpk = dpv = None
    if gate is None:
        ds = e.sub_(delta).mul_(p)  # dz = p (e - delta)
        pg = p
    else:
        g = _gate_heads(gate, acc)
        dz = (e * g).sub_(delta).mul_(p)  # p (g e - delta)
        if needs[2]:  # p e + dz s, with s = ln(2) s2
            dgate = e.mul_(p).addcmul_(dz, s2, value=LN2).sum(dim=0).sum_to_size(gate.shape).to(gate.dtype)
        ds = dz.mul_(g)
        pg = p.mul_(g)
    ds, pg = ds.to(q.dtype), pg.to(q.dtype)  # d(logit) / d(s); the scale goes onto Pk and q below
    _per_head(ds, _prefix_heads(prefix_k * scale, H), out=_heads(dq), accumulate=True)
    if needs[0]:
        dpk = _prefix_grad(_per_head_t(ds, _heads(q), shared) * scale, prefix_k)
    if needs[1]:
        dpv = _prefix_grad(_per_head_t(pg, do, shared), prefix_v)
    return dpk, dpv, dgate


class _SplitAttention(torch.autograd.Function):
    """The split algorithm over PyTorch's fused CPU attention (the real keys + their log-sum-exp), exact both ways.
    Saves what FlashAttention saves (the inputs, the merged output, the log-sum-exps); the backward recomputes the
    prefix's probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, mask, is_causal, scale, slots):
        o_k, lse_k = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        # in o_k's memory layout ([B, Sq, H, D]): what the fused backward expects of the output and of its
        # gradient, and what transformers transposes to next, so neither side copies
        out, _, lse2 = merge_forward(q, prefix_k, prefix_v, gate, o_k, lse_k, scale, out=torch.empty_like(o_k),
                                     slots=slots)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, lse2, slots)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, gate, mask, out, lse_k, lse2, slots = ctx.saved_tensors
        w = real_mass(lse_k, lse2, q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            weighted_grad(d_out, w), q, k, v, out, lse_k, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        # the prefix's probabilities only now: not held through the vendor backward
        probs = merge_probs(q, prefix_k, gate, lse2, ctx.scale, slots)
        dpk, dpv, dgate = merge_backward(d_out, q, prefix_k, prefix_v, gate, out, probs, ctx.scale, dq,
                                         ctx.needs_input_grad[3:6])
        return dq, dk, dv, dpk, dpv, dgate, None, None, None, None


def split_attention(q, k, v, prefix_k, prefix_v, spec, gate):
    """Attention over ``[g * prefix ; keys]`` by the split algorithm on CPU tensors (any float dtype).

    ``spec``: the call's :class:`fastprefix.spec.AttentionSpec` (padding, causal, window, a bias that needs no
    gradient: it joins the CPU op's additive mask; not packed: the caller unpacks a packed call first; no softcap;
    per-row adapter lengths hide their slots); ``gate``: None or the 3-dim gate in q's dtype. Returns
    ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory.
    """
    bias = spec.attn_bias
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("the split algorithm's CPU op takes the bias as a mask, with no gradient: a bias that "
                         "requires grad takes the explicit formulation")
    mask, is_causal = cpu_op_mask(q, k.shape[2], spec.key_padding_mask, spec.causal, spec.window, bias)
    return _SplitAttention.apply(q, k, v, prefix_k, prefix_v, gate, mask, is_causal, spec.scale,
                                 spec.prefix_visible(prefix_k.shape[-2]))
