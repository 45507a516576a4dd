"""Numerical comparison helpers shared by the tests."""

import torch


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
