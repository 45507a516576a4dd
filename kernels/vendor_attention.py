"""The real keys' attention of the split path, through PyTorch's own fused attention ops.

The split path (kernels/prefix_merge.py) hands the S x S part of the gated-prefix attention to the
vendor: it needs, for the real keys alone, the output ``o_k`` and the row log-sum-exp ``lse_k`` (natural
log), and later the backward of that attention called with ``w * dO`` and the *merged* output. Which
PyTorch op can do that depends on the call; :func:`choose_op` is the one place that decides it:

==========  ============================================================  ==============================
op          taken when                                                    what its source shows
==========  ============================================================  ==============================
``"cpu"``   CPU tensors (Triton's interpreter), any float dtype, any D,   ``[B, H, S, D]`` in, GQA without
            padding mask (additive, lowest finite value), causal          expanding K/V, ``lse`` natural
            (built-in when Sq == Sk, else an additive bottom-right        log ``[B, H, Sq]`` in
            mask)                                                         ``[B, Sq, H]`` memory
``"flash"`` CUDA, compute capability 8.x or 9.x, fp16 / bf16,            FlashAttention-2: GQA without
            D % 8 == 0 and D <= 128, no padding mask, causal or not,      expanding K/V (num_heads %
            any Sq <= Sk                                                  num_heads_k), ``is_causal``
                                                                          bottom-right for Sq != Sk,
                                                                          ``lse`` fp32 natural log
                                                                          ``[B, H, Sq]``, unpadded
None        anything else: the caller takes the fused kernel              --
==========  ============================================================  ==============================

Sources read (torch 2.13): ``_scaled_dot_product_flash_attention_cuda`` transposes to ``[B, S, H, D]``
and calls ``_flash_attention_forward`` with no head check of its own; FlashAttention-2's ``mha_fwd``
accepts ``num_heads % num_heads_k == 0`` and ``head_size % 8 == 0``, and its backward sums dk, dv over
each GQA group; ``torch.nn.attention.bias.CausalBias`` calls this op with ``is_causal=True`` for its
lower-right variant ("for this particular op it means lower right"); the meta kernel gives
``lse`` as fp32 ``[B, H, Sq]``. Left out, each for a reason: padding masks on CUDA
(``_efficient_attention_forward`` takes an additive bias but needs K/V expanded for GQA, a 16-aligned
bias and an LSE padded to a multiple of 32, none of which can be checked without a GPU), cuDNN (its GQA
and causal alignment could not be confirmed in the source), fp32 on CUDA (FlashAttention has no fp32),
capabilities outside 8.x / 9.x. All of these run the fused kernel, never a guess.

The CPU op's backward needs the same ``attn_mask`` as its forward: :func:`real_keys_mask` rebuilds it
from the padding mask (cheap, deterministic) instead of carrying it from the forward.
"""

from __future__ import annotations

from typing import Optional

import torch

CPU, FLASH = "cpu", "flash"
OPS = (CPU, FLASH)

_aten = torch.ops.aten
_HAS_CPU_OP = hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu")
_HAS_FLASH_OP = hasattr(_aten, "_scaled_dot_product_flash_attention")


def choose_op(device_type: str, capability: Optional[int], dtype: torch.dtype, D: int, has_mask: bool,
              causal: bool, Sq: int, Sk: int) -> Optional[str]:
    """The PyTorch op that computes the real keys' attention and log-sum-exp for this call, or None.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (anything else: None).
        capability: compute capability as ``10 * major + minor`` (80 for an A100), None on CPU.
        dtype: q's dtype; D: head dim; has_mask: a key padding mask is passed; causal: bottom-right
            causal mask; Sq, Sk: query and key lengths (``Sq <= Sk``, checked by ``fastprefix.ops``).

    Returns:
        ``"cpu"``, ``"flash"`` or None (unsupported here: the caller runs the fused kernel). Causality
        and ``Sq < Sk`` never rule an op out: both ops align the causal mask bottom-right (the CPU op
        through an explicit mask when ``Sq != Sk``).
    """
    del causal, Sq, Sk  # every op here handles them (see the table in the module docstring)
    if device_type == "cpu":
        return CPU if _HAS_CPU_OP else None
    if device_type != "cuda" or capability is None or not _HAS_FLASH_OP:
        return None
    if 80 <= capability < 100 and dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128 \
            and not has_mask:
        return FLASH
    return None


def real_keys_mask(key_padding_mask, causal: bool, Sq: int, Sk: int, dtype, device):
    """(additive mask ``[B|1, 1, Sq, Sk]`` or None, is_causal) for the CPU op over the real keys.

    A hidden key gets the dtype's lowest finite value, not -inf: a query that sees no real key (a row
    of padding) then gets a log-sum-exp near that value, so the real keys' share of the merged softmax
    underflows to exactly 0, forward and backward, and nothing is NaN.
    """
    if key_padding_mask is None and (not causal or Sq == Sk):
        return None, causal  # the op's own causal mask is top-left aligned: the same as ours when Sq == Sk
    visible = torch.ones(1, 1, Sq, Sk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if causal:
        t = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
        visible = visible & (torch.arange(Sk, device=device)[None, :] <= t)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask, False


def forward(op: str, q, k, v, key_padding_mask, causal: bool, scale: float):
    """The real keys' attention alone.

    Args:
        op: from :func:`choose_op`. q ``[B, H, Sq, D]``; k, v ``[B, Hkv, Sk, D]`` (last dim contiguous);
        key_padding_mask ``[B, Sk]`` bool or None (``"cpu"`` only); causal bottom-right; scale.

    Returns:
        ``o_k`` ``[B, H, Sq, D]`` (whatever memory layout the op picks), ``lse_k`` ``[B, H, Sq]`` natural
        log in the accumulator dtype, and ``rng`` (two tensors the flash backward takes back; empty on CPU).
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if op == CPU:
        mask, is_causal = real_keys_mask(key_padding_mask, causal, Sq, Sk, q.dtype, q.device)
        o_k, lse_k = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                       scale=scale)
        return o_k, lse_k, (q.new_empty((0,)), q.new_empty((0,)))  # two tensors: custom op outputs never alias
    if op == FLASH:
        assert key_padding_mask is None, "choose_op never picks flash with a padding mask"
        o_k, lse_k, _, _, _, _, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)  # is_causal: bottom-right for this op
        return o_k, lse_k, (seed, offset)
    raise ValueError(f"unknown vendor attention op {op!r}; expected one of {OPS}")


def backward(op: str, grad_out, q, k, v, out, lse_k, rng, key_padding_mask, causal: bool, scale: float):
    """The vendor backward of :func:`forward`, called by the split path with ``grad_out = w * dO`` and
    the merged ``out``: its ``delta = rowsum(w dO * out)`` and probabilities ``exp(logit - lse_k)`` are
    then the merged softmax's own, so the returned ``dq`` (real keys' share), ``dk``, ``dv`` are exact.

    Returns:
        dq ``[B, H, Sq, D]``, dk, dv ``[B, Hkv, Sk, D]`` (GQA groups already summed by the op).
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if op == CPU:
        mask, is_causal = real_keys_mask(key_padding_mask, causal, Sq, Sk, q.dtype, q.device)
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse_k, 0.0, is_causal, attn_mask=mask, scale=scale)
    if op == FLASH:
        seed, offset = rng
        # cum_seq_q / cum_seq_k None: the dense (not varlen) backward, as the forward returned them
        return _aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse_k, None, None, Sq, Sk, 0.0, causal, seed, offset, scale=scale)
    raise ValueError(f"unknown vendor attention op {op!r}; expected one of {OPS}")


def rng_like(op: str, q):
    """Fake (shape-only) twins of the ``rng`` tensors :func:`forward` returns, for the custom op's fake kernel."""
    if op == FLASH:
        return q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64)
    return q.new_empty((0,)), q.new_empty((0,))
