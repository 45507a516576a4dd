"""Host-side launch helpers shared by every op's launchers: the device's compute capability, the numerics
constexprs, tile widths, strides, grids, launch options, the deterministic reduction of per-program partials,
and how a launch specialises a kernel (``signature_of``, for the ahead-of-time compiles of fitness.py).

Queried at call time (never at import), so the package imports on a machine without a GPU.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .runtime import interpreting

# Explicit on every launch (Triton 3.10 flips the default to off): FMA contraction on, the numerics every fitness
# figure and error bound of the kernels was measured with.
FP_FUSION = True
# the compute capabilities the launch tables are written (and checked fit) for: sm_86 stands for sm_86/89
TARGETS = (80, 86, 90)
# the input dtypes whose launches the fitness check compiles, with their Triton pointer names
FITNESS_DTYPES = ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32"))


class LaunchConfig(NamedTuple):
    """Tiles and launch options of one kernel, the one entry type of every launch table.

    block_m: the rows a program owns (query rows; tokens or positions for the embedding kernels). block_n: its
    second tile (key rows of the attention; the d chunk of the embedding kernels; 0 where unused). block_l: the
    widest prefix tile (the attention kernels use ``prefix_tile(L, block_l)``; 0 where the kernel has none).
    """
    block_m: int
    block_n: int
    block_l: int
    num_warps: int
    num_stages: int


def options(cfg: LaunchConfig) -> dict:
    """The launch options of ``cfg``: warps, stages and ``enable_fp_fusion=FP_FUSION`` (every launch sets it)."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)


def arch_of(t: torch.Tensor) -> Optional[int]:
    """Compute capability of ``t``'s device as 80/86/90/...; None under Triton's interpreter or off CUDA (the
    launch tables then give the interpreter's config). Queried at call time."""
    if t.device.type != "cuda" or interpreting():
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def numerics(dtype: torch.dtype, interpreter: Optional[bool] = None) -> dict:
    """The constexprs ``ACC`` (accumulator), ``DOT`` (the operand dtype fed to ``tl.dot``) and ``PREC`` (its
    ``input_precision``) of inputs in ``dtype``, for the interpreter (``interpreter=None``: as now).

    The interpreter has no bf16 arithmetic: bf16 operands are upcast to fp32 there. fp32 ``tl.dot`` defaults to
    TF32 on GPU, so fp32 / fp64 operands ask for IEEE products; 16-bit operands ignore ``PREC``."""
    if interpreter is None:
        interpreter = interpreting()
    dot = _TL_DTYPES.get(dtype, tl.float32)
    if dot == tl.bfloat16 and interpreter:
        dot = tl.float32
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, DOT=dot,
                PREC="ieee" if dot in (tl.float32, tl.float64) else "tf32")


def block_d(n: int) -> int:
    """The tile covering n columns (head dim D, rank r): the next power of two, at least 16 (``tl.dot``'s minimum);
    the kernels mask the columns past n."""
    return max(16, triton.next_power_of_2(n))


def prefix_tile(L: int, cap: int) -> int:
    """BLOCK_L: the prefix's own tile, max(16, next_pow2(L)) up to the config's cap (longer prefixes loop)."""
    return min(cap, max(16, triton.next_power_of_2(L)))


def rows_per_split(Sq: int, block_m: int, programs: int, like: torch.Tensor) -> int:
    """Query rows per program of a prefix-gradient kernel (a multiple of block_m). On GPU the query range
    is split until there are about two programs per SM (at most 16 splits); the interpreter splits in two
    whenever it can, so the tests cover the split reduction."""
    tiles = triton.cdiv(Sq, block_m)
    if like.device.type == "cuda":
        sms = torch.cuda.get_device_properties(like.device).multi_processor_count
        splits = min(16, max(1, triton.cdiv(2 * sms, programs)))
    else:
        splits = 2
    return triton.cdiv(tiles, min(splits, tiles)) * block_m


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """Kernels address the last dim with unit stride; everything else goes through strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def split_float(c: float) -> tuple:
    """c as fp32 high and low parts, so an fp32 kernel can multiply by c to near-fp64 accuracy (``jit.scaled``)."""
    hi = float(torch.tensor(c, dtype=torch.float32))
    return hi, c - hi


def prefix_strides(p: torch.Tensor) -> tuple:
    """(batch, head, row) strides; batch stride 0 for a prefix [Hkv, L, D] shared by the batch."""
    return (0, p.stride(0), p.stride(1)) if p.dim() == 3 else tuple(p.stride()[:3])


def table_args(prefix_k: torch.Tensor, prefix_index, prefix_lengths) -> tuple:
    """(PIDX, PLEN, INDEXED) the kernels take for per-row adapters (``fastprefix.spec.AttentionSpec``): the rows'
    index ``[B]`` into the table ``prefix_k [A, Hkv, L, D]`` and each adapter's length ``[A]`` (``L`` for every one
    when ``prefix_lengths`` is None); (None, None, False) without an index."""
    if prefix_index is None:
        return None, None, False
    if prefix_lengths is None:
        prefix_lengths = torch.full((prefix_k.shape[0],), prefix_k.shape[-2], dtype=torch.int32,
                                    device=prefix_k.device)
    return prefix_index, prefix_lengths, True


def gate_strides(gate: Optional[torch.Tensor], B: int, Sq: int, L: int) -> tuple:
    """(batch, query, prefix) strides of a gate broadcastable to [B, Sq, L]: broadcast dims get stride 0."""
    return (0, 0, 0) if gate is None else tuple(gate.expand(B, Sq, L).stride())


def folded_grid(tiles: int, rows: int, *rest: int) -> tuple:
    """(tiles * rows, *rest): grid axis 0 folds the tile index and batch * heads (the kernels decode it, the tile
    index fastest); axes 1 and 2 (CUDA caps them at 65,535) only get the small ``rest``."""
    programs = tiles * rows
    if programs >= 2 ** 31:
        raise ValueError(f"{tiles} tiles x {rows} batch*heads = {programs} programs exceed the 2^31 - 1 grid limit")
    return (programs, *rest)


def reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc, prefix_index=None):
    """The prefix-gradient kernels' partials, summed by torch in a fixed order (deterministic, no atomics):
    dpk, dpv [splits, B, Hkv, L, D] over query splits (and over the batch for a shared prefix, or over each
    adapter's rows for a table ``[A, Hkv, L, D]`` read through ``prefix_index [B]``: ``index_add_``, which on CUDA is
    deterministic under ``torch.use_deterministic_algorithms``), the gate's [B, Hkv, Sq, L] over kv heads. Returns
    dprefix_k, dprefix_v in the prefix dtypes and dgate [B, Sq, L] in ``acc`` (an empty tensor without a gate)."""
    dpk, dpv = dpk.sum(0), dpv.sum(0)
    if prefix_index is not None:  # rows -> their adapters' table rows
        dpk, dpv = (d.new_zeros((prefix_k.shape[0], *d.shape[1:])).index_add_(0, prefix_index, d) for d in (dpk, dpv))
    elif prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    dg = dg.sum(1) if dg is not None else q.new_empty((0,), dtype=acc)
    return dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), dg


# --------------------------------------------------------- ahead of time (fitness.py and the configs modules)


def signature_of(fn, pointers: dict, constexprs: dict, floats: Iterable[str] = (), ones: Iterable[str] = (),
                 multiples_of_16: Iterable[str] = ()):
    """(signature, constexprs, attrs) for ASTSource, specialised as Triton's launcher would:
    pointers are 16-byte aligned; `ones` (unit strides) become constexpr 1; `multiples_of_16`
    (row strides, head dims) get the divisibility hint. "fp32" for `floats`, "i32" otherwise."""
    floats, ones, div16 = set(floats), set(ones), set(multiples_of_16)
    constexprs = dict(constexprs, **{name: 1 for name in ones})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs
