"""Device-side ``@triton.jit`` helpers shared by the kernels of several ops (inlined into each kernel)."""

import triton
import triton.language as tl


@triton.jit
def scaled(x, hi, lo, ACC: tl.constexpr):
    """x * c for a host constant c = hi + lo split into fp32 parts (``launch.split_float``): scalar kernel
    arguments are fp32, so fp64 accumulation (gradcheck) adds the low part to keep c exact."""
    if ACC == tl.float64:
        return x * hi + x * lo  # promoted to fp64
    return x * hi


@triton.jit
def prefix_of(PIDX, PLEN, b, L, INDEXED: tl.constexpr):
    """(row of the prefix tensor as int64, prefix length) of batch row b. Per-row adapters (INDEXED): the table
    row PIDX[b] and that adapter's length PLEN[PIDX[b]] (its later slots are hidden); else b itself (a shared
    prefix has batch stride 0) and L."""
    if INDEXED:
        a = tl.load(PIDX + b).to(tl.int64)
        n = tl.load(PLEN + a).to(tl.int32)
    else:
        a = b.to(tl.int64)
        n = L
    return a, n


@triton.jit
def shift_of(m, MAY_BE_EMPTY: tl.constexpr):
    """The running max the exponentials subtract: m, or 0 where m is still -inf (a row that has seen no key yet,
    possible only when an adapter's prefix is empty), so exp2(-inf - shift) is 0, never NaN."""
    if MAY_BE_EMPTY:
        m = tl.where(m == float("-inf"), 0.0, m)
    return m
