"""Launcher helpers shared by the attention kernels (fused: gated_prefix_attention.py; split: prefix_merge.py).

Host-side only: strides, tile widths, dtypes and the deterministic reduction of per-program partials.
Queried at call time (never at import), so the package imports on a machine without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton


def arch_of(t: torch.Tensor) -> Optional[int]:
    """Compute capability as 80/90/..., queried at call time; None for the CPU interpreter."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def acc_torch_dtype(q: torch.Tensor) -> torch.dtype:
    """The accumulator dtype: fp64 only for fp64 inputs (gradcheck), fp32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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
    """c as fp32 high and low parts, so an fp32 kernel can multiply by c to near-fp64 accuracy."""
    hi = float(torch.tensor(c, dtype=torch.float32))
    return hi, c - hi


def prefix_strides(p: torch.Tensor) -> tuple:
    """(batch, head, row) strides; batch stride 0 for a prefix [Hkv, L, D] shared by the batch."""
    return (0, p.stride(0), p.stride(1)) if p.dim() == 3 else tuple(p.stride()[:3])


def gate_strides(gate: Optional[torch.Tensor], B: int, Sq: int, L: int) -> tuple:
    """(batch, query, prefix) strides of a gate broadcastable to [B, Sq, L]: broadcast dims get stride 0."""
    return (0, 0, 0) if gate is None else tuple(gate.expand(B, Sq, L).stride())


def reduce_prefix_partials(dpk, dpv, dg, prefix_k, prefix_v, q, acc):
    """The prefix-gradient kernels' partials, summed by torch in a fixed order (deterministic, no atomics):
    dpk, dpv [splits, B, Hkv, L, D] over query splits (and over the batch for a shared prefix), the gate's
    [B, Hkv, Sq, L] over kv heads. Returns dprefix_k, dprefix_v in the prefix dtypes and dgate [B, Sq, L]
    in ``acc`` (an empty tensor without a gate)."""
    dpk, dpv = dpk.sum(0), dpv.sum(0)
    if prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    dg = dg.sum(1) if dg is not None else q.new_empty((0,), dtype=acc)
    return dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), dg
