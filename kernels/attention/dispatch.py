"""``backend="triton"`` for the gated-prefix attention: the split path or the fused kernel, per call.

The path comes as an argument (``fastprefix.ops`` resolves None to ``FASTPREFIX_ATTENTION``, else ``"auto"``);
nothing here reads the environment. The rule (the one place it is written; the README repeats it):

1. ``softcap`` (Gemma 2's logit capping): the fused kernel, always, also when ``"split"`` is asked for. No
   vendor op caps the logits, and the split path never approximates: a forced split falls back to the fused
   kernel for the features the vendor ops lack.
2. ``"fused"`` forces the fused kernel (fused.py); ``"split"`` forces the split path (split.py) wherever a
   vendor op supports the call (vendor.py: ``choose_op``; with ``attn_bias`` or a ``window`` that hides a key
   that is PyTorch's fused CPU attention on CPU and the memory-efficient op on CUDA), the fused kernel
   elsewhere; on CPU under ``TRITON_INTERPRET=1`` the split path runs with PyTorch's fused CPU attention.
3. ``"auto"``: split for fp16 / bf16 on CUDA with compute capability 8.0 or newer where ``choose_op`` picks
   FlashAttention-2 (no padding mask: an all-real mask is dropped first; no ``attn_bias``; no window that
   hides a key), fused otherwise (fp32, padded batches on CUDA, a bias or a window, older GPUs, the
   interpreter).

| call                                            | auto                | ``split`` forced          |
|-------------------------------------------------|---------------------|---------------------------|
| fp16/bf16, CUDA 8.x/9.x, no mask/bias/window    | split (FlashAttn-2) | split (FlashAttention-2)  |
| ... with ``attn_bias`` (q's dtype) or a window  | fused               | split (memory-efficient)  |
| ... with a float32 ``attn_bias``                | fused               | fused                     |
| ... with only a padding mask                    | fused               | fused                     |
| ``softcap`` (any device, any dtype)             | fused               | fused                     |
| CPU (interpreter)                               | fused               | split (fused CPU op)      |

Step 3 is provisional: the GPU benchmark's numbers replace it as soon as they exist. The memory-efficient op
(a materialised ``[B|1, H|1, Sq, Sk]`` mask, K/V copied per query head under GQA) is unmeasured: only a forced
split takes it. A window that hides no key arrives as none (``fastprefix.spec.effective_window``), so such calls
keep FlashAttention-2. On both paths the gate reaches the kernels as one tensor in the accumulator dtype
(``fused.gate_tensor``: APT's gate inputs become one GEMM + sigmoid per call, its gradient through autograd).
"""

from __future__ import annotations

import torch

from ...spec import PATHS, AttentionSpec
from ..common.launch import arch_of
from . import fused, split, vendor


def choose_path(q, k, spec: AttentionSpec, path: str) -> tuple[str, object, AttentionSpec]:
    """``("split", vendor op, spec)`` or ``("fused", None, spec)`` for this call and ``path`` (one of
    ``fastprefix.spec.PATHS``), by the rule in the module docstring.

    On CUDA a padding mask with every key real (what transformers passes for an unpadded batch) is dropped
    from the returned spec before the choice (one host sync), as it hides nothing and would rule
    FlashAttention out.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "fused" or spec.softcap is not None:
        return "fused", None, spec
    arch = arch_of(q)
    eligible = path == "split" or (q.device.type == "cuda" and arch is not None and arch >= 80
                                   and q.dtype in (torch.float16, torch.bfloat16))
    if not eligible:
        return "fused", None, spec
    if spec.key_padding_mask is not None and q.device.type == "cuda" and bool(spec.key_padding_mask.all()):
        spec = spec.replace(key_padding_mask=None)
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[-1]
    op = vendor.choose_op(q.device.type, arch, q.dtype, D, spec.key_padding_mask is not None, spec.causal, Sq, Sk,
                          bias_dtype=None if spec.attn_bias is None else spec.attn_bias.dtype,
                          has_window=spec.window is not None)
    if op is None or D > 128:
        return "fused", None, spec
    if path == "auto" and op != vendor.FLASH and q.device.type == "cuda":
        return "fused", None, spec  # the memory-efficient op only when forced (unmeasured)
    return "split", op, spec


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, path: str):
    """Gated-prefix attention on the Triton backend, split or fused by :func:`choose_path`; the reference's
    contract (``fastprefix.ops.gated_prefix_attention``): q ``[B, H, Sq, D]``, k, v ``[B, Hkv, Sk, D]``, prefix
    ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``, ``spec`` the call's :class:`fastprefix.spec.AttentionSpec`, ``path``
    ``"auto"``, ``"fused"`` or ``"split"``; returns ``[B, H, Sq, D]``."""
    path, op, spec = choose_path(q, k, spec, path)
    if path == "fused":
        return fused.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec)
    return split.split_attention(q, k, v, prefix_k, prefix_v, spec, op=op)
