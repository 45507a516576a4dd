"""Launch tables of the prompt-embedding kernels (``fused.py``), the config each launcher picks, and the configs
``kernels/fitness.py`` compiles ahead of time.

Fixed per kernel (no autotuning: it cannot run on CPU). ``block_m`` is BLOCK_T (the tokens or positions of a
program; for the table gradient the chunk of sorted tokens one program sums serially, see
``fused._segment_sum_rows``), ``block_n`` the widest BLOCK_D (the d chunk).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common.launch import FITNESS_DTYPES, TARGETS, LaunchConfig, block_d, numerics, signature_of

_C = LaunchConfig
# Per kernel, for 16-bit inputs (tensor-core dots) and for fp32 (IEEE dots run on FMA units and hold more
# registers, hence narrower tiles). The largest tile needs 24 KiB of shared memory, so one table serves sm_80,
# sm_86/89 and sm_90; fitness_configs() below compiles every entry for all three: no spills for r <= 64. The
# ADePT kernels take 64 tokens per tile: A and B are re-read once per tile (at d=4096, r=64, 16k tokens: 512 MB
# of L2 reads with 32-token tiles, 256 MB with 64).
_GPU_TILES_16BIT = {
    "adept_fwd": _C(64, 64, 0, 4, 2),
    "adept_bwd_token": _C(64, 32, 0, 8, 2),
    "adept_bwd_param": _C(64, 64, 0, 8, 2),
    "dept_fwd": _C(32, 64, 0, 4, 2),
    "dept_bwd": _C(32, 64, 0, 4, 1),
    "segment_sum": _C(64, 256, 0, 4, 1),
}
_GPU_TILES_FP32 = {
    "adept_fwd": _C(64, 32, 0, 8, 2),
    "adept_bwd_token": _C(32, 32, 0, 8, 2),
    "adept_bwd_param": _C(32, 16, 0, 8, 1),
    "dept_fwd": _C(32, 32, 0, 4, 2),
    "dept_bwd": _C(32, 32, 0, 8, 1),
    "segment_sum": _C(64, 256, 0, 4, 1),
}
KERNELS = tuple(_GPU_TILES_16BIT)
# Interpreter: each program runs as numpy ops, so few large tiles are fastest; the table gradient takes short
# chunks, so the tests' repeated ids span several (the level-2 path).
_INTERPRETER_CONFIG = _C(32, 256, 0, 4, 1)
_INTERPRETER_SEGMENT_CHUNK = 4


def pick_config(kernel: str, dtype: torch.dtype, arch: Optional[int], d: int) -> LaunchConfig:
    """Launch config of ``kernel`` (one of KERNELS) for inputs of ``dtype`` and width ``d`` on compute capability
    ``arch`` (None: the interpreter); BLOCK_D (``block_n``) at most ``block_d(d)``."""
    if arch is None:
        cfg = _INTERPRETER_CONFIG
        if kernel == "segment_sum":
            cfg = cfg._replace(block_m=_INTERPRETER_SEGMENT_CHUNK)
    else:
        cfg = (_GPU_TILES_16BIT if dtype in (torch.float16, torch.bfloat16) else _GPU_TILES_FP32)[kernel]
    return cfg._replace(block_n=min(cfg.block_n, block_d(d)))


# --------------------------------------------------------------------------- ahead-of-time fitness (fitness.py)

# Integer arguments that are multiples of 16 whenever d is (the width and the row strides).
_MULTIPLES_OF_16 = ("d", "stride_w", "stride_p", "stride_gb", "stride_gs", "stride_sb", "stride_ss", "stride_o")


def fitness_configs(kernels: dict):
    """Every launch config the launchers can pick on sm_80, sm_86 and sm_90 for fp16, bf16 and fp32 inputs.

    d only enters through BLOCK_D = min(tile, next_power_of_2(d)), which is the same tile for every
    d >= 64 (d = 384, 768 and 4096 share one compiled config); BLOCK_R = max(16, next_power_of_2(r))
    covers r up to 64 with 16, 32 and 64. Optional features are on (dropout mask, table gradient),
    plus the inference forward without a mask. Like Triton's launcher for these d, the width and the row
    strides (all multiples of d) carry the divisibility-by-16 hint; the same configs were also checked
    without any hint (a width that is not a multiple of 16): no spills either.

    ``kernels``: fused.py's ``@triton.jit`` kernels by name (KERNELS, the table gradient's two as
    ``segment_sum_chunk`` and ``segment_sum_carry``).
    """
    for arch in TARGETS:
        for dtype, dname in FITNESS_DTYPES:
            ptr = "*" + dname
            tag = f"sm{arch} {dname} d384/768/4096"

            def config(kernel, fn, ptrs, block_r, floats=(), **flags):
                cfg = pick_config(kernel, dtype, arch, 4096)
                tiles = dict(BLOCK_D=cfg.block_n) if kernel == "segment_sum" else dict(BLOCK_T=cfg.block_m,
                                                                                        BLOCK_D=cfg.block_n)
                cx = dict(numerics(dtype, interpreter=False), **tiles, **flags)
                if block_r is not None:
                    cx["BLOCK_R"] = block_r
                cx = {k: v for k, v in cx.items() if k in fn.arg_names}
                sig, cx, attrs = signature_of(fn, ptrs, cx, floats, multiples_of_16=_MULTIPLES_OF_16)
                return fn, sig, cx, cfg.num_warps, cfg.num_stages, arch, attrs

            for block_r in (16, 32, 64):
                for dropout in (False, True):
                    fn = kernels["adept_fwd"]
                    ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                    ptrs["ids_ptr"] = "*i64"
                    flags = dict(HAS_DROPOUT=dropout) if dropout else dict(HAS_DROPOUT=False, mask_ptr=None)
                    yield (f"emb.adept_fwd{' dropout' if dropout else ''} r{block_r} {tag}",
                           *config("adept_fwd", fn, ptrs, block_r, **flags))

                fn = kernels["adept_bwd_token"]
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(ids_ptr="*i64", dbias_part_ptr="*fp32", dx_ptr="*fp32")
                yield (f"emb.adept_bwd_token dropout dx r{block_r} {tag}",
                       *config("adept_bwd_token", fn, ptrs, block_r, HAS_DROPOUT=True, NEED_DX=True))

                fn = kernels["adept_bwd_param"]
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(ids_ptr="*i64", d_down_w_part_ptr="*fp32", d_up_w_part_ptr="*fp32",
                            d_up_b_part_ptr="*fp32")
                yield f"emb.adept_bwd_param r{block_r} {tag}", *config("adept_bwd_param", fn, ptrs, block_r)

                fn = kernels["dept_fwd"]
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs["ids_ptr"] = "*i64"
                yield f"emb.dept_fwd r{block_r} {tag}", *config("dept_fwd", fn, ptrs, block_r, floats=("scaling",))

                fn = kernels["dept_bwd"]
                ptrs = {n: ptr for n in fn.arg_names if n.endswith("_ptr")}
                ptrs.update(d_lora_a_part_ptr="*fp32", d_lora_b_part_ptr="*fp32")
                yield f"emb.dept_bwd r{block_r} {tag}", *config("dept_bwd", fn, ptrs, block_r, floats=("scaling",))

            fn = kernels["segment_sum_chunk"]
            for src, src_name in (("*fp32", "adept"), (ptr, "dept")):
                ptrs = dict(sorted_ptr="*i64", order_ptr="*i64", src_ptr=src, out_ptr=ptr, head_ptr="*fp32",
                            tail_ptr="*fp32")
                yield f"emb.table_grad {src_name} {tag}", *config("segment_sum", fn, ptrs, None)
            fn = kernels["segment_sum_carry"]
            ptrs = dict(sorted_ptr="*i64", run_end_ptr="*i64", out_ptr=ptr, head_ptr="*fp32", tail_ptr="*fp32")
            yield f"emb.table_grad carry {tag}", *config("segment_sum", fn, ptrs, None)
