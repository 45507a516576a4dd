"""What every launcher asks of the runtime: are we in Triton's interpreter, and how to allocate outputs.

Imports no Triton: ``fastprefix.ops`` asks :func:`interpreting` also where Triton is not installed.
"""

import os

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors; no bf16 arithmetic)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison_outputs() -> bool:
    """Tests set ``FASTPREFIX_POISON_OUTPUTS=1``: kernel-written buffers then start as NaN, so an element a
    kernel forgets to write fails the comparison instead of silently holding stale memory."""
    return os.environ.get("FASTPREFIX_POISON_OUTPUTS", "0") == "1"


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel fills: uninitialised, or NaN under :func:`poison_outputs`."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
