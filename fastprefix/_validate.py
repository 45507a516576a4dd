"""Input checks shared by the functional ops: one place that turns bad input into a clear ValueError."""

from __future__ import annotations

import torch


def tensor(name, x, shape, *, like=None, dtype=None):
    """Check that ``x`` is a tensor of ``shape`` (ints, or None for "any"), on ``like``'s device and dtype.

    ``shape`` is a tuple whose entries are ints or None; the message names the argument and the
    expected shape, e.g. ``prefix_k must have shape [Hkv=2, L, D=16], got [3, 4, 16]``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {fmt(shape)}, got {list(x.shape)}")
    if like is not None:
        same_device(name, x, like)
        if dtype is None and x.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but the other inputs are {like.dtype}; cast them to one dtype")
    if dtype is not None and x.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def floating(name, x):
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def same_device(name, x, like):
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {like.device}")


def fmt(shape):
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def named_fmt(pairs):
    """``[("B", 2), ("S", None)]`` -> ``[B=2, S]`` for messages that name every axis."""
    return "[" + ", ".join(n if v is None else f"{n}={v}" for n, v in pairs) + "]"


def named(name, x, axes, *, like=None, dtype=None):
    """Like :func:`tensor` with named axes: ``axes`` is a list of (axis name, expected size or None)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(axes) or any(v is not None and v != n for (_, v), n in zip(axes, x.shape)):
        raise ValueError(f"{name} must have shape {named_fmt(axes)}, got {list(x.shape)}")
    return tensor(name, x, tuple(v for _, v in axes), like=like, dtype=dtype)


def adept_ffn(weight, down_weight, down_bias, up_weight, up_bias):
    """ADePT's FFN ``A [d, r], a [r], B [r, d], b [d]`` against the table ``weight [V, d]``; returns r."""
    d = weight.shape[1]
    named("down_weight", down_weight, [("d", d), ("r", None)], like=weight)
    r = down_weight.shape[1]
    named("down_bias", down_bias, [("r", r)], like=weight)
    named("up_weight", up_weight, [("r", r), ("d", d)], like=weight)
    named("up_bias", up_bias, [("d", d)], like=weight)
    return r


def token_ids(name, ids, vocab_size, like, *, check_range=True):
    """``[B, S]`` integer ids in ``[0, vocab_size)``, on ``like``'s device.

    The range check is one min/max reduction (a host sync on GPU); ``check_range=False`` leaves it to
    whoever checks it next (the Triton launchers do, before any launch).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        got = f"{list(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape [B, S], got {got}")
    same_device(name, ids, like)
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"{name} must have B >= 1 and S >= 1, got shape {list(ids.shape)}")
    if not check_range:
        return ids
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} holds ids in [{lo}, {hi}] but the embedding table has {vocab_size} rows")
    return ids
