"""Issue #12's attention features: ``attn_bias``, ``window`` and ``softcap`` of ``gated_prefix_attention``.

Every path is checked against the package's explicit twin of the contract in float64
(``fastprefix.reference.attention.explicit_attention``, called through tests/helpers/numerics.py, itself checked
against the naive loops of tests/ops/test_reference.py): the logits of ``[gated prefix ; keys]`` concatenated, the
cap on all of them, the bias on the key columns, the padding / causal / window masks on the key columns, one
softmax. The reference path must match it to 1e-10 in float64 (output and every gradient, the bias's included; a
call with a bias or a softcap takes the twin itself, a window alone the SDPA paths); the fused Triton kernel
(Triton's interpreter) follows FlashAttention's rule in float32 (error vs float64 <= 2 x the PyTorch path's float32
error + a small floor) and passes float64 ``gradcheck``. Kernel outputs are NaN-poisoned
(FASTPREFIX_POISON_OUTPUTS=1). The cases are tests/helpers/cases.py's ``Case`` of the ``"features"`` family.
"""

import re

import pytest
import torch

import fastprefix
from helpers import cases
from helpers.cases import ids, make_inputs
from helpers.numerics import (FLOOR, assert_flash_rule_parts, explicit_attention, gradcheck_attention,
                              reference_attention, run, torch_backend, upcast)
from helpers.numerics import fused_attention as triton_attention

FLOOR32 = FLOOR[torch.float32]  # relative to the largest magnitude of the float64 result

Case = cases.maker("features")  # the bias named in the ids (full | heads | keys | none)


# A covering set: every bias shape, window and the cap several times, with GQA, padding, causal, the gates,
# S = 1, S past one tile (the interpreter's tiles are 64 queries x 32 keys), D = 16 and 64.
CASES = [
    Case(B=2, H=2, Hkv=1, Sq=65, Sk=65, L=5, bias="full", window=(2, 0), softcap=5.0, gate="dense", pad=True,
         causal=True),
    Case(B=2, H=2, Hkv=2, Sq=7, Sk=7, L=3, bias="heads", window=(1, 1), gate="fused", pad=True),
    Case(B=2, H=2, Hkv=1, Sq=7, Sk=40, L=5, D=64, bias="keys", window=(-1, 3), softcap=5.0, gate="pooled"),
    Case(B=1, H=2, Hkv=2, Sq=1, Sk=33, L=4, window=(2, 0), softcap=5.0, causal=True),
    Case(B=1, H=2, Hkv=1, Sq=130, Sk=130, L=5, bias="full", window=(2, 0), causal=True),
    Case(B=1, H=2, Hkv=1, Sq=100, Sk=100, L=3, bias="heads", window=(70, 70), softcap=5.0, gate="dense"),
    Case(B=2, H=2, Hkv=2, Sq=33, Sk=33, L=5, bias="keys", softcap=5.0, gate="fused", causal=True),
    Case(B=2, H=4, Hkv=1, Sq=33, Sk=33, L=4, D=64, bias="full", bias_grad=False, pad=True),
    Case(B=1, H=2, Hkv=2, Sq=9, Sk=70, L=2, window=(-1, 3), gate="dense", causal=True),
    Case(B=1, H=2, Hkv=1, Sq=40, Sk=40, L=3, window=(1, 1), softcap=2.0, pad=True),
    # a window alone keeps the reference on its SDPA paths (folded prefix; fused CPU attention + prefix merge)
    Case(B=2, H=2, Hkv=1, Sq=9, Sk=12, L=3, window=(2, 1), pad=True),
    Case(B=2, H=2, Hkv=2, Sq=12, Sk=12, L=3, window=(3, 0), gate="dense", causal=True),
]


def upcast_kwargs(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _assert_close(x, ref, tol, name):
    assert x.shape == ref.shape and x.dtype == ref.dtype, (name, x.shape, ref.shape, x.dtype, ref.dtype)
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (x - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.1e}"


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_reference_path_matches_explicit_float64(case):
    """fastprefix.gated_prefix_attention(backend="torch") = the contract, output and gradients, to 1e-10."""
    tensors, kwargs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    out, grads = run(torch_backend, tensors, kwargs, grad_out)
    out_x, grads_x = run(explicit_attention, tensors, kwargs, grad_out)
    _assert_close(out, out_x, 1e-10, f"{case.id} out")
    for name in tensors:
        _assert_close(grads[name], grads_x[name], 1e-10, f"{case.id} d{name}")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_triton_float32_follows_the_flash_rule(case):
    """The fused kernel in float32, forward and backward (the bias's gradient included), vs float64."""
    tensors, kwargs = make_inputs(case, torch.float32)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64).float()
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    ref = run(reference_attention, tensors, kwargs, grad_out)
    ref64 = run(explicit_attention, upcast(tensors), upcast_kwargs(kwargs), grad_out.double())
    assert all(x.dtype == torch.float32 for x in (out, *grads.values())), [x.dtype for x in (out, *grads.values())]
    assert_flash_rule_parts((out, grads), ref, ref64, floor=FLOOR32, name=case.id)


GRADCHECK_CASES = [  # (case, fast_mode): fast mode checks random projections of the full Jacobian
    (Case(B=1, H=1, Hkv=1, Sq=2, Sk=3, L=1, D=2, bias="heads", softcap=2.0, window=(1, 0)), False),
    (Case(B=1, H=2, Hkv=1, Sq=3, Sk=5, L=2, D=4, bias="full", window=(1, 1), softcap=3.0, gate="dense", pad=True),
     True),
    (Case(B=2, H=1, Hkv=1, Sq=3, Sk=4, L=2, D=4, bias="keys", window=(1, 0), gate="fused", causal=True), True),
    (Case(B=2, H=2, Hkv=1, Sq=1, Sk=4, L=2, D=4, bias="full", window=(-1, 3), softcap=2.0, gate="pooled"), True),
]


@pytest.mark.parametrize("case,fast_mode", GRADCHECK_CASES, ids=ids(GRADCHECK_CASES))
def test_triton_gradcheck_float64(case, fast_mode):
    tensors, kwargs = make_inputs(case, torch.float64)
    assert "attn_bias" in tensors
    assert gradcheck_attention(triton_attention, tensors, kwargs, fast_mode)


def test_frozen_bias_gets_no_gradient_work(monkeypatch):
    """A bias without requires_grad: the backward writes no dS and returns no bias gradient."""
    from fastprefix.kernels.attention import fused as kernel_module

    seen = []
    backward = kernel_module._backward

    def spy(*args):
        seen.append(args[9])  # bias_grad
        return backward(*args)

    monkeypatch.setattr(kernel_module, "_backward", spy)
    case = Case(B=1, H=2, Hkv=1, Sq=5, Sk=6, L=2, bias="full", bias_grad=False, window=(1, 1))
    tensors, kwargs = make_inputs(case, torch.float64)
    out = triton_attention(*(tensors[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")), **kwargs)
    out.sum().backward()
    assert seen == [False] and kwargs["attn_bias"].grad is None


def test_zero_gate_and_hidden_keys_stay_finite():
    """A zero gate under the cap, every real key hidden by the window or padding: the prefix alone, no NaN."""
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    kw = dict(gate=torch.zeros(2, 4, 3), key_padding_mask=mask, window=(0, 0), softcap=5.0,
              attn_bias=torch.randn(2, 2, 4, 6))
    out = triton_attention(q, k, v, pk, pv, **kw)
    expected = explicit_attention(*(x.double() for x in (q, k, v, pk, pv)), **upcast_kwargs(kw))
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() <= 1e-5
    assert out[1].abs().max() == 0  # every key hidden, the prefix carries no value under a zero gate


def _args(B=2, H=2, Sq=3, Sk=4, D=8, L=2, dtype=torch.float32):
    return (torch.randn(B, H, Sq, D, dtype=dtype), torch.randn(B, H, Sk, D, dtype=dtype),
            torch.randn(B, H, Sk, D, dtype=dtype), torch.randn(H, L, D, dtype=dtype), torch.randn(H, L, D, dtype=dtype))


@pytest.mark.parametrize("bias,message", [
    (torch.zeros(2, 2, 3, 5), r"attn_bias must be a floating tensor broadcastable to \[B=2, H=2, Sq=3, Sk=4\].*"
                              r"got shape \[2, 2, 3, 5\]"),
    (torch.zeros(1, 2, 2, 3, 4), r"attn_bias must be .* got shape \[1, 2, 2, 3, 4\]"),
    (torch.zeros(3, 1, 1, 4), r"attn_bias must be .* got shape \[3, 1, 1, 4\]"),
    (torch.zeros(2, 2, 3, 4, dtype=torch.int64), r"attn_bias must be .* got dtype torch.int64"),
    (torch.zeros(2, 2, 3, 4, dtype=torch.float64), r"attn_bias must have q's dtype \(torch.float32\) or "
                                                    r"torch.float32, got torch.float64"),
    (torch.zeros(2, 2, 3, 4, device="meta"), r"attn_bias is on meta but the other inputs are on cpu"),
    ([[0.0]], r"attn_bias must be .* got list"),
], ids=["wrong-Sk", "five-dims", "wrong-B", "int", "float64", "device", "list"])
def test_bad_attn_bias_is_refused(bias, message):
    with pytest.raises(ValueError, match=message):
        fastprefix.gated_prefix_attention(*_args(), attn_bias=bias, backend="torch")


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (1, -2), (1.0, 2), (True, 0), 3, "ab", [0, None]],
                         ids=["one", "three", "below-minus-one", "float", "bool", "int", "str", "none-inside"])
def test_bad_window_is_refused(window):
    with pytest.raises(ValueError, match=r"window must be None or a \(left, right\) pair of ints, each >= 0 or -1 "
                                         r"\(unbounded\), got " + re.escape(repr(window))):
        fastprefix.gated_prefix_attention(*_args(), window=window, backend="torch")


@pytest.mark.parametrize("softcap", [0, -1.0, float("inf"), float("nan"), True, "5", torch.tensor(5.0)],
                         ids=["zero", "negative", "inf", "nan", "bool", "str", "tensor"])
def test_bad_softcap_is_refused(softcap):
    with pytest.raises(ValueError, match=r"softcap must be None or a finite number > 0, got"):
        fastprefix.gated_prefix_attention(*_args(), softcap=softcap, backend="torch")


def test_float32_bias_on_half_inputs():
    """attn_bias may be float32 under fp16 inputs; its gradient comes back float32 (Triton and torch paths)."""
    case = Case(B=1, H=2, Hkv=1, Sq=33, Sk=33, L=3, bias="full", window=(4, 0), softcap=5.0, causal=True)
    tensors, kwargs = make_inputs(case, torch.float16)
    tensors["attn_bias"] = tensors["attn_bias"].detach().float().requires_grad_()
    grad_out = torch.randn(1, 2, 33, 16, dtype=torch.float64).half()
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    out_torch, grads_torch = run(reference_attention, tensors, kwargs, grad_out)
    ref64 = run(explicit_attention, upcast(tensors), upcast_kwargs(kwargs), grad_out.double())
    assert grads["attn_bias"].dtype == grads_torch["attn_bias"].dtype == torch.float32
    assert_flash_rule_parts((out, grads), (out_torch, grads_torch), ref64, floor=2e-4, name=case.id)
