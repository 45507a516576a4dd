"""Numerical comparison helpers shared by the tests, and the attention paths called with the keyword arguments of
``fastprefix.gated_prefix_attention`` (the paths themselves take an :class:`fastprefix.spec.AttentionSpec`)."""

import torch

from fastprefix.kernels.attention import dispatch, fused, split
from fastprefix.reference import attention as reference
from fastprefix.spec import AttentionSpec, default_path


def rel_rms(x, ref):
    """Relative RMS error ``||x - ref|| / ||ref||`` computed in float64 (flash-linear-attention's measure)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_flash_rule(out, out_ref_same_dtype, out_ref_f64, *, floor, name="output"):
    """FlashAttention's rule: error vs float64 <= 2 x the PyTorch same-dtype error + floor."""
    err = (out.double() - out_ref_f64).abs().max().item()
    ref_err = (out_ref_same_dtype.double() - out_ref_f64).abs().max().item()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3e} > 2 x {ref_err:.3e} + {floor:.1e}"
    return err, ref_err


ATTENTION_INPUTS = ("q", "k", "v", "prefix_k", "prefix_v")  # the positional arguments of the attention ops


def attention_leaves(case, dtype, g):
    """``(randn, tensors)``: a leaf maker drawing from ``g`` and ``case``'s q, k, v, prefix_k, prefix_v.

    ``randn(*shape, std=1.0)`` draws float64 normals from ``g``, scales them, casts to ``dtype`` and makes a
    leaf that requires grad. q ``[B, H, Sq, D]``, k/v ``[B, Hkv, Sk, D]``, prefix_k/v ``[Hkv, L, D]`` when
    ``case.shared`` else ``[B, Hkv, L, D]``; drawn in that order, so later draws from ``g`` continue after them.
    """
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    B, H, Hkv, Sq, Sk, L, D = case.B, case.H, case.Hkv, case.Sq, case.Sk, case.L, case.D
    prefix_shape = (Hkv, L, D) if case.shared else (B, Hkv, L, D)
    return randn, dict(q=randn(B, H, Sq, D), k=randn(B, Hkv, Sk, D), v=randn(B, Hkv, Sk, D),
                       prefix_k=randn(*prefix_shape), prefix_v=randn(*prefix_shape))


def padding_mask(B, Sk, g):
    """``[B, Sk]`` bool key mask (True: a real key), about 30% padding drawn from ``g``.

    Row 0's last key is always padding, and with ``B > 1`` the last row is all padding: only the prefix
    is visible to it (the fully-masked-row case naive kernels turn into NaN).
    """
    mask = torch.rand(B, Sk, generator=g) > 0.3
    mask[0, -1] = False
    if B > 1:
        mask[-1] = False
    return mask


def gradcheck_attention(attention, tensors, kwargs, fast_mode):
    """float64 ``gradcheck`` of ``attention(q, k, v, prefix_k, prefix_v, **other tensors, **kwargs)``.

    Every tensor of ``tensors`` (a dict of leaves holding the :data:`ATTENTION_INPUTS`) is an input of the check.
    """
    names = list(tensors)

    def fn(*args):
        t = dict(zip(names, args))
        qkv = [t.pop(n) for n in ATTENTION_INPUTS]  # popped before **t is built
        return attention(*qkv, **t, **kwargs)

    return torch.autograd.gradcheck(fn, tuple(tensors.values()), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)


# ------------------------------------------------------------------- the attention paths, keyword arguments in


def spec_of(q, k, **kwargs):
    """The call's spec, from the keyword arguments of ``fastprefix.gated_prefix_attention`` (gate, gate_hidden, ...,
    key_padding_mask, causal, scale, attn_bias, window, softcap)."""
    return AttentionSpec.build(q, k, **kwargs)


def reference_attention(q, k, v, prefix_k, prefix_v, **kwargs):
    """The reference path (``fastprefix.reference.attention.gated_prefix_attention``)."""
    return reference.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs))


def fused_attention(q, k, v, prefix_k, prefix_v, out_layout="bhsd", **kwargs):
    """The fused Triton kernel (``fastprefix.kernels.attention.fused.gated_prefix_attention``)."""
    return fused.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), out_layout)


def split_attention(q, k, v, prefix_k, prefix_v, op=None, **kwargs):
    """The split path (``fastprefix.kernels.attention.split.split_attention``)."""
    return split.split_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), op=op)


def triton_attention(q, k, v, prefix_k, prefix_v, path=None, **kwargs):
    """The Triton backend's dispatch (``fastprefix.kernels.attention.dispatch``); ``path`` None: as ``fastprefix.ops``
    resolves it (``FASTPREFIX_ATTENTION``, else ``"auto"``)."""
    path = default_path() if path is None else path
    return dispatch.gated_prefix_attention(q, k, v, prefix_k, prefix_v, spec_of(q, k, **kwargs), path)


def choose_path(q, k, path=None, **kwargs):
    """``dispatch.choose_path`` for this call, ``path`` resolved as in :func:`triton_attention`."""
    return dispatch.choose_path(q, k, spec_of(q, k, **kwargs), default_path() if path is None else path)
