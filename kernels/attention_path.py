"""``backend="triton"`` for the gated-prefix attention: the split path or the fused kernel, per call.

The rule (the one place it is written; the README repeats it):

1. ``softcap`` (Gemma 2's logit capping): the fused kernel, always, also under
   ``FASTPREFIX_ATTENTION=split``. No vendor op caps the logits, and the split path never approximates:
   a forced split falls back to the fused kernel for the features the vendor ops lack.
2. ``FASTPREFIX_ATTENTION=fused`` forces the fused kernel (kernels/gated_prefix_attention.py);
   ``FASTPREFIX_ATTENTION=split`` forces the split path (kernels/prefix_merge.py) wherever a vendor op
   supports the call (kernels/vendor_attention.py: ``choose_op``; with ``attn_bias`` or a ``window`` that
   hides a key that is PyTorch's fused CPU attention on CPU and the memory-efficient op on CUDA), the
   fused kernel elsewhere; unset or ``auto``: step 3. The variable is read at every call, so a test or
   benchmark can flip it at run time; on CPU under ``TRITON_INTERPRET=1`` the split path runs with
   PyTorch's fused CPU attention.
3. ``auto``: split for fp16 / bf16 on CUDA with compute capability 8.0 or newer where ``choose_op`` picks
   FlashAttention-2 (no padding mask: an all-real mask is dropped first; no ``attn_bias``; no window
   that hides a key), fused otherwise (fp32, padded batches on CUDA, a bias or a window, older GPUs,
   the interpreter).

| call                                            | auto                | ``split`` forced          |
|-------------------------------------------------|---------------------|---------------------------|
| fp16/bf16, CUDA 8.x/9.x, no mask/bias/window    | split (FlashAttn-2) | split (FlashAttention-2)  |
| ... with ``attn_bias`` (q's dtype) or a window  | fused               | split (memory-efficient)  |
| ... with a float32 ``attn_bias``                | fused               | fused                     |
| ... with only a padding mask                    | fused               | fused                     |
| ``softcap`` (any device, any dtype)             | fused               | fused                     |
| CPU (interpreter)                               | fused               | split (fused CPU op)      |

Step 3 is the issue's provisional rule, backed by the model in kernels/prefix_merge.py's header (at
peak rates split costs 1.14x plain FlashAttention-2 over the real keys, 1.27x causal, against the fused
kernel's 1.32x / 1.36x before its backward's ~2x efficiency gap to FA2); the GPU benchmark's numbers
replace it as soon as they exist. The memory-efficient op (a materialised ``[B|1, H|1, Sq, Sk]`` mask,
K/V copied per query head under GQA) is unmeasured: only a forced split takes it.

A window that hides no key (``kernels.vendor_attention.effective_window``: e.g. a sliding window longer
than the sequence) is dropped first, so such calls keep FlashAttention-2.

On both paths the gate reaches the kernels as one tensor in the accumulator dtype, built by
``gated_prefix_attention.gate_tensor``: APT's fused gate inputs (``gate_hidden``, ``gate_weight``,
``gate_bias``, ``layer_scale``) become one GEMM + sigmoid per call in torch, shared by every head and
tile, its gradient through autograd.
"""

from __future__ import annotations

import os

import torch

from . import gated_prefix_attention as fused
from . import prefix_merge
from . import vendor_attention

ENV = "FASTPREFIX_ATTENTION"
_CHOICES = ("auto", "split", "fused")


def forced_path() -> str:
    """``FASTPREFIX_ATTENTION`` as ``"auto"``, ``"split"`` or ``"fused"`` (read now, not at import)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV} must be one of {_CHOICES} (or unset), got {os.environ[ENV]!r}")
    return value


def choose_path(q, k, key_padding_mask=None, causal=False, *, attn_bias=None, window=None,
                softcap=None) -> tuple[str, object, object]:
    """``("split", vendor op, key_padding_mask)`` or ``("fused", None, key_padding_mask)`` for this call, by
    the rule in the module docstring.

    On CUDA a padding mask with every key real (what transformers passes for an unpadded batch) is
    dropped before the choice (one host sync), as it hides nothing and would rule FlashAttention out.
    """
    forced = forced_path()
    if forced == "fused" or softcap is not None:
        return "fused", None, key_padding_mask
    arch = prefix_merge._arch_of(q)
    eligible = forced == "split" or (q.device.type == "cuda" and arch is not None and arch >= 80
                                     and q.dtype in (torch.float16, torch.bfloat16))
    if not eligible:
        return "fused", None, key_padding_mask
    if key_padding_mask is not None and q.device.type == "cuda" and bool(key_padding_mask.all()):
        key_padding_mask = None
    Sq, Sk = q.shape[2], k.shape[2]
    has_window = vendor_attention.effective_window(window, bool(causal), Sq, Sk) is not None
    op = vendor_attention.choose_op(q.device.type, arch, q.dtype, q.shape[-1], key_padding_mask is not None,
                                    bool(causal), Sq, Sk, bias_dtype=None if attn_bias is None else attn_bias.dtype,
                                    has_window=has_window)
    if op is None or q.shape[-1] > 128:
        return "fused", None, key_padding_mask
    if forced == "auto" and op != vendor_attention.FLASH and q.device.type == "cuda":
        return "fused", None, key_padding_mask  # the memory-efficient op only when forced (unmeasured)
    return "split", op, key_padding_mask


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, *, gate=None, gate_hidden=None, gate_weight=None,
                           gate_bias=None, layer_scale=None, key_padding_mask=None, causal=False, scale=None,
                           attn_bias=None, window=None, softcap=None):
    """Gated-prefix attention on the Triton backend; same contract as the reference
    (``fastprefix.reference.attention.gated_prefix_attention``): q ``[B, H, Sq, D]``, k, v ``[B, Hkv, Sk, D]``,
    prefix ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``, gate broadcastable to ``[B, Sq, L]`` or the APT gate inputs,
    key_padding_mask ``[B, Sk]``, attn_bias broadcastable to ``[B, H, Sq, Sk]``, window ``(left, right)``,
    softcap a number > 0 (see ``fastprefix.ops.gated_prefix_attention``); returns ``[B, H, Sq, D]``. Split
    or fused by :func:`choose_path`."""
    path, op, key_padding_mask = choose_path(q, k, key_padding_mask, causal, attn_bias=attn_bias, window=window,
                                             softcap=softcap)
    if path == "fused":
        # the features travel only when set: a plain call keeps the fused kernel's original signature
        features = dict(attn_bias=attn_bias, window=window, softcap=softcap)
        return fused.gated_prefix_attention(q, k, v, prefix_k, prefix_v, gate=gate, gate_hidden=gate_hidden,
                                            gate_weight=gate_weight, gate_bias=gate_bias, layer_scale=layer_scale,
                                            key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                                            **{n: x for n, x in features.items() if x is not None})
    gate = fused.gate_tensor(q, gate, gate_hidden, gate_weight, gate_bias, layer_scale)
    return prefix_merge.split_attention(q, k, v, prefix_k, prefix_v, gate=gate, key_padding_mask=key_padding_mask,
                                        causal=causal, scale=scale, attn_bias=attn_bias, window=window, op=op)
