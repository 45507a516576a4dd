"""The split attention path (vendor attention for the real keys + the Triton prefix merge) against the
reference, under Triton's interpreter with PyTorch's fused CPU attention as the vendor op.

The same case sweep (tests/helpers/cases.py) and FlashAttention error rule as tests/ops/test_attention_kernel.py
(error vs float64 <= 2 x the PyTorch same-dtype error + a floor), float64 gradcheck through the Triton kernels,
the dispatch rule, and the CUDA branch's op calls checked on fake CUDA tensors (FakeTensorMode: shapes, dtypes
and arguments through the ops' meta kernels; no GPU). ``split_calls`` comes from tests/conftest.py.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastprefix import ops
from fastprefix.kernels.attention import dispatch, split, vendor
from fastprefix.reference import split as reference_split
from fastprefix.spec import gate3
from helpers.cases import CASES, GRADCHECK_CASES, Case, ids, make_inputs
from helpers.numerics import (ATTENTION_INPUTS, FLOOR, OpLog, assert_flash_rule_parts, assert_flash_rule_run,
                              assert_runs_match, choose_path, fake_rng_matches, gradcheck_attention,
                              reference_attention, run, spec_of, split_attention, triton_attention, upcast)

NAMES = ATTENTION_INPUTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case, dtype, split_calls):
    tensors, kwargs = make_inputs(case, dtype)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64).to(dtype)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    assert split_calls == ["cpu"]
    out_ref, grads_ref = run(reference_attention, tensors, kwargs, grad_out)
    ref64 = run(reference_attention, upcast(tensors), kwargs, grad_out.double())
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert out.transpose(1, 2).is_contiguous()  # written as [B, Sq, H, D], what transformers reshapes next
    assert_flash_rule_parts((out, grads), (out_ref, grads_ref), ref64, floor=FLOOR[dtype], name=case.id)


def test_bf16_forward_backward(split_calls):
    case = Case(B=2, H=2, Hkv=1, Sq=33, Sk=33, L=5, D=32, gate="dense", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.bfloat16)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D).to(torch.bfloat16)
    assert_flash_rule_run(triton_attention, reference_attention, tensors, kwargs, grad_out,
                          floor=FLOOR[torch.bfloat16], name=case.id, same_dtype=reference_attention)
    assert split_calls == ["cpu"]


# The fused kernel's gradcheck cases, less the APT gate-input ones (the split path turns those into a gate
# tensor with torch ops, so their gradient is autograd's), plus a prefix of two 64-wide tiles.
GRADCHECK = [(c, fast) for c, fast in GRADCHECK_CASES if not c.gate.startswith("fused")] + [
    (Case(B=1, H=2, Hkv=1, Sq=5, Sk=6, L=70, D=8, gate="dense", causal=True), True)]


@pytest.mark.parametrize("case,fast_mode", GRADCHECK, ids=ids(GRADCHECK))
def test_gradcheck_float64(case, fast_mode, split_calls):
    tensors, kwargs = make_inputs(case, torch.float64)
    assert gradcheck_attention(triton_attention, tensors, kwargs, fast_mode)
    assert split_calls and set(split_calls) == {"cpu"}


def test_merge_kernel_matches_naive_twin():
    """The forward kernel alone vs the float64 twin; an empty row's lse_k reported as -inf, +inf or NaN is no mass."""
    B, H, Hkv, Sq, L, D = 2, 4, 2, 37, 70, 24
    g = torch.Generator().manual_seed(1)
    q, o_k = (torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    gate = torch.rand(B, Sq, L, generator=g, dtype=torch.float64) * 3
    lse_k = torch.randn(B, H, Sq, generator=g, dtype=torch.float64) * 4
    lse_k[0, 0, :3] = torch.tensor([-torch.inf, torch.inf, torch.nan])
    out, lse2 = split.merge_forward(q, pk, pv, gate, o_k, lse_k, 0.3)
    ref_lse_k = lse_k.nan_to_num(nan=-torch.inf, posinf=-torch.inf)
    out_ref, lse_ref = reference_split.merge_forward(q, pk, pv, gate3(gate), o_k, ref_lse_k, 0.3, with_lse=True)[:2]
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(lse2 * ln2, lse_ref, rtol=1e-12, atol=1e-12)


class _Allocations(TorchDispatchMode):
    """Shapes of every tensor an op creates (views excluded: they allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.is_view:
            for x in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(x, torch.Tensor):
                    self.shapes.append((str(func), tuple(x.shape)))
        return result


@pytest.mark.parametrize("gate", ["none", "pooled"])
def test_forward_builds_no_concatenation_and_no_prefix_scores(gate):
    """Neither [B, Hkv, L + Sk, D] nor a [.., Sq, L] tensor is created by the forward (allocation spy on the
    forward's implementation, the vendor op and the Triton launch included) nor saved for the backward."""
    B, H, Hkv, Sq, Sk, L, D = 2, 4, 2, 7, 9, 5, 16
    case = Case(B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, L=L, D=D, gate=gate, pad=True, causal=True, shared=False)
    tensors, kwargs = make_inputs(case, torch.float32)
    t = {n: x.detach() for n, x in tensors.items()}
    g = t.get("gate")
    with _Allocations() as spy:
        split._forward(*(t[n] for n in NAMES),
                       spec_of(t["q"], t["k"], gate=g, key_padding_mask=kwargs["key_padding_mask"], causal=True,
                               scale=D ** -0.5), "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        split_attention(*(tensors[n] for n in NAMES), gate=tensors.get("gate"), **kwargs)
    shapes = [s for _, s in spy.shapes] + saved
    assert spy.shapes and saved
    assert not [s for s in shapes if L + Sk in s], spy.shapes
    assert not [s for s in shapes if len(s) >= 2 and set(s[-2:]) == {Sq, L}], spy.shapes


def test_backward_is_deterministic(split_calls):
    case = Case(B=1, H=2, Hkv=1, Sq=70, Sk=70, L=5, D=16, gate="dense", pad=True, causal=True)  # 2 query splits
    tensors, kwargs = make_inputs(case, torch.float32)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D)
    _, first = run(triton_attention, tensors, kwargs, grad_out)
    _, second = run(triton_attention, tensors, kwargs, grad_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_inputs_without_grad_and_noncontiguous_views(split_calls):
    """q/k/v as transposed [B, S, H, D] views; a frozen prefix and gate get no gradient and no error."""
    case = Case(B=2, H=4, Hkv=2, Sq=9, Sk=9, L=3, D=16, gate="dense", causal=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    views = {n: x.detach() for n, x in tensors.items()}
    for name in ("q", "k", "v"):
        views[name] = tensors[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    out = triton_attention(*(views[n] for n in NAMES), gate=views["gate"], **kwargs)
    out_ref = reference_attention(*(tensors[n] for n in NAMES), gate=tensors["gate"], **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    out_ref.sum().backward()
    for name in ("q", "k", "v"):
        torch.testing.assert_close(views[name].grad, tensors[name].grad, rtol=1e-12, atol=1e-12)
    assert views["prefix_k"].grad is None and views["gate"].grad is None


def test_torch_compile_fullgraph(split_calls):
    """The custom ops keep the split path opaque to torch.compile: one graph, the same values and grads."""
    case = Case(B=1, H=2, Hkv=1, Sq=5, Sk=6, L=3, D=16, gate="dense", causal=True, pad=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    compiled = torch.compile(split_attention, backend="aot_eager", fullgraph=True)
    assert_runs_match(compiled, reference_attention, tensors, kwargs, grad_out, tol=1e-12)


def test_custom_op_registration():
    case = Case(B=1, H=2, Hkv=1, Sq=3, Sk=4, L=2, D=16, gate="dense", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.float32)
    t = {k: v.detach() for k, v in tensors.items()}
    args = (*(t[n] for n in NAMES), t["gate"], kwargs["key_padding_mask"], True, 0.25, "cpu")
    torch.library.opcheck(torch.ops.fastprefix.split_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, path", [("split", "split"), ("fused", "fused"), ("", "fused"), ("auto", "fused"),
                                         (" Split ", "split")], ids=["split", "fused", "unset", "auto", "spaces"])
def test_env_var_picks_the_path_per_call_on_cpu(value, path, monkeypatch):
    """Read at every call; on CPU (interpreter) the automatic rule keeps the fused kernel."""
    monkeypatch.setenv("FASTPREFIX_ATTENTION", value)
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 4, 16)
    assert choose_path(q, k)[:2] == (path, "cpu" if path == "split" else None)


def test_bad_env_var_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTPREFIX_ATTENTION", "fastest")
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="FASTPREFIX_ATTENTION.*'fastest'"):
        choose_path(q, q)


def test_ops_backend_triton_follows_the_env_var(monkeypatch):
    """fastprefix.ops -> dispatch: split or fused by FASTPREFIX_ATTENTION, both exact in float64."""
    from fastprefix.kernels.attention import fused as fused_module

    case = Case(B=2, H=2, Hkv=1, Sq=6, Sk=6, L=3, D=16, gate="fused", pad=True, causal=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    t = {k: v.detach() for k, v in tensors.items()}
    extra = {k: v for k, v in t.items() if k not in NAMES}
    out_ref = reference_attention(*(t[n] for n in NAMES), **extra, **kwargs)
    for value, module, name in (("split", split, "split_attention"),
                                ("fused", fused_module, "gated_prefix_attention")):
        calls = []
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
        monkeypatch.setenv("FASTPREFIX_ATTENTION", value)
        out = ops.gated_prefix_attention(*(t[n] for n in NAMES), **extra, backend="triton", **kwargs)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        assert calls == [1], value


@pytest.mark.parametrize("device, cap, dtype, D, mask, expected", [
    ("cpu", None, torch.float32, 40, True, "cpu"),
    ("cuda", 80, torch.float16, 64, False, "flash"),
    ("cuda", 90, torch.bfloat16, 128, False, "flash"),
    ("cuda", 86, torch.float16, 64, True, None),       # padding on CUDA: fused
    ("cuda", 80, torch.float32, 64, False, None),      # no fp32 FlashAttention
    ("cuda", 75, torch.float16, 64, False, None),      # pre-Ampere
    ("cuda", 100, torch.float16, 64, False, None),     # not confirmed beyond 9.x
    ("cuda", 80, torch.float16, 36, False, None),      # D % 8 != 0
    ("cuda", 80, torch.float16, 256, False, None),     # beyond the merge kernel's D <= 128
    ("mps", None, torch.float16, 64, False, None),
], ids=["cpu", "sm80-fp16", "sm90-bf16", "pad", "fp32", "sm75", "sm100", "D36", "D256", "mps"])
def test_vendor_op_table(device, cap, dtype, D, mask, expected):
    for causal, Sq, Sk in ((False, 8, 8), (True, 3, 8)):  # causal and Sq < Sk never rule an op out
        assert vendor.choose_op(device, cap, dtype, D, mask, causal, Sq, Sk) == expected


def test_default_rule_on_cuda_picks_split_for_half_precision(monkeypatch):
    monkeypatch.delenv("FASTPREFIX_ATTENTION", raising=False)
    monkeypatch.setattr(dispatch, "arch_of", lambda t: 80 if t.device.type == "cuda" else None)
    with FakeTensorMode():
        for dtype, path in ((torch.float16, "split"), (torch.bfloat16, "split"), (torch.float32, "fused")):
            q = torch.empty(2, 4, 8, 64, dtype=dtype, device="cuda")
            k = torch.empty(2, 2, 8, 64, dtype=dtype, device="cuda")
            assert choose_path(q, k, causal=True)[0] == path, dtype


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_flash_branch_op_calls_on_fake_tensors(causal):
    """What the CUDA branch asks of FlashAttention-2: GQA K/V not expanded, Sq < Sk, is_causal as given
    (bottom-right for this op), an fp32 [B, H, Sq] log-sum-exp, the dense backward (no cu_seqlens) given
    w * dO, the merged output and the forward's rng state, dk/dv back in Hkv heads."""
    B, H, Hkv, Sq, Sk, D, scale = 2, 8, 2, 5, 11, 64, 0.125
    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(B, Hkv, Sk, D, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(B, Hkv, Sk, D, dtype=torch.bfloat16, device="cuda")
        with OpLog() as log:
            o_k, lse_k, rng = vendor.forward("flash", q, k, v, None, causal, scale)
        (func, a), = log.calls
        assert func is torch.ops.aten._scaled_dot_product_flash_attention.default
        assert a["query"] is q and a["key"] is k and a["value"] is v  # [B, Hkv, Sk, D]: not expanded
        assert (a["dropout_p"], a["is_causal"], a["return_debug_mask"], a["scale"]) == (0.0, causal, False, scale)
        assert o_k.shape == (B, H, Sq, D) and o_k.dtype == torch.bfloat16
        assert lse_k.shape == (B, H, Sq) and lse_k.dtype == torch.float32
        assert fake_rng_matches(rng, vendor.rng_like("flash", q))

        out, grad = torch.empty_like(o_k), torch.empty_like(o_k)
        with OpLog() as log:
            dq, dk, dv = vendor.backward("flash", grad, q, k, v, out, lse_k, rng, None, causal, scale)
        (func, a), = log.calls
        assert func is torch.ops.aten._scaled_dot_product_flash_attention_backward.default
        assert a["grad_out"] is grad and a["out"] is out and a["logsumexp"] is lse_k
        assert a["cum_seq_q"] is None and a["cum_seq_k"] is None  # the dense backward
        assert (a["max_q"], a["max_k"], a["dropout_p"], a["is_causal"], a["scale"]) == (Sq, Sk, 0.0, causal, scale)
        assert a["philox_seed"] is rng[0] and a["philox_offset"] is rng[1]
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_fake_kernels_match_the_vendor_meta_shapes():
    """The split custom ops' fake kernels describe what the CUDA branch returns (torch.compile relies on it)."""
    B, H, Hkv, Sq, Sk, L, D = 2, 4, 2, 5, 9, 3, 64
    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, dtype=torch.float16, device="cuda")
        k = v = torch.empty(B, Hkv, Sk, D, dtype=torch.float16, device="cuda")
        pk = pv = torch.empty(Hkv, L, D, dtype=torch.float16, device="cuda")
        gate = torch.empty(B, Sq, L, dtype=torch.float16, device="cuda")
        out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(q, k, v, pk, pv, gate, None, True,
                                                                                 0.125, "flash")
        _, real_lse_k, real_rng = vendor.forward("flash", q, k, v, None, True, 0.125)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous() and lse.shape == (B, H, Sq)
        assert lse_k.shape == real_lse_k.shape and lse_k.dtype == real_lse_k.dtype
        assert fake_rng_matches((seed, offset), real_rng)
        grads = torch.ops.fastprefix.split_attention_bwd(torch.empty_like(out), q, k, v, pk, pv, gate, None, out, lse,
                                                         lse_k, seed, offset, True, 0.125, "flash")
        # the 7th output is the attn_bias gradient, empty without one (tests/ops/test_split_features.py)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, pk.shape, pv.shape, gate.shape, (0,)]
