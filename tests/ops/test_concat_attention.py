"""The concat path: the vendor's attention over ``[gated prefix ; keys]`` for calls whose gate folds into the prefix
(none, one gate row for every query, any gate of a single query), dense and varlen.

Under Triton's interpreter the vendor op is PyTorch's fused CPU op (dense, with the padding mask grown by the
always-visible prefix columns and the bottom-right causal band over ``L + Sk`` keys) or its varlen emulation (each
sequence's keys ``[prefix ; its real keys]``). Checked against the float64 twin (the explicit formulation), forward
and every gradient, float64 gradcheck, the fp32 / fp16 error rule, the fallback rule of a forced ``"concat"``, and
the CUDA branch's op calls on fake CUDA tensors (FlashAttention-2 over ``[B, Hkv, L + Sk, D]`` with is_causal
bottom-right, GQA not expanded; the varlen keys built by one gather, ``cu_seqlens_k`` grown by L per sequence).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastprefix
from fastprefix.kernels.attention import concat, dispatch, varlen, vendor
from fastprefix.spec import AttentionSpec
from helpers.cases import make_inputs, maker
from helpers.numerics import OpLog, assert_flash_rule_run, call, fake_cuda_plan, gradcheck_attention, max_errors
from helpers.numerics import explicit_attention as twin  # the float64 twin (block-diagonal with cu_seqlens)

TOL = 1e-12
Case = maker("concat", B=3, H=4, Hkv=2, Sq=6, Sk=6, L=3, D=16, pad="none")


def concat_with(op):
    def fn(q, k, v, prefix_k, prefix_v, **kwargs):
        spec = AttentionSpec.build(q, k, **kwargs)
        return concat.concat_attention(q, k, v, prefix_k, prefix_v, spec, op=op)
    return fn


DENSE = [Case(causal=c, gate=g) for c in (False, True) for g in ("none", "pooled")]
DENSE += [Case(Sq=3, Sk=9, causal=True, gate="pooled"), Case(Sq=3, Sk=9, causal=False, shared=False),
          Case(Sq=1, Sk=9, causal=True, gate="dense"), Case(Sq=1, Sk=9, causal=True, gate="fused"),
          Case(H=4, Hkv=4, causal=True, gate="pooled", shared=False)]
DENSE += [Case(pad=p, causal=c, gate="pooled") for p in ("right", "mixed", "allpad") for c in (False, True)]


@pytest.mark.parametrize("case", DENSE, ids=[c.id for c in DENSE])
def test_dense_concat_matches_the_float64_twin(case):
    t, kwargs = make_inputs(case)
    err = max_errors(concat_with(vendor.CPU), twin, t, kwargs)
    assert max(err.values()) < TOL, err


VARLEN = [Case(pad=p, causal=False, gate=g) for p in ("right", "mixed", "allpad", "none") for g in ("none", "pooled")]
VARLEN += [Case(pad=p, causal=True, gate=g) for p in ("right", "left1", "allpad", "none") for g in ("none", "pooled")]
VARLEN += [Case(Sq=3, Sk=9, pad="right", causal=True, gate="pooled", shared=False),
           Case(Sq=1, Sk=9, pad="mixed", causal=True, gate="fused"), Case(H=4, Hkv=4, pad="right", causal=True)]


@pytest.mark.parametrize("case", VARLEN, ids=[c.id for c in VARLEN])
def test_varlen_concat_matches_the_float64_twin(case):
    t, kwargs = make_inputs(case)
    err = max_errors(concat_with(vendor.CPU_VARLEN), twin, t, kwargs)
    assert max(err.values()) < TOL, err


def test_varlen_concat_has_no_plan_where_the_first_queries_would_lose_prefix_rows():
    """Causal left padding by more than one key (query 0 at position 0, the first real key at 2): FlashAttention's
    bottom-right mask over ``[P ; real keys]`` would hide prefix rows from it; the split path serves it."""
    case = Case(pad="mixed", causal=True)
    t, kwargs = make_inputs(case)
    assert varlen.padded_plan(kwargs["key_padding_mask"], True, case.Sq, case.L) is None
    assert varlen.padded_plan(kwargs["key_padding_mask"], True, case.Sq) is not None
    with pytest.raises(ValueError, match="no exact varlen plan"):
        call(concat_with(vendor.CPU_VARLEN), t, kwargs)


@pytest.mark.parametrize("op, case", [(vendor.CPU, Case(B=2, H=2, Hkv=1, Sq=3, Sk=5, L=2, causal=True, gate="pooled")),
                                      (vendor.CPU_VARLEN, Case(B=2, H=2, Hkv=1, Sq=4, Sk=4, L=2, pad="right",
                                                               causal=True, gate="pooled", shared=False))],
                         ids=["dense", "varlen"])
def test_concat_gradcheck_float64(op, case):
    t, kwargs = make_inputs(case)
    assert gradcheck_attention(concat_with(op), t, kwargs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_concat_in_low_precision_meets_the_flash_rule(dtype):
    case = Case(pad="right", causal=True, gate="pooled")
    t, kwargs = make_inputs(case, dtype)
    g = torch.randn(case.B, case.H, case.Sq, case.D, generator=torch.Generator().manual_seed(2)).to(dtype)
    floor = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for op in (vendor.CPU, vendor.CPU_VARLEN):
        assert_flash_rule_run(concat_with(op), twin, t, kwargs, g, floor=floor, name=op)


# -------------------------------------------------------------------------------------------- the rule


def test_ops_concat_path_on_cpu_is_exact_and_says_so(monkeypatch):
    case = Case(pad="right", causal=True, gate="pooled")
    t, kwargs = make_inputs(case)
    calls = []
    real = concat.concat_attention
    monkeypatch.setattr(concat, "concat_attention", lambda *a, **k: calls.append(k.get("op")) or real(*a, **k))
    err = max_errors(lambda *a, **k: fastprefix.gated_prefix_attention(*a, backend="triton", path="concat", **k), twin,
                     t, kwargs)
    assert max(err.values()) < TOL and calls == [vendor.CPU]
    route = fastprefix.ops.attention_route(t["q"], t["k"], t["prefix_k"], gate=t["gate"], path="concat", **kwargs)
    assert route == ("concat", "forced")
    assert fastprefix.ops.attention_path(t["q"], t["k"], prefix_k=t["prefix_k"], path="auto", **kwargs) == "fused"


@pytest.mark.parametrize("features, expected", [
    (dict(gate="dense"), ("split", vendor.CPU)),                       # a gate per query: no fold
    (dict(gate="fused"), ("split", vendor.CPU)),
    (dict(attn_bias=True), ("split", vendor.CPU)),                     # the vendor's bias: split
    (dict(window=(1, 0)), ("split", vendor.CPU)),                      # a window would hide prefix rows
    (dict(softcap=5.0), ("fused", None)),                              # no vendor op caps logits
    (dict(), ("concat", vendor.CPU)),
    (dict(gate="pooled"), ("concat", vendor.CPU)),
], ids=["token-gate", "apt-gate", "bias", "window", "softcap", "plain", "pooled"])
def test_a_forced_concat_falls_back_as_split_does(features, expected):
    case = Case(causal=True, gate=features.pop("gate", "none"))
    t, kwargs = make_inputs(case)
    if features.pop("attn_bias", False):
        features["attn_bias"] = torch.zeros(case.Sq, case.Sk, dtype=torch.float64)
    kwargs.update(features)
    spec = AttentionSpec.build(t["q"], t["k"], gate=t.get("gate"), gate_hidden=t.get("gate_hidden"), **kwargs)
    assert dispatch.choose_path(t["q"], t["k"], spec, "concat", prefix_k=t["prefix_k"])[:2] == expected
    # without the prefix the rule can't judge the concat path: it answers as for split
    split_answer = dispatch.choose_path(t["q"], t["k"], spec, "split")[:2]
    assert dispatch.choose_path(t["q"], t["k"], spec, "concat")[:2] == split_answer


def test_concat_refuses_what_it_does_not_serve():
    t, kwargs = make_inputs(Case(gate="dense"))
    with pytest.raises(ValueError, match="one gate row for every query"):
        call(concat_with(vendor.CPU), t, kwargs)
    t, kwargs = make_inputs(Case())
    with pytest.raises(ValueError, match="no softcap, attn_bias or window"):
        call(concat_with(vendor.CPU), t, dict(kwargs, window=(1, 1)))


# ------------------------------------------------------------------------- the CUDA branch on fake tensors


class Recorder:
    """Stands in for ``concat.VendorAttentionFunction`` on fake tensors: records what the path hands the vendor
    call, then makes it (the custom op's fake kernel would hide the aten calls)."""

    seen = []

    @classmethod
    def apply(cls, q, k, v, mask, causal, scale, op, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal):
        cls.seen.append(dict(q=q, k=k, v=v, mask=mask, causal=causal, op=op, cu_q=cu_q, cu_k=cu_k, cu_k2=cu_k2,
                             max_q=max_q, max_k=max_k, plan_causal=plan_causal))
        plan = varlen.plan_of_args(None, cu_q, cu_k, cu_k2, max_q, max_k, plan_causal)
        if plan is not None:
            return varlen.forward(op, q, k, v, plan, scale)[0]
        return vendor.forward(op, q, k, v, mask, causal, scale)[0]


@pytest.mark.parametrize("causal, Sq", [(False, 5), (True, 5), (True, 11)], ids=["full", "causal-Sq<Sk", "causal-Sq=Sk"])
def test_cuda_dense_concat_op_calls_on_fake_tensors(causal, Sq, monkeypatch):
    """FlashAttention-2 over ``K' = [g Pk ; K]`` ``[B, Hkv, L + Sk, D]``: GQA K/V not expanded, is_causal as given
    (bottom-right for this op: query t sees keys ``<= t + L + Sk - Sq``, every prefix row included)."""
    B, H, Hkv, Sk, L, D, scale = 2, 8, 2, 11, 4, 64, 0.125
    Recorder.seen = []
    monkeypatch.setattr(concat, "VendorAttentionFunction", Recorder)
    monkeypatch.setattr(concat, "arch_of", lambda t: 80)
    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(B, Hkv, Sk, D, dtype=torch.bfloat16, device="cuda")
        pk = torch.empty(Hkv, L, D, dtype=torch.bfloat16, device="cuda")
        gate = torch.empty(B, 1, L, dtype=torch.bfloat16, device="cuda")
        spec = AttentionSpec.build(q, k, causal=causal, scale=scale, gate=gate)
        with OpLog() as log:
            out = concat.concat_attention(q, k, k, pk, pk, spec)
        (seen,) = Recorder.seen
        assert seen["op"] == vendor.FLASH and seen["mask"] is None and seen["cu_q"] is None
        assert seen["k"].shape == (B, Hkv, L + Sk, D) and seen["k"].is_contiguous()
        (a,) = [a for f, a in log.calls if f is torch.ops.aten._scaled_dot_product_flash_attention.default]
        assert a["query"] is q and a["key"] is seen["k"] and a["value"] is seen["v"]
        assert (a["dropout_p"], a["is_causal"], a["scale"]) == (0.0, causal, scale)
        assert out.shape == (B, H, Sq, D) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_cuda_varlen_concat_op_calls_on_fake_tensors(kind, monkeypatch):
    """Each sequence's keys ``[g Pk ; its real keys]`` built by one gather into ``[total_k + blocks * L, Hkv, D]``;
    FlashAttention-2's varlen forward with ``cum_seq_k`` grown by L per sequence (int32), the queries q's own
    ``[B * Sq, H, D]`` memory."""
    B, H, Hkv, S, L, D, scale = 3, 8, 2, 6, 4, 64, 0.125
    if kind == "padded":
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0, 4:] = mask[1, 1:] = False
        host = varlen.padded_plan(mask, True, S, L)
        rows, T, total_k, blocks = B, S, int(mask.sum()), B
    else:
        cu_host = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
        host = varlen.packed_plan(cu_host, True, L)
        rows, T, total_k, blocks = 1, 18, 18, 3
    Recorder.seen = []
    monkeypatch.setattr(concat, "VendorAttentionFunction", Recorder)
    with FakeTensorMode():
        plan = fake_cuda_plan(host)
        q = torch.empty(rows, T, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        k = torch.empty(rows, Hkv, T, D, dtype=torch.bfloat16, device="cuda")
        pk = torch.empty(Hkv, L, D, dtype=torch.bfloat16, device="cuda")
        extra = (dict(key_padding_mask=torch.empty(B, S, dtype=torch.bool, device="cuda")) if kind == "padded"
                 else dict(cu_seqlens=plan.cu_q))
        spec = AttentionSpec.build(q, k, causal=True, scale=scale, **extra)
        with OpLog() as log:
            out = concat.concat_attention(q, k, k, pk, pk, spec, op=vendor.FLASH_VARLEN, plan=plan)
        (seen,) = Recorder.seen
        assert seen["k"].shape == (total_k + blocks * L, Hkv, D) and seen["k"].is_contiguous()
        assert seen["q"].shape == (rows * T, H, D) and seen["q"].stride() == (H * D, D, 1)
        fwd = [a for f, a in log.calls if f is torch.ops.aten._flash_attention_forward.default]
        assert len(fwd) == (1 if host.cu_k2 is None else 2)
        a = fwd[0]
        assert a["cum_seq_k"] is plan.cu_k and a["cum_seq_k"].dtype == torch.int32 and a["is_causal"]
        assert (a["max_q"], a["max_k"]) == (host.max_q, host.max_k)
        assert out.shape == (rows, H, T, D) and out.transpose(1, 2).is_contiguous()
    assert host.cu_k.tolist()[-1] == total_k + blocks * L


def test_custom_vendor_ops_pass_opcheck():
    case = Case(pad="right", causal=True, gate="pooled")
    t, kwargs = make_inputs(case)
    q, k, v = (t[n].detach() for n in ("q", "k", "v"))
    L = case.L
    keys = torch.cat([t["prefix_k"].detach().expand(case.B, -1, -1, -1), k], 2)
    values = torch.cat([t["prefix_v"].detach().expand(case.B, -1, -1, -1), v], 2)
    mask = torch.cat([torch.ones(case.B, L, dtype=torch.bool), kwargs["key_padding_mask"]], 1)
    dense = (q, keys, values, mask, True, 0.25, vendor.CPU)
    torch.library.opcheck(torch.ops.fastprefix.vendor_attention_fwd.default, dense,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse, seed, offset = torch.ops.fastprefix.vendor_attention_fwd(*dense)
    torch.library.opcheck(torch.ops.fastprefix.vendor_attention_bwd.default,
                          (torch.randn_like(out), q, keys, values, out, lse, seed, offset, mask, True, 0.25, vendor.CPU),
                          test_utils=("test_schema", "test_faketensor"))
    plan = varlen.packed_plan(torch.tensor([0, 2, 6], dtype=torch.int32), True)
    q_t, k_t = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    packed = (q_t, k_t, k_t, None, True, 0.25, vendor.CPU_VARLEN, *varlen.plan_args(plan)[1:])
    torch.library.opcheck(torch.ops.fastprefix.vendor_attention_fwd.default, packed,
                          test_utils=("test_schema", "test_faketensor"))
