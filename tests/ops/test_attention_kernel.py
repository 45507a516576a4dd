"""The Triton gated-prefix attention (run by Triton's interpreter on CPU) against the reference.

FlashAttention's rule for every output and gradient: error vs a float64 reference <= 2 x the error of
the PyTorch reference in the same dtype + a small floor. Kernel outputs are NaN-poisoned before launch
(FASTPREFIX_POISON_OUTPUTS=1), so any element a kernel fails to write shows up as non-finite. The case sweep
(``CASES``, ``GRADCHECK_CASES``) lives in tests/helpers/cases.py: tests/ops/test_split_attention.py runs it too.
"""

import pytest
import torch

from fastprefix.kernels.attention import configs
from helpers.cases import CASES, GRADCHECK_CASES, Case, ids, make_inputs
from helpers.numerics import (FLOOR, assert_flash_rule_parts, assert_runs_match, gradcheck_attention,
                              reference_attention, run, upcast)
from helpers.numerics import fused_attention as triton_attention


def check_against_reference(case, dtype):
    tensors, kwargs = make_inputs(case, dtype)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64).to(dtype)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    out_ref, grads_ref = run(reference_attention, tensors, kwargs, grad_out)
    ref64 = run(reference_attention, upcast(tensors), kwargs, grad_out.double())
    assert out.dtype == dtype and out.shape == out_ref.shape
    return assert_flash_rule_parts((out, grads), (out_ref, grads_ref), ref64, floor=FLOOR[dtype], name=case.id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype)


def test_bf16_forward_backward():
    """bf16 inputs (upcast to fp32 inside the kernels under the interpreter)."""
    check_against_reference(Case(B=2, H=2, Hkv=1, Sq=33, Sk=33, L=5, D=32, gate="dense", pad=True, causal=True),
                            torch.bfloat16)


@pytest.mark.parametrize("case,fast_mode", GRADCHECK_CASES, ids=ids(GRADCHECK_CASES))
def test_gradcheck_float64(case, fast_mode):
    tensors, kwargs = make_inputs(case, torch.float64)
    assert gradcheck_attention(triton_attention, tensors, kwargs, fast_mode)


def test_zero_gate_keeps_prefix_mass():
    """g = 0: prefix logits are 0 (mass exp(0) each) and add no value; never NaN."""
    q = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    pk = torch.randn(1, 2, 16, dtype=torch.float64)
    pv = torch.randn(1, 2, 16, dtype=torch.float64)
    out = triton_attention(q, k, v, pk, pv, gate=torch.zeros(1, 3, 2, dtype=torch.float64))
    logits = q @ k.transpose(-1, -2) * 16 ** -0.5
    denominator = logits.exp().sum(-1, keepdim=True) + 2  # two prefix rows at logit 0
    torch.testing.assert_close(out, (logits.exp() / denominator) @ v, rtol=1e-12, atol=1e-12)


def test_backward_is_deterministic():
    case = Case(B=2, H=4, Hkv=2, Sq=40, Sk=40, L=5, D=32, gate="dense", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.float32)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D)
    _, first = run(triton_attention, tensors, kwargs, grad_out)
    _, second = run(triton_attention, tensors, kwargs, grad_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_noncontiguous_inputs():
    """q/k/v as transposed [B, S, H, D] views (the layout transformers produces)."""
    case = Case(B=2, H=4, Hkv=2, Sq=9, Sk=9, L=3, D=16, gate="dense", causal=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    views = dict(tensors)
    for name in ("q", "k", "v"):
        views[name] = tensors[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not views["q"].is_contiguous()
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    out, grads = run(triton_attention, views, kwargs, grad_out)
    out_ref, grads_ref = run(reference_attention, tensors, kwargs, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12)


def test_inputs_without_grad():
    """Only some inputs require grad (frozen prefix and gate): the rest get None, no error."""
    case = Case(B=1, H=2, Hkv=1, Sq=5, Sk=5, L=3, D=16, gate="dense")
    tensors, kwargs = make_inputs(case, torch.float64)
    for name in ("prefix_k", "prefix_v", "gate", "k"):
        tensors[name] = tensors[name].detach()
    out = triton_attention(tensors["q"], tensors["k"], tensors["v"], tensors["prefix_k"], tensors["prefix_v"],
                           gate=tensors["gate"])
    out.sum().backward()
    assert tensors["q"].grad is not None and tensors["v"].grad is not None
    assert tensors["prefix_k"].grad is None and tensors["gate"].grad is None


def test_poisoned_outputs_are_nan(monkeypatch):
    from fastprefix.kernels.common.runtime import new_buffer

    monkeypatch.setenv("FASTPREFIX_POISON_OUTPUTS", "1")
    assert torch.isnan(new_buffer((2, 3), torch.float32, "cpu")).all()
    monkeypatch.setenv("FASTPREFIX_POISON_OUTPUTS", "0")
    assert new_buffer((2, 3), torch.float32, "cpu").shape == (2, 3)


def test_kernel_limits_raise():
    q = torch.randn(1, 1, 2, 160)
    with pytest.raises(ValueError, match="head dim"):
        triton_attention(q, q, q, q[0], q[0])
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="not both"):
        triton_attention(q, q, q, q[0], q[0], gate=torch.ones(1, 2, 2), gate_hidden=torch.ones(1, 2, 4),
                         gate_weight=torch.ones(4, 2))


def test_config_choice_needs_no_gpu():
    """Under the interpreter the launcher picks its small CPU config; GPU tables cover D<=128."""
    assert configs.pick_config("fwd", 64, None) == configs._INTERPRETER_CONFIG
    for arch in (80, 86, 89, 90):
        for kind in configs.KINDS:
            for block_d in (16, 32, 64, 128):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    assert len(configs.pick_config(kind, block_d, arch, dtype)) == 5


def test_torch_compile_fullgraph():
    """The custom ops keep the kernels opaque to torch.compile: one graph, same values and grads."""
    case = Case(B=1, H=2, Hkv=1, Sq=5, Sk=5, L=3, D=16, gate="dense", causal=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    compiled = torch.compile(triton_attention, backend="aot_eager", fullgraph=True)
    assert_runs_match(compiled, reference_attention, tensors, kwargs, grad_out, tol=1e-12)


def test_custom_op_registration():
    case = Case(B=1, H=2, Hkv=1, Sq=3, Sk=4, L=2, D=16, gate="dense", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.float32)
    t = {k: v.detach() for k, v in tensors.items()}
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["gate"], kwargs["key_padding_mask"], True, 0.25)
    torch.library.opcheck(torch.ops.fastprefix.gated_prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_through_ops_backend_triton():
    """fastprefix.ops dispatches backend="triton" to this kernel (interpreter on CPU)."""
    from fastprefix import ops

    case = Case(B=2, H=2, Hkv=1, Sq=6, Sk=6, L=3, D=16, gate="dense", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    t = {k: v.detach() for k, v in tensors.items()}
    out = ops.gated_prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], gate=t["gate"],
                                     backend="triton", **kwargs)
    out_ref = reference_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], gate=t["gate"], **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
