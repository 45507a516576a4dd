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
