"""``backend="triton"`` for the gated-prefix attention: the fused kernel, the split path or the concat path, per
call.

The path comes as an argument (``fastprefix.ops`` resolves None to ``FASTPREFIX_ATTENTION``, else ``"auto"``);
nothing here reads the environment. The rule (the one place it is written; the README repeats it):

1. ``softcap`` (Gemma 2's logit capping): the fused kernel, always, also when ``"split"`` or ``"concat"`` is asked
   for. No vendor op caps the logits, and no other path approximates: a forced path falls back to the fused kernel
   for the features the vendor ops lack.
2. ``"fused"`` forces the fused kernel (fused.py). ``"split"`` forces the split path (split.py) wherever a vendor
   op serves the call, the fused kernel elsewhere: vendor.py's ``choose_op`` (with ``attn_bias`` or a window that
   hides a key: PyTorch's fused CPU attention on CPU, the memory-efficient op on CUDA), and for padding alone on
   CUDA, or a packed row anywhere, the varlen op (varlen.py: FlashAttention-2's varlen ops on CUDA, their
   emulation on CPU) where its plan is exact (non-causal; causal with each row's real keys in one run). On CPU
   under ``TRITON_INTERPRET=1`` the split path runs PyTorch's fused CPU op (padded batches through its additive
   mask, packed rows through the emulated varlen op). ``"concat"`` forces the concat path (concat.py) where it
   serves the call: no gate or one gate row for every query (it folds into the prefix), no ``attn_bias``, no
   window; dense, padded (FlashAttention-2's varlen op on CUDA, with each causal row's real keys one run that
   starts no later than query 0's position + 1) or packed. What it does not serve falls back as ``"split"`` does:
   the split path where that serves the call, else the fused kernel.
3. ``"auto"``: the fused kernel on CPU (the interpreter), for fp32, and on GPUs before sm_80 (source ``"rule"``).
   For fp16 / bf16 on CUDA 8.0+ the candidates are the fused kernel, the split path where it runs
   FlashAttention-2 (dense or varlen; the memory-efficient op only when forced: unmeasured) and the concat path
   where it serves the call and the prefix is known (``choose_path``'s ``prefix_k``; without it the concat path,
   which the prefix and the gate decide, is not a candidate). Among them the rule takes the fastest by the
   **measured table** of the running GPU's compute capability (``benchmarks/results/<gpu>-dispatch.json``,
   written by ``make gpu``: table.py; source ``"table"``) where it covers the call's shape class (dtype, causal,
   dense / padded / packed, gate none / row / token, head dim bucket, GQA), else by the **cost model** (costs.py:
   the modelled forward + backward time at the class's model shape, B = 8, H = 32, S = 2048, L = 64; source
   ``"model"``).

No GPU run has been committed yet, so today every CUDA call takes the cost model's pick, stated as such:

| call (fp16 / bf16, CUDA 8.x / 9.x)                     | auto (model)         | ``split`` forced   | ``concat`` forced |
|--------------------------------------------------------|----------------------|--------------------|-------------------|
| no padding, no gate or one gate row, prefix known      | concat (FA-2)        | split (FA-2)       | concat (FA-2)     |
| no padding, a gate per query (APT token gate)          | split (FA-2)         | split (FA-2)       | split (FA-2)      |
| padded, non-causal, no gate / one row, prefix known    | concat (FA-2 varlen) | split (varlen)     | concat (varlen)   |
| padded, non-causal, a gate per query                   | split (FA-2 varlen)  | split (varlen)     | split (varlen)    |
| padded, causal, right padding, GQA, no gate / one row  | concat (FA-2 varlen) | split (varlen)     | concat (varlen)   |
| padded, causal, right padding, MHA or a per-query gate | fused                | split (varlen)     | split / concat    |
| padded, causal, real keys with holes                   | fused                | fused              | fused             |
| packed (``cu_seqlens``), no gate / one row             | concat (FA-2 varlen) | split (varlen)     | concat (varlen)   |
| packed, a gate per query                               | split (FA-2 varlen)  | split (varlen)     | split (varlen)    |
| ``attn_bias`` (q's dtype) or a window                  | fused                | split (efficient)  | split (efficient) |
| a float32 ``attn_bias``; ``softcap``                   | fused                | fused              | fused             |
| fp32, sm < 80, CPU (interpreter)                       | fused (rule)         | split (CPU op)     | concat (CPU op)   |

Per-row adapters (``prefix_index``, a table of adapters' prefixes) take the fused kernel or the split path, which
read each row's table row in place; the concat path would build every row's ``[prefix ; keys]``, so it does not
serve them (a forced ``"concat"`` falls back as ``"split"`` does).

(``choose_path`` / ``fastprefix.ops.attention_path`` without ``prefix_k`` leave the concat column out: the
first row is then split, the padded ones split (varlen) or fused as the model ranks split against fused.) A window
that hides no key arrives as none (``fastprefix.spec.effective_window``). On CUDA a padding mask with every key
real is dropped before the choice (one host sync). On every path the gate reaches the kernels as one tensor in the
accumulator dtype (``fused.gate_tensor``: APT's gate inputs become one GEMM + sigmoid per call, its gradient
through autograd); the concat path folds it into the prefix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...sequences import all_real
from ...spec import PATHS, AttentionSpec
from ..common.launch import arch_of
from . import concat, costs, fused, split, table, varlen, vendor

SOURCES = ("forced", "rule", "table", "model")


class Route(NamedTuple):
    """A call's path: ``path`` (``"fused"``, ``"split"``, ``"concat"``), the vendor ``op`` it runs (None for the
    fused kernel), the ``spec`` it runs with (an all-real padding mask dropped), ``source`` (one of
    :data:`SOURCES`: see the module docstring) and a varlen op's ``plan``."""

    path: str
    op: Optional[str]
    spec: AttentionSpec
    source: str
    plan: Optional[varlen.Plan] = None


def route(q, k, spec: AttentionSpec, path: str, prefix_k=None) -> Route:
    """The :class:`Route` of this call for ``path`` (one of ``fastprefix.spec.PATHS``), by the rule in the module
    docstring. ``prefix_k``: the call's prefix (``[Hkv, L, D]`` or ``[B, Hkv, L, D]``), without which the
    concat path is not considered.

    On CUDA a padding mask with every key real (what transformers passes for an unpadded batch) is dropped
    from the returned spec before the choice (one host sync), as it hides nothing and would rule
    FlashAttention out. A padded batch's or packed row's varlen plan is built here (memoised on the mask or
    ``cu_seqlens`` tensor: once per forward).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if spec.softcap is not None:
        return Route("fused", None, spec, "rule")
    if path == "fused":
        return Route("fused", None, spec, "forced")
    arch = arch_of(q)
    on_gpu = (q.device.type == "cuda" and arch is not None and arch >= 80
              and q.dtype in (torch.float16, torch.bfloat16))
    if path == "auto" and not on_gpu:
        return Route("fused", None, spec, "rule")
    if spec.key_padding_mask is not None and q.device.type == "cuda" and all_real(spec.key_padding_mask):
        spec = spec.replace(key_padding_mask=None)
    # a forced path builds only the options it may take (a plan is host work on a forward's first layer)
    concat_option = concat.concat_option(q, k, spec, arch, prefix_k) if path in ("auto", "concat") else None
    if path == "concat" and concat_option is not None:
        return Route("concat", concat_option[0], spec, "forced", concat_option[1])
    split_option = split.split_option(q, k, spec, arch)
    if path in ("split", "concat"):  # concat falls back as split does
        if split_option is None:
            return Route("fused", None, spec, "forced")
        return Route("split", split_option[0], spec, "forced", split_option[1])
    options = {"fused": (None, None)}
    if split_option is not None and split_option[0] in (vendor.FLASH, vendor.FLASH_VARLEN):
        options["split"] = split_option  # the memory-efficient op only when forced (unmeasured)
    if concat_option is not None:
        options["concat"] = concat_option
    if len(options) == 1:
        return Route("fused", None, spec, "rule")
    cls = table.shape_class(q, k, spec)
    measured = table.ranking(arch, cls)
    timed = [p for p in options if measured is not None and p in measured]
    if timed:
        best, source = min(timed, key=lambda p: (measured[p], costs.PATHS.index(p))), "table"
    else:
        best, source = costs.pick(table.model_shape(cls), options), "model"
    op, plan = options[best]
    return Route(best, op, spec, source, plan)


def choose_path(q, k, spec: AttentionSpec, path: str, prefix_k=None) -> tuple[str, object, AttentionSpec]:
    """``(path, vendor op, spec)`` of :func:`route`: ``("split", op, spec)``, ``("concat", op, spec)`` or
    ``("fused", None, spec)``."""
    chosen = route(q, k, spec, path, prefix_k=prefix_k)
    return chosen.path, chosen.op, chosen.spec


def gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec: AttentionSpec, path: str):
    """Gated-prefix attention on the Triton backend, by :func:`route`; the reference's contract
    (``fastprefix.ops.gated_prefix_attention``): q ``[B, H, Sq, D]``, k, v ``[B, Hkv, Sk, D]``, prefix
    ``[Hkv, L, D]`` or ``[B, Hkv, L, D]``, ``spec`` the call's :class:`fastprefix.spec.AttentionSpec`, ``path``
    one of ``fastprefix.spec.PATHS``; returns ``[B, H, Sq, D]``."""
    chosen = route(q, k, spec, path, prefix_k=prefix_k)
    if chosen.path == "fused":
        return fused.gated_prefix_attention(q, k, v, prefix_k, prefix_v, chosen.spec)
    if chosen.path == "split":
        return split.split_attention(q, k, v, prefix_k, prefix_v, chosen.spec, op=chosen.op, plan=chosen.plan)
    return concat.concat_attention(q, k, v, prefix_k, prefix_v, chosen.spec, op=chosen.op, plan=chosen.plan)
