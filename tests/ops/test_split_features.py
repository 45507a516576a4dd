"""The attention features of issue #12 (``attn_bias``, ``window``, ``softcap``) on the split path.

Under ``FASTPREFIX_ATTENTION=split`` on CPU the real keys go through PyTorch's fused CPU attention with one
additive mask (bias + window + padding + causal) and the bias gradient is recomputed exactly; softcap
falls back to the fused kernel. Checked against the package's explicit float64 twin of the contract
(``fastprefix.reference.attention.explicit_attention``: concatenated ``[prefix ; keys]`` logits, plain softmax;
called through tests/helpers/numerics.py and itself checked by tests/ops/test_reference.py's naive loops), the
float32 / float16 error rule (error vs float64 <= 2 x the PyTorch reference's same-dtype error + a floor), and
float64 gradcheck. The CUDA branch (the memory-efficient op) is checked on fake CUDA tensors (FakeTensorMode: the
ops' arguments, shapes, dtypes and strides through their meta kernels) and, with a GPU, by the ``cuda`` tests.
The cases are tests/helpers/cases.py's ``Case`` of the ``"split"`` family; ``split_calls`` comes from
tests/conftest.py.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastprefix import ops
from fastprefix.kernels.attention import dispatch, vendor
from fastprefix.spec import effective_window, visible_keys
from helpers import cases
from helpers.cases import ids, make_inputs
from helpers.numerics import (ATTENTION_INPUTS, FLOOR, OpLog, assert_flash_rule, assert_flash_rule_parts,
                              assert_runs_match, choose_path, explicit_attention, fake_rng_matches, fused_attention,
                              gradcheck_attention, reference_attention, run, spec_of, split_attention,
                              triton_attention, upcast)

NAMES = ATTENTION_INPUTS

# the bias's dims in the ids (e.g. "1Hqk"); this file's default shape: GQA, Sq < Sk
Case = cases.maker("split", B=2, H=2, Hkv=1, Sq=6, Sk=9, L=3)


# A covering set: every bias broadcast shape, with and without its gradient, windows on either side,
# padding (with a fully padded row), causal, GQA, both gate shapes, Sq < Sk and two query tiles.
CASES = [
    Case(H=4, Hkv=2, bias="BHqk", causal=True),
    Case(bias="1Hqk", gate="dense", shared=False),                            # T5's position bias
    Case(bias="B1qk", bias_grad=False, pad=True),
    Case(bias="qk", gate="pooled", pad=True, causal=True),
    Case(bias="B11k", pad=True),
    Case(H=2, bias="H1k", window=(2, 1)),
    Case(H=4, Hkv=2, Sq=9, window=(3, 0), causal=True),                       # Mistral's sliding window 4
    Case(window=(1, 2), pad=True, gate="dense"),
    Case(window=(0, -1)),
    Case(window=(-1, 1), bias="1Hqk", bias_grad=False),
    Case(H=4, Hkv=2, bias="BHqk", window=(2, 0), pad=True, causal=True, gate="dense", shared=False),
    Case(window=(10, 10), bias="qk"),                                         # a window that hides nothing
    Case(B=1, Sq=1, bias="1Hqk", window=(2, 0), causal=True),                 # one decoding step
    Case(B=1, H=2, Sq=70, Sk=70, L=5, bias="1Hqk", window=(20, 0), causal=True, gate="dense"),  # 2 query tiles
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_float64_matches_explicit_reference(case, split_calls):
    tensors, kwargs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    assert split_calls == ["cpu"]
    out_ref, grads_ref = run(explicit_attention, tensors, kwargs, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name in grads:
        assert grads[name].shape == tensors[name].shape and grads[name].dtype == tensors[name].dtype, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10, msg=name)


def sdpa_over_concatenation(q, k, v, prefix_k, prefix_v, *, gate=None, key_padding_mask=None, causal=False,
                            scale=None, attn_bias=None, window=None):
    """PyTorch's own fused attention (``F.scaled_dot_product_attention``) over ``[g * prefix ; keys]`` with one
    additive mask: 0 on the prefix columns, the bias (-inf where hidden) on the keys'. A gate shared by all
    queries (``[B|1, 1, L]``) folds into the prefix. The bias is detached: a mask that requires grad sends
    SDPA to its eager math path, which is the reference path's job."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    pk, pv = (p if p.dim() == 4 else p.unsqueeze(0) for p in (prefix_k, prefix_v))
    L = pk.shape[-2]
    if gate is not None:
        assert gate.shape[-2] == 1, "only a gate row shared by the queries folds into the prefix"
        g = gate.reshape(gate.shape[0], 1, L, 1)
        pk, pv = pk * g, pv * g
    keys = torch.cat([pk.expand(B, Hkv, L, D), k], dim=2)
    values = torch.cat([pv.expand(B, Hkv, L, D), v], dim=2)
    dtype = q.dtype if attn_bias is None else attn_bias.dtype
    key_mask = torch.zeros(B, H, Sq, Sk, dtype=dtype, device=q.device)
    if attn_bias is not None:
        key_mask = key_mask + attn_bias.detach()
    spec = spec_of(q, k, key_padding_mask=key_padding_mask, causal=causal, window=window)
    visible = visible_keys(spec.key_padding_mask, spec.causal, spec.window, Sq, Sk, q.device)
    if visible is not None:
        key_mask = key_mask.masked_fill(~visible, float("-inf"))
    mask = torch.cat([torch.zeros(B, H, Sq, L, dtype=dtype, device=q.device), key_mask], dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                                            enable_gqa=H != Hkv)


# gates shared by the queries, so that PyTorch's fused attention over the concatenation is the same-dtype path
LOW_PRECISION = [
    Case(H=4, Hkv=2, bias="BHqk", window=(2, 0), pad=True, causal=True, gate="pooled"),
    Case(B=1, H=2, Sq=70, Sk=70, L=5, D=32, bias="1Hqk", causal=True),
    Case(bias="B11k", window=(1, 3), pad=True, gate="pooled"),
]


@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, None), (torch.float16, None),
                                               (torch.float16, torch.float32)], ids=["fp32", "fp16", "fp16-fp32-bias"])
@pytest.mark.parametrize("case", LOW_PRECISION, ids=ids(LOW_PRECISION))
def test_low_precision_error_rule(case, dtype, bias_dtype, split_calls):
    """The error rule against PyTorch's own attention in the same dtype: its fused attention over the
    concatenation (a FlashAttention-style backward, as the split path's vendor op) for the output and every
    gradient but the bias's, which only the eager reference path gives (an eager softmax backward, whose
    delta comes from fp32 probabilities rather than from the fp16 output: tighter where the bias makes the
    softmax peaky)."""
    tensors, kwargs = make_inputs(case, dtype, bias_dtype=bias_dtype)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64).to(dtype)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    assert split_calls == ["cpu"]
    fused_inputs = {n: x for n, x in tensors.items() if n != "attn_bias"}
    out_ref, grads_ref = run(sdpa_over_concatenation, fused_inputs, {**kwargs, "attn_bias": tensors["attn_bias"]},
                             grad_out)
    _, grads_eager = run(reference_attention, tensors, kwargs, grad_out)
    grads_ref["attn_bias"] = grads_eager["attn_bias"]
    ref64 = run(explicit_attention, upcast(tensors), kwargs, grad_out.double())
    assert out.dtype == dtype
    assert_flash_rule_parts((out, grads), (out_ref, grads_ref), ref64, floor=FLOOR[dtype], name=case.id)


GRADCHECK = [  # fast mode (random projections of the Jacobian); the float64 test above checks every entry
    (Case(B=2, H=2, Hkv=1, Sq=3, Sk=5, L=2, D=4, bias="BHqk", window=(1, 0), pad=True, causal=True,
          gate="dense"), True),
    (Case(B=2, H=2, Hkv=2, Sq=3, Sk=4, L=2, D=4, bias="B11k", window=(0, 1), gate="pooled", shared=False), True),
]


@pytest.mark.parametrize("case,fast_mode", GRADCHECK, ids=ids(GRADCHECK))
def test_gradcheck_float64(case, fast_mode, split_calls):
    tensors, kwargs = make_inputs(case, torch.float64)
    assert gradcheck_attention(triton_attention, tensors, kwargs, fast_mode)
    assert split_calls and set(split_calls) == {"cpu"}


def test_float32_bias_on_float64_queries(split_calls):
    """The contract's other bias dtype: exact forward; the gradient comes back in float32, the float64 value
    rounded once (so within one float32 rounding of the explicit reference's)."""
    case = Case(H=4, Hkv=2, bias="1Hqk", window=(2, 1), pad=True, gate="dense")
    tensors, kwargs = make_inputs(case, torch.float64, bias_dtype=torch.float32)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    out_ref, grads_ref = run(explicit_attention, tensors, kwargs, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name in grads:
        eps = torch.finfo(grads[name].dtype).eps
        assert grads[name].dtype == tensors[name].dtype, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=max(eps, 1e-10), atol=1e-10, msg=name)
    assert split_calls == ["cpu"]


def test_bias_without_grad_costs_no_gradient_work(split_calls, monkeypatch):
    """A frozen bias: no bias-gradient recomputation, no gradient, the other gradients unchanged."""
    spent = []
    real = vendor._cpu_bias_grad
    monkeypatch.setattr(vendor, "_cpu_bias_grad", lambda *a: spent.append(1) or real(*a))
    case = Case(bias="1Hqk", window=(2, 1), pad=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    frozen = tensors["attn_bias"].detach()
    out = triton_attention(*(tensors[n] for n in NAMES), **kwargs, attn_bias=frozen)
    out.sum().backward()
    assert spent == [] and frozen.grad is None
    out = triton_attention(*(tensors[n] for n in NAMES), **kwargs, attn_bias=tensors["attn_bias"])
    out.sum().backward()
    assert spent == [1] and tensors["attn_bias"].grad is not None


def test_ops_entry_point_reaches_the_split_path(split_calls):
    """fastprefix.gated_prefix_attention(backend="triton") validates and hands the features to the split path."""
    case = Case(H=4, Hkv=2, bias="1Hqk", window=(3, 0), pad=True, causal=True, gate="dense")
    tensors, kwargs = make_inputs(case, torch.float64)
    t = {n: x.detach() for n, x in tensors.items()}
    out = ops.gated_prefix_attention(*(t[n] for n in NAMES), gate=t["gate"], attn_bias=t["attn_bias"],
                                     backend="triton", **kwargs)
    out_ref = explicit_attention(*(t[n] for n in NAMES), gate=t["gate"], attn_bias=t["attn_bias"], **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert split_calls == ["cpu"]


@pytest.mark.parametrize("extra", [{}, {"attn_bias": "1Hqk", "window": (2, 0)}], ids=["softcap", "softcap-bias-win"])
def test_softcap_under_split_is_exactly_the_fused_result(extra, split_calls):
    """No vendor op caps logits: a forced split takes the fused kernel, bit for bit, gradients included."""
    case = Case(H=4, Hkv=2, gate="dense", pad=True, causal=True, bias=extra.get("attn_bias"),
                window=extra.get("window"))
    tensors, kwargs = make_inputs(case, torch.float32)
    kwargs["softcap"] = 2.5
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    assert split_calls == []
    out_fused, grads_fused = run(fused_attention, tensors, kwargs, grad_out)
    assert torch.equal(out, out_fused)
    for name in grads:
        assert torch.equal(grads[name], grads_fused[name]), name
    # and that is the capped contract: fp32 error within the rule against the PyTorch reference's
    t64 = upcast(tensors)
    out_64 = explicit_attention(*(t64[n] for n in NAMES), **{n: x for n, x in t64.items() if n not in NAMES}, **kwargs)
    out_ref = reference_attention(*(tensors[n] for n in NAMES), **{n: x for n, x in tensors.items() if n not in NAMES},
                                  **kwargs)
    assert_flash_rule(out, out_ref, out_64, floor=FLOOR[torch.float32] * max(1.0, out_64.abs().max().item()))


def test_custom_ops_with_bias_and_window():
    """Schema and fake kernels of the split ops with the new arguments (opcheck on CPU)."""
    case = Case(B=2, H=2, Hkv=1, Sq=3, Sk=5, L=2, D=16, bias="1Hqk", window=(1, 0), pad=True, causal=True,
                gate="dense")
    tensors, kwargs = make_inputs(case, torch.float32)
    t = {n: x.detach() for n, x in tensors.items()}
    args = (*(t[n] for n in NAMES), t["gate"], kwargs["key_padding_mask"], True, 0.25, "cpu", t["attn_bias"], 1, -1)
    torch.library.opcheck(torch.ops.fastprefix.split_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), *(t[n] for n in NAMES), t["gate"], kwargs["key_padding_mask"], out, lse,
                lse_k, seed, offset, True, 0.25, "cpu", t["attn_bias"], 1, -1, True)
    torch.library.opcheck(torch.ops.fastprefix.split_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_with_bias_and_window(split_calls):
    case = Case(B=1, H=2, Hkv=1, Sq=5, Sk=6, L=3, D=16, gate="dense", bias="1Hqk", window=(2, 0), causal=True,
                pad=True)
    tensors, kwargs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64)
    compiled = torch.compile(split_attention, backend="aot_eager", fullgraph=True)
    assert_runs_match(compiled, explicit_attention, tensors, kwargs, grad_out, tol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window, causal, Sq, Sk, expected", [
    (None, False, 4, 8, None),
    ((-1, -1), False, 4, 8, None),
    ((7, 3), False, 4, 8, None),        # left >= Sk - 1 and right >= Sq - 1: hides nothing
    ((6, 3), False, 4, 8, (6, -1)),
    ((7, 2), False, 4, 8, (-1, 2)),
    ((3, 0), True, 8, 8, (3, -1)),      # causal: the right side is causal's
    ((-1, 0), True, 8, 8, None),        # = plain causal
    ((0, 0), False, 1, 8, (0, -1)),     # one query: right of it there is nothing
], ids=["none", "unbounded", "too-wide", "left", "right", "causal-left", "causal-only", "one-query"])
def test_effective_window(window, causal, Sq, Sk, expected):
    assert effective_window(window, causal, Sq, Sk) == expected


@pytest.mark.parametrize("dtype, D, mask, bias, window, expected", [
    (torch.float16, 64, False, None, False, "flash"),
    (torch.float16, 64, False, torch.float16, False, "efficient"),
    (torch.bfloat16, 128, True, torch.bfloat16, False, "efficient"),   # padding goes into the bias
    (torch.bfloat16, 64, False, None, True, "efficient"),
    (torch.float16, 64, True, None, True, "efficient"),
    (torch.float16, 64, True, None, False, None),                      # padding alone: fused
    (torch.float16, 64, False, torch.float32, False, None),            # fp32 bias on fp16: no rounding, fused
    (torch.float32, 64, False, torch.float32, False, None),            # fp32: fused (IEEE)
    (torch.float16, 36, False, torch.float16, False, None),            # D % 8
    (torch.float16, 256, False, torch.float16, False, None),           # D > 128
], ids=["plain", "bias", "bias-pad", "window", "window-pad", "pad-only", "fp32-bias", "fp32", "D36", "D256"])
def test_vendor_op_table_with_features(dtype, D, mask, bias, window, expected):
    for cap in (80, 90):
        for causal, Sq, Sk in ((False, 8, 8), (True, 3, 8)):
            got = vendor.choose_op("cuda", cap, dtype, D, mask, causal, Sq, Sk, bias_dtype=bias,
                                             has_window=window)
            assert got == expected, (cap, causal)
    assert vendor.choose_op("cuda", 75, dtype, D, mask, False, 8, 8, bias_dtype=bias,
                                      has_window=window) is None
    # CPU takes every feature (any dtype, any bias dtype)
    assert vendor.choose_op("cpu", None, dtype, D, mask, False, 8, 8, bias_dtype=bias,
                                      has_window=window) == "cpu"


def _fake_cuda_call(dtype=torch.float16, B=2, H=4, Hkv=2, Sq=8, Sk=8, D=64):
    q = torch.empty(B, H, Sq, D, dtype=dtype, device="cuda")
    k = torch.empty(B, Hkv, Sk, D, dtype=dtype, device="cuda")
    return q, k


@pytest.mark.parametrize("forced, features, expected", [
    ("auto", {}, ("split", "flash")),
    ("auto", {"attn_bias": True}, ("fused", None)),
    ("auto", {"window": (3, 0)}, ("fused", None)),
    ("auto", {"window": (100, 0)}, ("split", "flash")),       # hides nothing: dropped
    ("split", {"attn_bias": True}, ("split", "efficient")),
    ("split", {"window": (3, 0)}, ("split", "efficient")),
    ("split", {"attn_bias": torch.float32}, ("fused", None)),
    ("split", {"softcap": 30.0}, ("fused", None)),
    ("split", {"softcap": 30.0, "attn_bias": True}, ("fused", None)),
    ("fused", {"attn_bias": True}, ("fused", None)),
], ids=["auto", "auto-bias", "auto-window", "auto-wide-window", "split-bias", "split-window", "split-fp32-bias",
        "split-softcap", "split-softcap-bias", "fused-bias"])
def test_choose_path_on_cuda(forced, features, expected, monkeypatch):
    monkeypatch.setenv("FASTPREFIX_ATTENTION", forced)
    monkeypatch.setattr(dispatch, "arch_of", lambda t: 80 if t.device.type == "cuda" else None)
    with FakeTensorMode():
        q, k = _fake_cuda_call()
        kwargs = dict(features)
        if "attn_bias" in kwargs:
            dtype = q.dtype if kwargs["attn_bias"] is True else kwargs["attn_bias"]
            kwargs["attn_bias"] = torch.empty(1, 4, 8, 8, dtype=dtype, device="cuda")
        assert choose_path(q, k, causal=True, **kwargs)[:2] == expected


@pytest.mark.parametrize("features, expected", [
    ({"attn_bias": True}, ("split", "cpu")), ({"window": (1, 0)}, ("split", "cpu")),
    ({"softcap": 5.0}, ("fused", None)), ({"softcap": 5.0, "window": (1, 0)}, ("fused", None)),
], ids=["bias", "window", "softcap", "softcap-window"])
def test_choose_path_on_cpu_under_forced_split(features, expected, monkeypatch):
    monkeypatch.setenv("FASTPREFIX_ATTENTION", "split")
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 4, 16)
    kwargs = dict(features)
    if "attn_bias" in kwargs:
        kwargs["attn_bias"] = torch.randn(3, 4)
    assert choose_path(q, k, **kwargs)[:2] == expected
    monkeypatch.setenv("FASTPREFIX_ATTENTION", "auto")
    assert choose_path(q, k, **kwargs)[:2] == ("fused", None)


# ---------------------------------------------------------------------------------------------------
# The CUDA branch (memory-efficient op) on fake tensors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, Sq", [(False, 5), (True, 5), (True, 11)], ids=["full", "causal-Sq<Sk", "causal-Sq=Sk"])
def test_efficient_bias_buffer_layout_and_values(causal, Sq):
    """The bias the efficient op gets, built on CPU tensors: [B, H, Sq, Sk] in q's dtype, last dim contiguous,
    every other stride a multiple of 16 elements (or 0 on broadcast dims), at the buffer's start; the bias
    (a -inf entry clamped to the lowest finite value) where visible, the lowest value where hidden. The
    op's own (top-left) causal mask only when Sq == Sk, the bottom-right one in the bias otherwise."""
    B, H, Sk, D = 2, 4, 11, 16
    q = torch.empty(B, H, Sq, D, dtype=torch.float16)
    bias = (torch.randn(1, H, Sq, Sk) * 3).to(torch.float16)
    bias[0, 1, 2, 3] = -torch.inf
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[1, :4] = False
    got, is_causal = vendor._efficient_bias(q, Sk, pad, causal, (2, 1), bias)
    assert is_causal == (causal and Sq == Sk)
    assert got.shape == (B, H, Sq, Sk) and got.dtype == torch.float16 and got.stride(-1) == 1
    assert all(s % 16 == 0 for s in got.stride()[:3]), got.stride()
    assert got.storage_offset() == 0
    lowest = torch.finfo(torch.float16).min
    t = torch.arange(Sq)[:, None] + (Sk - Sq)
    u = torch.arange(Sk)[None, :]
    visible = pad[:, None, None, :] & (u >= t - 2) & (u <= t + 1)
    if causal and not is_causal:
        visible = visible & (u <= t)
    expected = torch.where(visible, bias.clamp(min=lowest), torch.tensor(lowest, dtype=torch.float16))
    assert torch.equal(got, expected)
    # nothing to mask or add: no bias at all
    assert vendor._efficient_bias(q, Sk, None, causal and Sq == Sk, None, None) == (None, causal and Sq == Sk)


@pytest.mark.parametrize("causal, Sq, bias_grad, gqa", [(False, 5, True, False), (True, 5, False, True),
                                                         (True, 11, True, True)],
                         ids=["full-bias-grad", "causal-Sq<Sk-gqa-frozen-bias", "causal-Sq=Sk-gqa-bias-grad"])
def test_cuda_efficient_branch_op_calls_on_fake_tensors(causal, Sq, bias_grad, gqa):
    """What the CUDA branch asks of the memory-efficient op: q as given, K/V expanded to H heads for GQA, a
    [B, H, Sq, Sk] bias in q's dtype with 16-aligned strides, the op's (top-left) is_causal only when
    Sq == Sk, the log-sum-exp computed (fp32, 32-row padded); then its backward given w * dO, the merged
    output, the forward's lse and rng, the same bias, and the bias gradient asked for only when needed;
    dk/dv summed back to Hkv heads, the bias gradient summed to the bias's own shape."""
    B, H, Sk, D, scale = 2, 4, 11, 64, 0.125
    Hkv = 2 if gqa else H
    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(B, Hkv, Sk, D, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(B, Hkv, Sk, D, dtype=torch.bfloat16, device="cuda")
        bias = torch.empty(1, H, Sq, Sk, dtype=torch.bfloat16, device="cuda")
        pad = torch.empty(B, Sk, dtype=torch.bool, device="cuda")
        window = (3, -1)
        with OpLog() as log:
            o_k, lse_k, rng = vendor.forward("efficient", q, k, v, pad, causal, scale, attn_bias=bias,
                                                       window=window)
        calls = [a for f, a in log.calls if f is torch.ops.aten._scaled_dot_product_efficient_attention.default]
        assert len(calls) == 1
        a, = calls
        assert a["query"] is q
        assert a["key"].shape == (B, H, Sk, D) and a["value"].shape == (B, H, Sk, D)  # GQA expanded
        assert (a["key"] is k) == (not gqa) and a["key"].stride(-1) == 1 and a["value"].stride(-1) == 1
        fb = a["attn_bias"]
        assert fb.shape == (B, H, Sq, Sk) and fb.dtype == torch.bfloat16 and fb.stride(-1) == 1
        assert all(s % 16 == 0 for s in fb.stride()[:3]), fb.stride()
        assert a["compute_log_sumexp"] is True and a["dropout_p"] == 0.0
        assert a["is_causal"] == (causal and Sq == Sk) and a["scale"] == scale
        assert o_k.shape == (B, H, Sq, D) and o_k.dtype == torch.bfloat16
        assert lse_k.shape == (B, H, 32) and lse_k.dtype == torch.float32
        ref_lse = vendor.lse_like("efficient", q)
        assert ref_lse.shape == lse_k.shape and ref_lse.dtype == lse_k.dtype
        assert fake_rng_matches(rng, vendor.rng_like("efficient", q))

        out = torch.empty(B, Sq, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        grad = torch.empty_like(out)
        with OpLog() as log:
            dq, dk, dv, dbias = vendor.backward_all(
                "efficient", grad, q, k, v, out, lse_k, rng, pad, causal, scale, attn_bias=bias, window=window,
                bias_grad=bias_grad)
        calls = [a for f, a in log.calls
                 if f is torch.ops.aten._scaled_dot_product_efficient_attention_backward.default]
        assert len(calls) == 1
        a, = calls
        assert a["grad_out_"] is grad and a["query"] is q and a["out"] is out
        assert a["key"].shape == (B, H, Sk, D) and a["value"].shape == (B, H, Sk, D)
        bb = a["attn_bias"]
        assert bb.shape == fb.shape and bb.dtype == fb.dtype and bb.stride() == fb.stride()
        assert a["logsumexp"] is lse_k and a["philox_seed"] is rng[0] and a["philox_offset"] is rng[1]
        assert a["dropout_p"] == 0.0 and list(a["grad_input_mask"]) == [True, True, True, bias_grad]
        assert a["is_causal"] == (causal and Sq == Sk) and a["scale"] == scale
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
        assert [x.stride() for x in (dq, dk, dv)] == [x.stride() for x in vendor.grads_like("efficient", q,
                                                                                                       k, v)]
        if bias_grad:
            assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        else:
            assert dbias is None


def test_fake_kernels_match_the_efficient_op():
    """The split custom ops' fake kernels describe what the efficient branch returns (torch.compile relies on it)."""
    B, H, Hkv, Sq, Sk, L, D = 2, 4, 2, 5, 9, 3, 64
    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, dtype=torch.float16, device="cuda")
        k = v = torch.empty(B, Hkv, Sk, D, dtype=torch.float16, device="cuda")
        pk = pv = torch.empty(Hkv, L, D, dtype=torch.float16, device="cuda")
        gate = torch.empty(B, Sq, L, dtype=torch.float32, device="cuda")
        bias = torch.empty(B, 1, Sq, Sk, dtype=torch.float16, device="cuda")
        out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(
            q, k, v, pk, pv, gate, None, True, 0.125, "efficient", bias, 2, -1)
        _, real_lse_k, real_rng = vendor.forward("efficient", q, k, v, None, True, 0.125, attn_bias=bias,
                                                           window=(2, -1))
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous() and lse.shape == (B, H, Sq)
        assert lse_k.shape == real_lse_k.shape and lse_k.dtype == real_lse_k.dtype
        assert fake_rng_matches((seed, offset), real_rng)
        grads = torch.ops.fastprefix.split_attention_bwd(torch.empty_like(out), q, k, v, pk, pv, gate, None, out, lse,
                                                         lse_k, seed, offset, True, 0.125, "efficient", bias, 2, -1,
                                                         True)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, pk.shape, pv.shape, gate.shape, bias.shape]
        real = vendor.backward_all("efficient", torch.empty_like(out), q, k, v, out, real_lse_k, real_rng,
                                             None, True, 0.125, attn_bias=bias, window=(2, -1), bias_grad=True)
        assert grads[6].dtype == real.dbias.dtype and grads[6].shape == real.dbias.shape


# ---------------------------------------------------------------------------------------------------
# On a GPU (make gpu-test): the efficient branch for real
# ---------------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(B=2, H=4, Hkv=4, Sq=128, Sk=128, L=16, D=64, bias="1Hqk", causal=True, gate="pooled"),  # T5-like decoder
    Case(B=2, H=8, Hkv=2, Sq=100, Sk=130, L=8, D=128, window=(31, 0), causal=True, pad=True),     # Mistral-like
    Case(B=2, H=4, Hkv=4, Sq=77, Sk=77, L=4, D=64, bias="BHqk", window=(9, 9), pad=True),          # DeBERTa-like
    Case(B=1, H=4, Hkv=1, Sq=1, Sk=50, L=4, D=64, bias="B11k", window=(15, 0), causal=True),      # one decode step
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=ids(GPU_CASES))
def test_gpu_efficient_branch(case, dtype, split_calls):
    """The memory-efficient branch against PyTorch's own attention in the same dtype, as on CPU: SDPA over the
    concatenation (its fused CUDA kernels) for the output and every gradient but the bias's, the eager
    reference for the bias's (the efficient op's grad_bias has FlashAttention's delta, from the rounded
    output: this is where it is measured against the eager softmax backward)."""
    device = "cuda"
    tensors, kwargs = make_inputs(case, dtype)
    tensors = {n: x.detach().to(device).requires_grad_() for n, x in tensors.items()}
    kwargs = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
    grad_out = torch.randn(case.B, case.H, case.Sq, case.D, dtype=torch.float64).to(dtype).to(device)
    out, grads = run(triton_attention, tensors, kwargs, grad_out)
    assert split_calls == ["efficient"]
    fused_inputs = {n: x for n, x in tensors.items() if n != "attn_bias"}
    out_ref, grads_ref = run(sdpa_over_concatenation, fused_inputs, {**kwargs, "attn_bias": tensors.get("attn_bias")},
                             grad_out)
    if "attn_bias" in tensors:
        _, grads_eager = run(reference_attention, tensors, kwargs, grad_out)
        grads_ref["attn_bias"] = grads_eager["attn_bias"]
    kwargs64 = {n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
    t64 = {n: x.detach().double().cpu().requires_grad_() for n, x in tensors.items()}
    ref64 = run(explicit_attention, t64, kwargs64, grad_out.double().cpu())
    # compared on the CPU, where the float64 reference is
    assert_flash_rule_parts((out, grads), (out_ref, grads_ref), ref64, floor=FLOOR[dtype], name=case.id)
