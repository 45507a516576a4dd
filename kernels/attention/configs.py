"""Launch tables of the attention kernels: the fused kernel's (``fused.py``) and the split path's merge kernels'
(``split.py``), the config each launcher picks, and the configs ``kernels/fitness.py`` compiles ahead of time.

Configs are picked at call time from the device's compute capability and the dtype (no autotuning: it cannot run
on CPU); every entry a launcher can pick is compiled for its target by ``python -m fastprefix.kernels.fitness``,
which checks it for register spills and shared memory.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import triton.language as tl

from ..common.launch import FITNESS_DTYPES, TARGETS, LaunchConfig, numerics, signature_of

# ----------------------------------------------------------------------------------------- the fused kernel

_C = LaunchConfig
# Per GPU target, operand width, kernel and head-dim bucket. Targets: sm_80 (A100, 163 KB of shared
# memory per block), sm_86 (also sm_89: 99 KB) and sm_90 (227 KB). Every entry is compiled ahead of
# time for its target (fp16, bf16; fp32 for the fp32 table) by kernels/fitness.py, which checks it
# for register spills and shared memory. "fwd" is the forward without a gate, "fwd_gate" with one
# (the gate tile costs registers in the prefix loop only: it caps block_l, not the key tile; at
# D=128 a 32-wide gated prefix tile spilled 8 B next to 64-wide key tiles, a 16-wide one does not).
# dk/dv: the key tile (block_n = 64) sets how often Q and dO are re-read; the query tile only sets
# registers, and with three query-range loops a 32-row tile spilled (32 B at D=64, 4 B at D=128).
_CONFIGS_16BIT = {
    80: {
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 2)},
        "fwd_gate": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 16, 8, 2)},
        "bwd_dq": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        "bwd_dkdv": {64: _C(16, 64, 0, 4, 2), 128: _C(16, 64, 0, 8, 2)},
        "bwd_prefix": {64: _C(32, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
    86: {  # ptxas allocates differently for sm_86: at D=64, dq and dk/dv needed smaller tiles than on sm_80
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 2)},
        # 2 stages: with the fp32 gate tile a third stage needs 114,688 B, over sm_86/89's 99 KB
        "fwd_gate": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 64, 16, 8, 2)},
        "bwd_dq": {64: _C(128, 32, 32, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        "bwd_dkdv": {64: _C(16, 64, 0, 8, 2), 128: _C(16, 64, 0, 8, 2)},
        "bwd_prefix": {64: _C(32, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
    90: {
        "fwd": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 64, 8, 3)},
        "fwd_gate": {64: _C(128, 64, 64, 8, 3), 128: _C(128, 64, 16, 8, 3)},
        "bwd_dq": {64: _C(128, 64, 64, 8, 2), 128: _C(128, 32, 16, 8, 2)},
        # at D=128 every 64-key tile spilled on sm_90 (40-600 B, also (64, 64) with 2 stages)
        "bwd_dkdv": {64: _C(32, 64, 0, 8, 2), 128: _C(16, 32, 0, 4, 2)},
        "bwd_prefix": {64: _C(32, 64, 64, 8, 2), 128: _C(32, 32, 32, 8, 2)},
    },
}
# fp32 inputs: IEEE dots run on the FMA units with fp32 operands (twice the bytes of a 16-bit tile
# in shared memory and registers), hence their own, narrower tiles (the 16-bit tables at fp32 spilled
# ~36 KB and needed 164 KB of shared memory at D=128). The gated forward holds the gate tile beside the
# FMA operands: 32x32 tiles spilled 450 B at D=128, 16x16 ones do not. 16 warps cap a thread at 64
# registers (65,536 per SM): more warps do not help.
_FP32_DKDV = {  # ptxas spilled 4-80 B on the other targets' dk/dv tiles, at 110-255 registers
    80: {64: _C(32, 32, 0, 4, 1), 128: _C(32, 32, 0, 8, 1)},
    86: {64: _C(16, 32, 0, 4, 1), 128: _C(16, 32, 0, 8, 1)},
    90: {64: _C(32, 32, 0, 8, 1), 128: _C(32, 32, 0, 8, 1)},
}
_CONFIGS_FP32 = {
    target: {
        "fwd": {64: _C(64, 32, 32, 8, 2), 128: _C(32, 32, 32, 8, 1)},
        "fwd_gate": {64: _C(32, 32, 16, 4, 2), 128: _C(16, 16, 16, 4, 1)},
        "bwd_dq": {64: _C(32, 32, 32, 8, 1), 128: _C(32, 32, 32, 8, 1)},
        "bwd_dkdv": _FP32_DKDV[target],
        "bwd_prefix": {64: _C(32, 32, 32, 8, 1), 128: _C(16, 16, 16, 8, 1)},
    }
    for target in TARGETS
}
KINDS = ("fwd", "fwd_gate", "bwd_dq", "bwd_dkdv", "bwd_prefix")
# The interpreter runs programs one after another: few, moderately sized tiles are fastest, and
# BLOCK_N = 32, BLOCK_L <= 16 still split the test shapes into several prefix and key tiles.
_INTERPRETER_CONFIG = LaunchConfig(64, 32, 16, 4, 1)
# the backward's delta kernel, everywhere: 64 query rows x D fp32 products, 4 warps
DELTA_CONFIG = LaunchConfig(64, 0, 0, 4, 1)
# With attn_bias / window / softcap on, the kernels hold the bias tile and the cap's tanh terms too: at the
# default tables' 3 stages the sm_90 16-bit D=128 forward needs more shared memory than the GPU has. Two
# stages keep every feature variant within the limits (fitness --features checks); untuned for speed.
_FEATURE_MAX_STAGES = 2


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def target_of(arch: int) -> int:
    """The table a compute capability uses: sm_90+ -> 90, sm_80 / sm_87 (163 KB) -> 80, anything
    else (sm_86, sm_89 and older parts) -> 86, the table that fits 99 KB of shared memory."""
    if arch >= 90:
        return 90
    return 80 if arch in (80, 87) else 86


def pick_config(kind: str, block_d: int, arch: Optional[int], dtype: torch.dtype = torch.float16,
                features: bool = False) -> LaunchConfig:
    """Launch config of the fused kernel ``kind`` (one of KINDS) for head-dim tile ``block_d`` on compute
    capability ``arch`` (None: the interpreter) and input ``dtype`` (fp16/bf16, or fp32); ``features``: any
    of attn_bias / window / softcap is on (fewer pipeline stages, see ``_FEATURE_MAX_STAGES``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if arch is None:
        return _INTERPRETER_CONFIG
    table = _CONFIGS_16BIT if dtype in (torch.float16, torch.bfloat16) else _CONFIGS_FP32
    cfg = table[target_of(arch)][kind][_head_dim_bucket(block_d)]
    if features and cfg.num_stages > _FEATURE_MAX_STAGES:
        cfg = cfg._replace(num_stages=_FEATURE_MAX_STAGES)
    return cfg


# ------------------------------------------------------------------------------- the split path's merge kernels

# Per GPU family, kernel and head-dim bucket: (block_m, widest block_l); block_n unused. The prefix tile follows L
# up to that width. The backward holds the prefix tile, its two gradient accumulators and a query tile of q, dO
# and out at once: narrower tiles there.
_MERGE_CONFIGS = {
    80: {"fwd": {64: _C(128, 0, 64, 8, 2), 128: _C(64, 0, 32, 8, 2)},  # also sm_86/89 (their 64K registers spill more)
         "bwd_dq": {64: _C(32, 0, 64, 8, 2), 128: _C(32, 0, 32, 8, 2)},
         "bwd_prefix": {64: _C(32, 0, 64, 8, 2), 128: _C(32, 0, 32, 8, 2)}},
    90: {"fwd": {64: _C(128, 0, 64, 8, 2), 128: _C(64, 0, 64, 8, 2)},
         "bwd_dq": {64: _C(32, 0, 64, 8, 2), 128: _C(32, 0, 32, 8, 2)},
         "bwd_prefix": {64: _C(32, 0, 64, 8, 2), 128: _C(32, 0, 32, 8, 2)}},
}
MERGE_KINDS = ("fwd", "bwd_dq", "bwd_prefix")
# The interpreter runs programs one after another: few, large tiles are fastest, and 64 query rows
# still split the longer test shapes into several tiles (and the backward into two query splits).
_MERGE_INTERPRETER_CONFIG = LaunchConfig(64, 0, 64, 4, 1)


def pick_merge_config(kind: str, block_d: int, arch: Optional[int]) -> LaunchConfig:
    """Launch config of the merge kernel ``kind`` (one of MERGE_KINDS) on ``arch`` (None: the interpreter)."""
    if arch is None:
        return _MERGE_INTERPRETER_CONFIG
    return _MERGE_CONFIGS[90 if arch >= 90 else 80][kind][_head_dim_bucket(block_d)]


# --------------------------------------------------------------------------- ahead-of-time fitness (fitness.py)

# fitness-table name of each kind's fused kernel (all optional features on)
FITNESS_KERNELS = {"fwd": "fwd gate=none", "fwd_gate": "fwd gate=tensor", "bwd_dq": "bwd_dq gate",
                   "bwd_dkdv": "bwd_dkdv", "bwd_prefix": "bwd_prefix gate"}


def _table_pointers(adapters: bool, ptrs: dict, cx: dict):
    """Per-row adapters' arguments: the row index and the adapters' lengths as int64 pointers (``adapters``), else
    constexpr None, as the launchers pass them without a table."""
    if adapters:
        ptrs.update(PIDX="*i64", PLEN="*i64")
    else:
        cx.update(PIDX=None, PLEN=None)


def fused_fitness_configs(kernels: dict, features: bool = False, adapters: bool = False):
    """Every launch config the fused launchers can pick on sm_80, sm_86 and sm_90 for fp16, bf16 and fp32 at D in
    {64, 128}, with the P-Tuning v2 / APT features on (causal, padding, a gate where one exists) and the widest
    prefix tile the config allows; the issue #12 features (attn_bias, window, softcap) off, as the common path
    launches them. ``features=True`` (``fitness --features``): the same configs with every issue #12 feature on
    instead (a bias with its gradient, a window, the cap; named "...+features"), which share the default tiles.
    ``adapters=True`` (``fitness --adapters``): the kernels that read the prefix, with per-row adapters (a table
    read through an int64 row index, each adapter's length; named "...+adapters"), on the default tiles.

    ``kernels``: the fused module's ``@triton.jit`` kernels by kind, plus ``"bwd_delta"``."""
    floats = ("qk_hi", "qk_lo", "sc_hi", "sc_lo", "cap_hi", "cap_lo", "icap_hi", "icap_lo")
    off = dict(HAS_WINDOW=features, HAS_SOFTCAP=features, LIBDEVICE=True, INDEXED=adapters)  # + pointers below
    suffix = "+features" if features else "+adapters" if adapters else ""

    def spec(fn, ptrs, cx):
        # as launched on contiguous tensors: unit last-dim stride of the gate, 16-divisible row
        # strides and head dim (D in {64, 128}); lengths and the other strides stay generic.
        names = set(fn.arg_names)
        cx = {n: value for n, value in cx.items() if n in names}  # each kernel takes its own flags
        ones = {"stride_gl"} & names
        div16 = {n for n in names if re.fullmatch(r"stride_(q|k|v|pk|pv|do|dq|dk|dv|o)[bhmn]", n)} | {"D"}
        return signature_of(fn, ptrs, cx, floats, ones, div16)

    for arch in TARGETS:
        for torch_dtype, name in FITNESS_DTYPES:
            ptr, f32 = "*" + name, "*fp32"
            flags = dict(off, **numerics(torch_dtype, interpreter=False), EVEN_D=True)
            bias = dict(BIAS=ptr, DS=f32) if features else {}  # pointers; None (constexpr) without features
            for D in (64, 128):
                tag = f"sm{arch} {name} D{D}"
                for kind in KINDS:
                    if adapters and kind == "bwd_dkdv":
                        continue  # it never reads the prefix
                    cfg = pick_config(kind, D, arch, torch_dtype, features)
                    cx = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=D)
                    if kind in ("fwd", "fwd_gate"):
                        fn = kernels["fwd"]
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_GATE=kind == "fwd_gate", BLOCK_L=cfg.block_l,
                                  HAS_BIAS=features)
                        if kind == "fwd":
                            cx["GATE"] = None
                        ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "OUT")}
                        ptrs.update(KPM="*i1", LSE=f32)
                    elif kind == "bwd_dq":
                        fn = kernels["bwd_dq"]
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_GATE=True, BLOCK_L=cfg.block_l,
                                  HAS_BIAS=features, BIAS_GRAD=features)
                        ptrs = {n: ptr for n in ("Q", "K", "V", "PK", "PV", "GATE", "DO", "DQ")}
                        ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                    elif kind == "bwd_dkdv":
                        fn = kernels["bwd_dkdv"]
                        cx.update(IS_CAUSAL=True, HAS_PAD=True, HAS_BIAS=features)
                        ptrs = {n: ptr for n in ("Q", "K", "V", "DO", "DK", "DV")}
                        ptrs.update(KPM="*i1", LSE=f32, DELTA=f32)
                    else:
                        fn = kernels["bwd_prefix"]
                        cx.update(HAS_GATE=True)
                        ptrs = {n: ptr for n in ("Q", "PK", "PV", "GATE", "DO")}
                        ptrs.update(LSE=f32, DELTA=f32, DPK=f32, DPV=f32, DG=f32)
                    if kind != "fwd":
                        ptrs["GATE"] = f32  # gate_tensor hands every kernel the gate in the accumulator dtype
                    if features:  # the host folds causal into the window
                        ptrs.update(bias)
                        cx["IS_CAUSAL"] = False
                    else:
                        cx.update(BIAS=None, DS=None)
                    _table_pointers(adapters, ptrs, cx)
                    sig, cx, attrs = spec(fn, ptrs, cx)
                    yield (f"attn.{FITNESS_KERNELS[kind]}{suffix} {tag}", fn, sig, cx,
                           cfg.num_warps, cfg.num_stages, arch, attrs)
                if features or adapters:
                    continue  # the delta kernel has neither
                fn = kernels["bwd_delta"]
                cx = dict(BLOCK_M=DELTA_CONFIG.block_m, BLOCK_D=D, EVEN_D=True, ACC=tl.float32)
                sig, cx, attrs = spec(fn, dict(DO=ptr, OUT=ptr, DELTA=f32), cx)
                yield f"attn.bwd_delta {tag}", fn, sig, cx, DELTA_CONFIG.num_warps, DELTA_CONFIG.num_stages, arch, attrs


def merge_fitness_configs(kernels: dict, adapters: bool = False):
    """Every launch config the merge launchers can pick on sm_80, sm_86 and sm_90 for fp16 and bf16 at D in
    {64, 128}, with a gate and the widest prefix tile of the config. ``kernels``: the merge kernels by kind.
    ``adapters=True``: the same with per-row adapters (named "...+adapters"; see :func:`fused_fitness_configs`)."""
    floats = ("qk_hi", "qk_lo", "l2e_hi", "l2e_lo", "no_key_below", "sc_hi", "sc_lo")
    for arch in TARGETS:  # sm_86 stands for sm_86/89 (sm_80's tiles, 99 KB of shared memory)
        for torch_dtype, name in FITNESS_DTYPES[:2]:  # the split path runs 16-bit inputs only on a GPU
            ptr = "*" + name
            for D in (64, 128):
                tag = f"sm{arch} {name} D{D}"
                for kind in MERGE_KINDS:
                    kernel = kernels[kind]
                    cfg = pick_merge_config(kind, D, arch)
                    cx = dict(BLOCK_M=cfg.block_m, BLOCK_L=cfg.block_l, BLOCK_D=D, HAS_GATE=True, EVEN_D=True,
                              INDEXED=adapters, **numerics(torch_dtype, interpreter=False))
                    ptrs = {n: ptr for n in ("Q", "PK", "PV", "GATE", "OK", "OUT", "DO", "DQ")}
                    ptrs.update(GATE="*fp32", LSEK="*fp32", LSE="*fp32", DELTA="*fp32", DPK="*fp32", DPV="*fp32",
                                DG="*fp32")
                    _table_pointers(adapters, ptrs, cx)
                    names = set(kernel.arg_names)
                    ones = {"stride_gl", "stride_lkm"} & names
                    div16 = {n for n in names if n.startswith("stride_") and n[-1] in "bhmn" and n not in ones
                             and not n.startswith(("stride_g", "stride_lk"))} | {"D"}
                    ptrs = {n: t for n, t in ptrs.items() if n in names}
                    sig, cx, attrs = signature_of(kernel, ptrs, cx, floats, ones, div16)
                    yield (f"merge.{kind} gate{'+adapters' if adapters else ''} {tag}", kernel, sig, cx,
                           cfg.num_warps, cfg.num_stages, arch, attrs)
