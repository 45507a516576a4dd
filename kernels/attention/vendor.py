"""The real keys' attention of the split path, through PyTorch's own fused attention ops.

What it computes: for the real keys alone (the prefix is split.py's), the attention output ``o_k`` and the row
log-sum-exp ``lse_k`` (natural log), and later the backward of that attention called with ``w * dO`` and the
*merged* output (and, when ``attn_bias`` requires grad, the bias gradient). Based on PyTorch's private SDPA ops
(FlashAttention-2, the CUTLASS memory-efficient kernels, the fused CPU op), as read in their torch 2.13 sources.
Which op can do that depends on the call; :func:`choose_op` is the one place that decides it:

=============  ==========================================================  ===============================
op             taken when                                                  what its source shows
=============  ==========================================================  ===============================
``"cpu"``      CPU tensors (Triton's interpreter), any float dtype, any    ``[B, H, S, D]`` in, GQA without
               D, padding, ``attn_bias``, ``window``, causal: all of       expanding K/V, an additive
               them in one additive mask (causal built in only when        ``attn_mask`` (float32 is read
               Sq == Sk and nothing else masks), no bias gradient: it is   right for fp16 / bf16 / fp32
               recomputed exactly in torch (below)                         queries, not for fp64), ``lse``
                                                                           natural log ``[B, H, Sq]`` in
                                                                           ``[B, Sq, H]`` memory
``"flash"``    CUDA, compute capability 8.x or 9.x, fp16 / bf16,           FlashAttention-2: GQA without
               D % 8 == 0 and D <= 128, no padding mask, no bias, no       expanding K/V, ``is_causal``
               window that hides a key, causal or not, any Sq <= Sk        bottom-right for Sq != Sk,
                                                                           ``lse`` fp32 ``[B, H, Sq]``
``"efficient"`` as ``"flash"``, but with an ``attn_bias`` in q's dtype     ``_scaled_dot_product_efficient
               and / or a window (and padding with them): the memory-      _attention`` / ``_backward``
               efficient op, which takes an additive bias and returns      (CUTLASS): bias ``[B, H, Sq,
               its gradient                                                Sk]`` in q's dtype, is_causal
                                                                           top-left, ``lse`` fp32 ``[B,
                                                                           H, ceil32(Sq)]``, grad_bias
None           anything else: the caller takes the fused kernel            --
=============  ==========================================================  ===============================

The efficient op's constraints, from its source (torch 2.13, aten/src/ATen/native/transformers/cuda:
attention.cu, attention_backward.cu and the CUTLASS kernels' ``check_supported``), and how each is met.
The SDPA-level pair is called, not ``_efficient_attention_forward`` / ``_backward`` beneath it (the
same kernels, BSHD views of the same tensors): the latter's meta kernel lacks its ``out`` argument, so
its calls could not be checked on fake tensors. Their is_causal is top-left aligned (custom mask type
1): used when Sq == Sk, the bottom-right causal mask goes into the bias otherwise.

- K and V need as many heads as Q (``query.size(2) == key.size(2)``): GQA's K/V are expanded by a copy
  (``repeat_interleave``) and the backward sums dK, dV over each group.
- the bias must have q's dtype (``invalid dtype for bias``), be 4-dim ``[B, H, Sq, Sk]`` exactly (broadcast
  dims as stride-0 views), its last dim contiguous, and its pointer and its B, H and row strides aligned
  to 128 bits (8 fp16 elements, ``kAlignmentQ``; the backward checks the same on the gradient, whose last
  dim it pads to 16): the mask is built in a ``[.., Sq, ceil16(Sk)]`` buffer and sliced to Sk, so every
  stride is a multiple of 16 (or 0). A float32 bias on fp16 / bf16 queries would have to be rounded to
  q's dtype, an approximation: such calls take the fused kernel.
- fp16 / bf16 only: on 8.x its fp32 path runs the GEMMs on tensor cores (not IEEE fp32 as the fused
  kernel computes), so fp32 calls keep the fused kernel. D % 8 == 0 (the GEMM alignment the SDPA
  dispatcher requires), D <= 128 (the merge kernel's limit).
- the log-sum-exp comes back padded to a multiple of 32 rows (``kAlignLSE``); the merge reads its first
  Sq entries through strides, the backward takes it whole.
- its backward computes ``delta = rowsum(grad_out * out)`` from what it is given, so the ``w * dO`` /
  merged-``out`` trick of the split path holds as for FlashAttention, ``grad_bias`` included: with
  ``grad_out = w dO`` its ``dS = p_u (w dO . v_u - w delta)`` is the merged softmax's logit gradient.
- ROCm builds report a different log-sum-exp layout: not taken there.

Caveats. Left out, each for a reason: padding alone on CUDA through a dense op (it would need a materialised
``[B, 1, Sq, Sk]`` mask; such calls take FlashAttention-2's varlen ops instead, varlen.py, whose op names
:data:`FLASH_VARLEN` / :data:`CPU_VARLEN` live here with the others), ``softcap`` (no vendor op caps the
logits: dispatch.py routes it to the fused kernel, never an approximation), cuDNN (its
GQA and causal alignment could not be confirmed in the source), capabilities outside 8.x / 9.x.

FlashAttention-2 sources read: ``_scaled_dot_product_flash_attention_cuda`` transposes to ``[B, S, H, D]``
and calls ``_flash_attention_forward`` with no head check of its own; ``mha_fwd`` accepts ``num_heads %
num_heads_k == 0`` and ``head_size % 8 == 0``, and its backward sums dk, dv over each GQA group;
``torch.nn.attention.bias.CausalBias`` calls this op with ``is_causal=True`` for its lower-right
variant; the meta kernel gives ``lse`` as fp32 ``[B, H, Sq]``.

The CPU op returns no bias gradient. With the same ``grad_out = w dO`` it is ``dbias = sum over
broadcast dims of p * (grad_out . v - delta')`` with ``p = exp(s - lse_k)`` on the visible keys
(``s = scale q . k + bias``), computed in torch in the accumulator dtype only when the bias requires
grad (one ``[B, H, Sq, Sk]`` score tensor). Its ``delta' = w * rowsum(dO * out)`` is taken exactly, from
the prefix's share (split.py) and the recomputed ``p``, not from the output rounded to
fp16: that rounding made the fp16 bias gradient up to 6x the eager path's error. The CUDA op's
``grad_bias`` has FlashAttention's delta (from the fp16 output).

The masks are rebuilt in the backward from their parts (padding, bias, window; cheap, deterministic)
instead of being carried from the forward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...spec import HAS_CPU_OP, acc_dtype, additive_mask, bias4, cpu_op_mask, cpu_op_mask_dtype, visible_keys

CPU, FLASH, EFFICIENT = "cpu", "flash", "efficient"
# the variable-length ops (varlen.py): FlashAttention-2's varlen forward / backward on CUDA, and its emulation on
# CPU (the fused CPU op per sequence) under Triton's interpreter
FLASH_VARLEN, CPU_VARLEN = "flash-varlen", "cpu-varlen"
VARLEN_OPS = (FLASH_VARLEN, CPU_VARLEN)
OPS = (CPU, FLASH, EFFICIENT) + VARLEN_OPS
# row alignment (elements) of the efficient op's bias buffer: 16 covers the forward's 128-bit rule and
# the 16-element padding its backward gives the gradient
_BIAS_ALIGN = 16
_LSE_ALIGN = 32  # the efficient op pads its log-sum-exp to a multiple of 32 rows (kAlignLSE)

_aten = torch.ops.aten
_HAS_FLASH_OP = hasattr(_aten, "_scaled_dot_product_flash_attention")
_HAS_EFFICIENT_OP = (hasattr(_aten, "_scaled_dot_product_efficient_attention")
                     and hasattr(_aten, "_scaled_dot_product_efficient_attention_backward"))


def choose_op(device_type: str, capability: Optional[int], dtype: torch.dtype, D: int, has_mask: bool,
              causal: bool, Sq: int, Sk: int, *, bias_dtype: Optional[torch.dtype] = None,
              has_window: bool = False) -> Optional[str]:
    """The PyTorch op that computes the real keys' attention and log-sum-exp for this call, or None.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (anything else: None).
        capability: compute capability as ``10 * major + minor`` (80 for an A100), None on CPU.
        dtype: q's dtype; D: head dim; has_mask: a key padding mask is passed; causal: bottom-right
            causal mask; Sq, Sk: query and key lengths (``Sq <= Sk``, checked by ``fastprefix.ops``).
        bias_dtype: the ``attn_bias`` dtype, None without a bias.
        has_window: a window that hides some key (``spec.window`` is not None: ``fastprefix.spec.effective_window``).

    Returns:
        ``"cpu"``, ``"flash"``, ``"efficient"`` or None (unsupported here: the caller runs the fused
        kernel), by the table in the module docstring. Causality and ``Sq < Sk`` never rule an op out.
    """
    del causal, Sq, Sk  # every op here handles them (see the table in the module docstring)
    if device_type == "cpu":
        return CPU if HAS_CPU_OP else None
    if device_type != "cuda" or capability is None or not 80 <= capability < 100:
        return None
    if dtype not in (torch.float16, torch.bfloat16) or D % 8 != 0 or D > 128:
        return None
    if bias_dtype is None and not has_window:
        return FLASH if _HAS_FLASH_OP and not has_mask else None  # padding alone: the fused kernel
    if bias_dtype not in (None, dtype) or not _HAS_EFFICIENT_OP or torch.version.hip is not None:
        return None
    return EFFICIENT


# --------------------------------------------------------------------------------------------
# Masks (built from the parts of the call: fastprefix.spec)
# --------------------------------------------------------------------------------------------


def _efficient_bias(q, Sk, key_padding_mask, causal, window, attn_bias):
    """(the efficient op's bias ``[B, H, Sq, Sk]`` or None, its own is_causal). Stride-0 views over the
    broadcast dims, rows 16-aligned. The op's causal mask is top-left aligned: used when Sq == Sk (the
    same as ours, and it lets the kernel skip the masked blocks), put in the bias otherwise."""
    B, H, Sq, _ = q.shape
    in_mask = causal and Sq != Sk
    mask = additive_mask(Sq, Sk, q.dtype, q.device, key_padding_mask, in_mask, window, attn_bias, align=_BIAS_ALIGN)
    return (None if mask is None else mask.expand(B, H, Sq, Sk)), causal and not in_mask


def _heads(x, H):
    """K or V ``[B, Hkv, Sk, D]`` with its heads repeated to H (a copy; itself when Hkv == H)."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


def forward(op: str, q, k, v, key_padding_mask, causal: bool, scale: float, *, attn_bias=None, window=None):
    """The real keys' attention alone.

    Args:
        op: from :func:`choose_op`. q ``[B, H, Sq, D]``; k, v ``[B, Hkv, Sk, D]`` (last dim contiguous);
        key_padding_mask ``[B, Sk]`` bool or None; causal bottom-right; scale; attn_bias None or
        broadcastable to ``[B, H, Sq, Sk]``; window None or an effective pair (``fastprefix.spec.effective_window``).

    Returns:
        ``o_k`` ``[B, H, Sq, D]`` (whatever memory layout the op picks), ``lse_k`` ``[B, H, Sq]`` natural
        log in the accumulator dtype (``[B, H, ceil32(Sq)]`` for the efficient op: read its first Sq
        entries), and ``rng`` (two tensors the CUDA backwards take back; empty on CPU).
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if op == CPU:
        mask, is_causal = cpu_op_mask(q, Sk, key_padding_mask, causal, window, attn_bias)
        o_k, lse_k = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                       scale=scale)
        return o_k, lse_k, (q.new_empty((0,)), q.new_empty((0,)))  # two tensors: custom op outputs never alias
    if op == FLASH:
        assert key_padding_mask is None and attn_bias is None and window is None, "choose_op: flash has no mask"
        o_k, lse_k, _, _, _, _, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)  # is_causal: bottom-right for this op
        return o_k, lse_k, (seed, offset)
    if op == EFFICIENT:
        H = q.shape[1]
        bias, is_causal = _efficient_bias(q, Sk, key_padding_mask, causal, window, attn_bias)
        o_k, lse_k, seed, offset = _aten._scaled_dot_product_efficient_attention(
            q, _heads(k, H), _heads(v, H), bias, True, 0.0, is_causal, scale=scale)
        return o_k, lse_k, (seed, offset)
    raise ValueError(f"unknown vendor attention op {op!r}; expected one of {OPS}")


class Grads(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dbias: Optional[torch.Tensor]


def backward_all(op: str, grad_out, q, k, v, out, lse_k, rng, key_padding_mask, causal: bool, scale: float, *,
                 attn_bias=None, window=None, bias_grad: bool = False, grad_out_acc=None,
                 prefix_delta=None) -> Grads:
    """The vendor backward of :func:`forward`, called by the split path with ``grad_out = w * dO`` and
    the merged ``out``: its ``delta = rowsum(w dO * out)`` and probabilities ``exp(logit - lse_k)`` are
    then the merged softmax's own, so the returned gradients are exact.

    ``grad_out_acc`` (``grad_out`` before its rounding to q's dtype) and ``prefix_delta`` (``(w, the
    prefix's share of rowsum(dO * out))``, each ``[B, H, Sq]``): for the CPU bias gradient, computed here
    in torch, whose delta is then taken exactly (the prefix's share + the real keys' share from their
    recomputed probabilities) instead of from the output rounded to q's dtype.

    Returns:
        dq ``[B, H, Sq, D]``, dk, dv ``[B, Hkv, Sk, D]`` (GQA groups summed), and with ``bias_grad`` the
        bias gradient in the shape of ``fastprefix.spec.bias4(attn_bias)`` (summed over its broadcast dims) and its
        dtype; dbias None otherwise.
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if op == CPU:
        mask, is_causal = cpu_op_mask(q, Sk, key_padding_mask, causal, window, attn_bias)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse_k, 0.0, is_causal, attn_mask=mask, scale=scale)
        dbias = None
        if bias_grad:
            dbias = _cpu_bias_grad(grad_out if grad_out_acc is None else grad_out_acc, q, k, v, out, lse_k,
                                   key_padding_mask, causal, window, attn_bias, scale, prefix_delta)
        return Grads(dq, dk, dv, dbias)
    if op == FLASH:
        seed, offset = rng
        # cum_seq_q / cum_seq_k None: the dense (not varlen) backward, as the forward returned them
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse_k, None, None, Sq, Sk, 0.0, causal, seed, offset, scale=scale)
        return Grads(dq, dk, dv, None)
    if op == EFFICIENT:
        H = q.shape[1]
        Hkv = k.shape[1]
        seed, offset = rng
        bias, is_causal = _efficient_bias(q, Sk, key_padding_mask, causal, window, attn_bias)
        dq, dk, dv, dbias = _aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, _heads(k, H), _heads(v, H), bias, out, lse_k, seed, offset, 0.0,
            [True, True, True, bool(bias_grad)], is_causal, scale=scale)
        # [B, H, S, D] views of [B, S, H, D] memory: the copies' gradients summed back onto their K/V head
        # in that memory, in fp32 (as FlashAttention sums its GQA groups)
        dk, dv = (x.transpose(1, 2).unflatten(2, (Hkv, H // Hkv)).sum(3, dtype=torch.float32).to(x.dtype)
                  .transpose(1, 2) if Hkv != H else x for x in (dk, dv))
        if bias_grad:
            dbias = dbias.sum_to_size(bias4(attn_bias).shape).to(attn_bias.dtype)
        return Grads(dq, dk, dv, dbias if bias_grad else None)
    raise ValueError(f"unknown vendor attention op {op!r}; expected one of {OPS}")


def backward(op: str, grad_out, q, k, v, out, lse_k, rng, key_padding_mask, causal: bool, scale: float, **kwargs):
    """:func:`backward_all` less the bias gradient: ``(dq, dk, dv)``."""
    return tuple(backward_all(op, grad_out, q, k, v, out, lse_k, rng, key_padding_mask, causal, scale, **kwargs)[:3])


def _cpu_bias_grad(grad_out, q, k, v, out, lse_k, key_padding_mask, causal, window, attn_bias, scale,
                   prefix_delta=None):
    """The bias gradient the CPU op does not return, exactly as its backward would: with the real keys'
    probabilities ``p = exp(scale q . k + bias - lse_k)`` (0 where hidden), ``dS = p (grad_out . v -
    rowsum(grad_out * out))``, summed over the bias's broadcast dims. In the accumulator dtype (fp64 for
    fp64, fp32 otherwise), one ``[B, H, Sq, Sk]`` tensor at a time."""
    H, Sq = q.shape[1], q.shape[2]
    Hkv, Sk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    bias = bias4(attn_bias)
    q5 = q.to(acc).unflatten(1, (Hkv, H // Hkv))  # [B, Hkv, G, Sq, D]: no K/V expansion for GQA
    g5 = grad_out.to(acc).unflatten(1, (Hkv, H // Hkv))
    s = torch.einsum("bkgsd,bkud->bkgsu", q5, k.to(acc)).flatten(1, 2) * scale  # [B, H, Sq, Sk]
    s = s + bias.to(acc).clamp(min=torch.finfo(cpu_op_mask_dtype(q, bias)).min)  # as the forward's mask holds it
    p = torch.exp(s - lse_k.to(acc).unsqueeze(-1))
    visible = visible_keys(key_padding_mask, causal, window, Sq, Sk, q.device)
    if visible is not None:
        p = p.masked_fill(~visible, 0.0)
    dp = torch.einsum("bkgsd,bkud->bkgsu", g5, v.to(acc)).flatten(1, 2)
    if prefix_delta is None:  # as the op's backward does
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    else:  # exactly: delta' = w delta = w (prefix share + sum_u p_u (w dO . v_u)), grad_out being w dO
        w, prefix_share = (x.to(acc).unsqueeze(-1) for x in prefix_delta)
        delta = w * (prefix_share + (p * dp).sum(-1, keepdim=True))
    return (p * (dp - delta)).sum_to_size(bias.shape).to(attn_bias.dtype)


def rng_like(op: str, q):
    """Fake (shape-only) twins of the ``rng`` tensors :func:`forward` (or ``varlen.forward``) returns, for the
    custom op's fake kernel. The efficient op returns its (unused: no dropout) seed and offset as int64 scalars
    on the CPU."""
    if op in (FLASH, FLASH_VARLEN):
        return q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64)
    if op == EFFICIENT:
        return (torch.empty((), dtype=torch.int64, device="cpu"), torch.empty((), dtype=torch.int64, device="cpu"))
    return q.new_empty((0,)), q.new_empty((0,))


def grads_like(op: str, q, k, v):
    """Fake twins of dq, dk, dv as :func:`backward_all` returns them: the CPU op writes its gradients in
    ``[B, S, H, D]`` memory, as does the efficient branch (its BSHD outputs transposed back), and the split path's
    varlen branch (token-major gradients, the keys' scattered back to their padded places);
    FlashAttention's are laid out like its inputs."""
    if op == FLASH:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return tuple(x.new_empty((x.shape[0], x.shape[2], x.shape[1], x.shape[3])).transpose(1, 2) for x in (q, k, v))


def lse_like(op: str, q):
    """A fake twin of :func:`forward`'s ``lse_k``: its shape, dtype and memory layout per op. The varlen ops give
    ``[H, B * Sq]`` (token-major queries; fp32 from FlashAttention, the accumulator dtype from the emulation)."""
    B, H, Sq, _ = q.shape
    acc = acc_dtype(q.dtype)
    if op in VARLEN_OPS:
        return q.new_empty((H, B * Sq), dtype=torch.float32 if op == FLASH_VARLEN else acc)
    if op == CPU:  # the CPU op returns lse in [B, Sq, H] memory
        return q.new_empty((B, Sq, H), dtype=acc).transpose(1, 2)
    if op == EFFICIENT:
        return q.new_empty((B, H, -(-Sq // _LSE_ALIGN) * _LSE_ALIGN), dtype=torch.float32)
    return q.new_empty((B, H, Sq), dtype=acc)
