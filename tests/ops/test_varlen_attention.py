"""The split path's varlen branch (padded batches and packed rows through the vendor's variable-length attention)
and the packed call of the op, under Triton's interpreter with the emulated varlen op (PyTorch's fused CPU op per
sequence, FlashAttention's ``[total, H, D]`` / ``[H, total]`` layouts and empty-row values).

Checked against the float64 twin (``fastprefix.reference.attention.explicit_attention``: one softmax over the
explicit ``[prefix ; keys]`` logits, a block-diagonal visibility for a packed row), forward and every gradient;
float64 gradcheck; the plans (unpadding, the two-call split of causal right padding, memoisation); the merge
kernels on token-major memory; and the CUDA branch's op calls on fake CUDA tensors (FakeTensorMode: the
``_flash_attention_forward`` / ``_backward`` arguments, dtypes, strides, the ``[H, total]`` fp32 log-sum-exp,
int32 ``cu_seqlens``).
"""

import functools
import gc
from typing import Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastprefix
from fastprefix import sequences
from fastprefix.integrations import packing as integration_packing
from fastprefix.kernels.attention import dispatch, fused, split, varlen, vendor
from fastprefix.reference import split as reference_split
from fastprefix.spec import AttentionSpec
from helpers.cases import make_inputs, maker, pattern_mask
from helpers.numerics import (ATTENTION_INPUTS, OpLog, assert_flash_rule_run, call, fake_cuda_plan,
                              gradcheck_attention, max_errors, split_attention)
from helpers.numerics import explicit_attention as twin  # the float64 twin (block-diagonal with cu_seqlens)

TOL = 1e-12  # float64: the paths against the twin


# ------------------------------------------------------------------------------------------------- cases


Case = maker("varlen", B=3, H=4, Hkv=2, Sq=6, Sk=6, L=3, D=16, pad="right")


split_varlen = functools.partial(split_attention, op=vendor.CPU_VARLEN)  # the split path on the emulated varlen op


CASES = [Case(pad=p, causal=c) for p in ("right", "left", "none", "allpad", "mixed") for c in (False, True)]
CASES += [Case(pad="holes", causal=False)]
CASES += [Case(pad=p, causal=True, gate=g) for p in ("right", "left") for g in ("pooled", "dense", "fused")]
CASES += [Case(pad="right", gate="dense", shared=False), Case(pad="mixed", causal=True, gate="fused", shared=False)]
CASES += [Case(Sq=3, Sk=9, pad=p, causal=c, gate="dense") for p in ("left", "right") for c in (False, True)]
CASES += [Case(Sq=1, Sk=9, pad="left", causal=True, gate="fused"), Case(H=4, Hkv=4, pad="right", causal=True)]
CASES += [Case(B=2, H=2, Hkv=1, Sq=70, Sk=70, L=5, pad="right", causal=True, gate="dense")]  # two query tiles


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_split_varlen_matches_the_float64_twin(case):
    t, kwargs = make_inputs(case)
    err = max_errors(split_varlen, twin, t, kwargs)
    assert max(err.values()) < TOL, err


def test_causal_padding_with_holes_has_no_plan_and_falls_back():
    case = Case(pad="holes", causal=True)
    assert varlen.padded_plan(pattern_mask(case), True, case.Sq) is None
    t, kwargs = make_inputs(case)
    with pytest.raises(ValueError, match="varlen split path"):
        call(split_varlen, t, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [Case(pad="right", causal=True, gate="dense"), Case(pad="mixed", gate="fused")],
                         ids=lambda c: c.id)
def test_split_varlen_in_low_precision_meets_the_flash_rule(case, dtype):
    """Error vs float64 <= 2 x the reference path's same-dtype error + a floor, as for the dense split."""
    t, kwargs = make_inputs(case, dtype)
    g = torch.randn(case.B, case.H, case.Sq, case.D, generator=torch.Generator().manual_seed(2)).to(dtype)
    floor = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert_flash_rule_run(split_varlen, twin, t, kwargs, g, floor=floor, name=case.id)


@pytest.mark.parametrize("case", [Case(B=2, H=2, Hkv=1, Sq=4, Sk=5, L=2, D=16, pad="right", causal=True, gate="dense"),
                                  Case(B=2, H=2, Hkv=1, Sq=4, Sk=4, L=2, D=16, pad="mixed", gate="fused")],
                         ids=lambda c: c.id)
def test_split_varlen_gradcheck_float64(case):
    t, kwargs = make_inputs(case)
    assert gradcheck_attention(split_varlen, t, kwargs, fast_mode=True)


# ------------------------------------------------------------------------------------------------- plans


def test_right_padding_causal_is_two_calls_over_the_same_tensors():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = varlen.padded_plan(mask, True, 6)
    assert plan.keys.tolist() == [0, 1, 2, 3, 6, 7, 12, 13, 14, 15, 16, 17]
    # per row: its first n queries (causal part) then the others; call A gives the causal parts the row's keys
    assert plan.cu_q.tolist() == [0, 4, 6, 8, 12, 18, 18]
    assert plan.cu_k.tolist() == [0, 4, 4, 6, 6, 12, 12]
    assert plan.cu_k2.tolist() == [0, 0, 4, 4, 6, 6, 12]
    assert (plan.max_q, plan.max_k, plan.causal) == (6, 6, True)
    for cu in (plan.cu_q, plan.cu_k, plan.cu_k2):
        assert cu.dtype == torch.int32


def test_left_padding_and_decoding_are_one_causal_call():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for Sq in (6, 2, 1):  # prefill, and decoding Sq < Sk with a cache
        plan = varlen.padded_plan(mask, True, Sq)
        assert plan.cu_k2 is None and plan.causal
        assert plan.cu_q.tolist() == [0, Sq, 2 * Sq] and plan.cu_k.tolist() == [0, 4, 9]


def test_non_causal_takes_any_padding_in_one_call():
    mask = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    plan = varlen.padded_plan(mask, False, 6)
    assert plan.cu_k2 is None and not plan.causal
    assert plan.cu_q.tolist() == [0, 6, 12, 18] and plan.cu_k.tolist() == [0, 4, 4, 6]
    assert varlen.padded_plan(torch.zeros(2, 6, dtype=torch.bool), False, 6) is None  # no real key at all


def test_the_plan_is_computed_once_per_mask_and_again_after_an_in_place_change(monkeypatch):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    built = []
    real = varlen._padded_plan
    monkeypatch.setattr(varlen, "_padded_plan", lambda *a: built.append(1) or real(*a))
    first = varlen.padded_plan(mask, True, 4)
    for _ in range(3):  # every layer of a forward hands over the same mask tensor
        assert varlen.padded_plan(mask, True, 4) is first
    assert len(built) == 1
    mask[1, 2] = True  # its version counter moves
    assert varlen.padded_plan(mask, True, 4).cu_k.tolist()[-1] == 6 and len(built) == 2
    entries = len(sequences._MEMO)
    del mask, first
    gc.collect()
    assert len(sequences._MEMO) == entries - 1  # the entry died with its tensor


def test_packed_plan_and_concat_order():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # a zero-length sequence in the middle
    plan = varlen.packed_plan(cu, True)
    assert plan.keys is None and plan.cu_q is cu and plan.cu_k is cu and (plan.max_q, plan.max_k) == (4, 4)
    cat = varlen.packed_plan(cu, True, prefix_len=2)
    assert cat.cu_k.tolist() == [0, 5, 7, 13] and cat.cu_k.dtype == torch.int32 and cat.max_k == 6
    # rows of [P ; K] per sequence from [3 blocks x 2 prefix rows ; 7 key rows]
    assert cat.order.tolist() == [0, 1, 6, 7, 8, 2, 3, 4, 5, 9, 10, 11, 12]


# ------------------------------------------------------------------------------------ token-major memory


def test_merge_kernel_reads_token_major_outputs_through_strides():
    """o_k as ``[B, H, Sq, D]`` seen in ``[B * Sq, H, D]`` memory and lse_k as ``[B, H, Sq]`` seen in ``[H, B * Sq]``
    memory: the merge equals its naive twin on contiguous copies."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, Sq, L, D = 2, 4, 2, 5, 3, 16
    q = torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64)
    pk, pv = (torch.randn(Hkv, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    gate = torch.rand(B, Sq, L, generator=g, dtype=torch.float64)
    o_t = torch.randn(B * Sq, H, D, generator=g, dtype=torch.float64)
    lse_t = torch.randn(H, B * Sq, generator=g, dtype=torch.float64)
    lse_t[1, 3] = float("inf")  # FlashAttention's empty row: no mass
    o_k, lse_k = o_t.view(B, Sq, H, D).transpose(1, 2), lse_t.view(H, B, Sq).transpose(0, 1)
    out, _ = split.merge_forward(q, pk, pv, gate, o_k, lse_k, 0.25)
    want, _, _ = reference_split.merge_forward(q, pk, pv, gate, o_k.contiguous(),
                                               lse_k.contiguous().masked_fill(lse_k.isinf(), float("-inf")), 0.25)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_the_varlen_queries_are_a_view_of_q_and_the_outputs_views_of_the_vendor_layout(monkeypatch):
    """No copy of q: ``[B, Sq, H, D]`` memory is the token-major queries; o_k and lse_k reach the merge as views."""
    case = Case(pad="right", causal=True)
    t, kwargs = make_inputs(case)
    q = t["q"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # transformers' layout
    k, v = t["k"].detach(), t["v"].detach()
    spec = AttentionSpec.build(q, k, **kwargs)
    plan = split.split_plan(q, k, spec)
    seen = {}
    real_forward, real_merge = varlen.forward, split.merge_forward
    monkeypatch.setattr(varlen, "forward", lambda op, q_t, *a, **kw: seen.update(q_t=q_t) or real_forward(op, q_t, *a,
                                                                                                           **kw))
    monkeypatch.setattr(split, "merge_forward", lambda *a: seen.update(o_k=a[4], lse_k=a[5]) or real_merge(*a))
    split._forward(q, k, v, t["prefix_k"].detach(), t["prefix_v"].detach(), spec, vendor.CPU_VARLEN, plan)
    assert seen["q_t"].data_ptr() == q.data_ptr() and seen["q_t"].shape == (case.B * case.Sq, case.H, case.D)
    assert seen["o_k"].shape == (case.B, case.H, case.Sq, case.D) and seen["o_k"].transpose(1, 2).is_contiguous()
    assert seen["lse_k"].shape == (case.B, case.H, case.Sq) and seen["lse_k"].stride() == (case.Sq, case.B * case.Sq, 1)


# ------------------------------------------------------------------------------------------ packed calls

LENGTHS = (5, 1, 7, 3)


def packed_leaves(dtype=torch.float64, gate=None, H=4, Hkv=2, L=3, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    t = dict(q=randn(1, H, T, D), k=randn(1, Hkv, T, D), v=randn(1, Hkv, T, D), prefix_k=randn(Hkv, L, D),
             prefix_v=randn(Hkv, L, D))
    if gate == "token":
        t["gate"] = torch.rand(1, T, L, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    elif gate == "pooled":
        t["gate"] = torch.rand(1, 1, L, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    elif gate == "apt":
        t.update(gate_hidden=randn(1, T, 8), gate_weight=randn(8, L), gate_bias=randn(L),
                 layer_scale=torch.full((), 0.7, dtype=dtype).requires_grad_())
    return t


def cu_seqlens(lengths=LENGTHS):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def op_path(path, backend="triton"):
    def fn(*a, **kw):
        return fastprefix.gated_prefix_attention(*a, backend=backend, path=path, **kw)
    return fn


PACKED = [(c, w, g) for c in (False, True) for w in (None, "window") for g in ("none", "token", "pooled", "apt")]


@pytest.mark.parametrize("causal, window, gate", PACKED, ids=["-".join(map(str, p)) for p in PACKED])
def test_packed_call_on_every_path_matches_the_twin(causal, window, gate, monkeypatch):
    """``cu_seqlens``: the reference path (re-padded), the fused kernel (re-padded), the split path (natively
    varlen) and, where the gate folds and no window hides a key, the concat path (natively varlen)."""
    t = packed_leaves(gate=None if gate == "none" else gate)
    kwargs = dict(causal=causal, cu_seqlens=cu_seqlens())
    if window:
        kwargs["window"] = (2, 0) if causal else (2, 1)
    taken = []
    for module, name in ((fused, "gated_prefix_attention"), (split, "split_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: taken.append(_n) or _r(*a, **k))
    paths = [("reference", op_path(None, "torch")), ("fused", op_path("fused")), ("split", op_path("split"))]
    if gate in ("none", "pooled") and not window:
        paths.append(("concat", op_path("concat")))
    for name, fn in paths:
        taken.clear()
        err = max_errors(fn, twin, t, kwargs)
        assert max(err.values()) < TOL, (name, err)
        expect = {"reference": [], "fused": ["gated_prefix_attention"], "split": ["split_attention"],
                  "concat": []}[name]
        assert taken == expect, name


def test_packed_split_takes_the_varlen_op_and_packed_concat_with_a_token_gate_falls_back_to_split(monkeypatch):
    t = packed_leaves(gate="token")
    q, k, pk = t["q"], t["k"], t["prefix_k"]
    cu = cu_seqlens()
    spec = AttentionSpec.build(q, k, causal=True, cu_seqlens=cu, gate=t["gate"])
    assert dispatch.choose_path(q, k, spec, "split")[:2] == ("split", vendor.CPU_VARLEN)
    assert dispatch.choose_path(q, k, spec, "concat", prefix_k=pk)[:2] == ("split", vendor.CPU_VARLEN)
    assert fastprefix.ops.attention_route(q, k, pk, gate=t["gate"], causal=True, cu_seqlens=cu,
                                          path="concat") == ("split", "forced")


def test_packed_gradcheck_float64_split():
    t = packed_leaves(gate="token", D=8)
    kwargs = dict(causal=True, cu_seqlens=cu_seqlens())
    assert gradcheck_attention(op_path("split"), t, kwargs, fast_mode=True)


def test_packed_equals_each_sequence_alone():
    """What a packed call means: each sequence's rows of the output are that sequence's call alone."""
    t = {n: x.detach() for n, x in packed_leaves().items()}
    out = fastprefix.gated_prefix_attention(*(t[n] for n in ATTENTION_INPUTS), causal=True, cu_seqlens=cu_seqlens(),
                                            backend="triton", path="split")
    start = 0
    for n in LENGTHS:
        alone = fastprefix.gated_prefix_attention(t["q"][:, :, start:start + n], t["k"][:, :, start:start + n],
                                                  t["v"][:, :, start:start + n], t["prefix_k"], t["prefix_v"],
                                                  causal=True, backend="torch")
        torch.testing.assert_close(out[:, :, start:start + n], alone, rtol=1e-12, atol=1e-12)
        start += n


@pytest.mark.parametrize("bad, match", [
    (dict(cu_seqlens=torch.tensor([0, 5, 16])), "int32"),
    (dict(cu_seqlens=torch.tensor([0, 5, 15], dtype=torch.int32)), "rise from 0 to the row's 16"),
    (dict(cu_seqlens=torch.tensor([0, 9, 5, 16], dtype=torch.int32)), "without falling"),
    (dict(cu_seqlens=torch.tensor([[0, 16]], dtype=torch.int32)), "1-D int32"),
    (dict(cu_seqlens=cu_seqlens(), key_padding_mask=torch.ones(1, 16, dtype=torch.bool)), "no padding"),
    (dict(cu_seqlens=cu_seqlens(), attn_bias=torch.zeros(16, 16, dtype=torch.float64)), "attn_bias"),
], ids=["int64", "short", "falling", "2d", "mask", "bias"])
def test_bad_packed_calls_are_value_errors(bad, match):
    t = {n: x.detach() for n, x in packed_leaves().items()}
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=match):
            fastprefix.gated_prefix_attention(*(t[n] for n in ATTENTION_INPUTS), backend=backend, **bad)


def test_packed_needs_one_row_whose_queries_are_its_keys():
    t = {n: x.detach() for n, x in packed_leaves().items()}
    q, k, v = t["q"], t["k"], t["v"]
    with pytest.raises(ValueError, match="packed into one row"):
        fastprefix.gated_prefix_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                          t["prefix_k"], t["prefix_v"], cu_seqlens=cu_seqlens())
    with pytest.raises(ValueError, match="packed into one row"):
        fastprefix.gated_prefix_attention(q[:, :, :8], k, v, t["prefix_k"], t["prefix_v"], cu_seqlens=cu_seqlens())


def test_the_integration_and_the_ops_share_one_packing_bookkeeping():
    """The gathers the integration used to own live below both (``fastprefix.sequences``), not copied."""
    assert integration_packing.Packing is sequences.Packing
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 6, 7, 7]])
    packing = sequences.Packing(ids)
    assert packing.cu_seqlens.tolist() == [0, 2, 5, 6, 9, 10, 12] and packing.cu_seqlens.dtype == torch.int32
    x = torch.arange(12.0).view(2, 6, 1)
    torch.testing.assert_close(packing.pack(packing.tokens(x)), x)
    pooled = torch.arange(6.0).view(6, 1, 1)
    assert packing.per_token(pooled).view(-1).tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5]
    cu = cu_seqlens()
    by_cu = sequences.Packing.of_cu_seqlens(cu, sum(LENGTHS))
    assert by_cu.lengths.tolist() == list(LENGTHS) and torch.equal(by_cu.cu_seqlens, cu)
    assert sequences.Packing.of_cu_seqlens(cu, sum(LENGTHS)) is by_cu  # once per cu_seqlens tensor


def test_row_weights_keep_each_rows_own_keys():
    ids = torch.tensor([[0, 0, 1], [2, 3, 3]])
    packing = sequences.Packing(ids)
    B, T, H, L = 2, 3, 1, 2
    w = torch.arange(B * T * (L + B * T), dtype=torch.float64).view(1, H, B * T, L + B * T)
    rows = packing.row_weights(w)
    assert rows.shape == (B, H, T, L + T)
    torch.testing.assert_close(rows[1, 0, 2], torch.cat([w[0, 0, 5, :L], w[0, 0, 5, L + 3:]]))


# ------------------------------------------------------------------------- the CUDA branch on fake tensors


def flash_calls(log, name):
    return [a for f, a in log.calls if f is getattr(torch.ops.aten, name).default]


@pytest.mark.parametrize("kind", ["packed", "left", "right"])
def test_cuda_varlen_op_calls_on_fake_tensors(kind):
    """What the CUDA branch asks of FlashAttention-2's varlen ops: token-major bf16 q ``[B*Sq, H, D]`` and real
    keys ``[total_k, Hkv, D]`` (GQA not expanded, last dim contiguous), int32 ``cum_seq_q`` / ``cum_seq_k``, the
    plan's max lengths, is_causal, no dropout; an fp32 ``[H, total_q]`` log-sum-exp; a second non-causal call over
    ``cu_k2`` for causal right padding (outputs summed, lse the minimum); the backward given ``w * dO``, the merged
    output and that lse, with the forward's rng state, once per call."""
    B, H, Hkv, S, D, scale = 3, 8, 2, 6, 64, 0.125
    if kind == "packed":
        host = varlen.packed_plan(cu_seqlens((5, 1, 7, 5)), True)
        Tq, Tk = 18, 18
    else:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0, :2] = mask[1, :4] = False
        if kind == "right":
            mask = mask.flip(1)
        host = varlen.padded_plan(mask, True, S)
        Tq, Tk = B * S, int(mask.sum())
    calls = 1 if host.cu_k2 is None else 2
    assert calls == (2 if kind == "right" else 1)
    with FakeTensorMode():
        plan = fake_cuda_plan(host)
        q = torch.empty(Tq, H, D, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(Tk, Hkv, D, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(Tk, Hkv, D, dtype=torch.bfloat16, device="cuda")
        with OpLog() as log:
            o, lse, rng = varlen.forward(vendor.FLASH_VARLEN, q, k, v, plan, scale)
        fwd = flash_calls(log, "_flash_attention_forward")
        assert len(fwd) == calls
        for i, a in enumerate(fwd):
            assert a["query"] is q and a["key"] is k and a["value"] is v  # [total_k, Hkv, D]: not expanded
            assert q.stride() == (H * D, D, 1) and k.stride() == (Hkv * D, D, 1)
            assert a["cum_seq_q"] is plan.cu_q and a["cum_seq_k"] is (plan.cu_k if i == 0 else plan.cu_k2)
            assert a["cum_seq_q"].dtype == torch.int32 and a["cum_seq_k"].dtype == torch.int32
            assert a["cum_seq_q"].device.type == "cuda"
            assert (a["max_q"], a["max_k"]) == (host.max_q, host.max_k)
            assert (a["dropout_p"], a["is_causal"], a["return_debug_mask"], a["scale"]) == (0.0, i == 0, False, scale)
            assert a["window_size_left"] is None and a["window_size_right"] is None
        if calls == 2:
            names = [f.__name__ for f, _ in log.calls[-2:]]
            assert names == ["add.Tensor", "minimum.default"], names
        assert o.shape == (Tq, H, D) and o.dtype == torch.bfloat16
        assert lse.shape == (H, Tq) and lse.dtype == torch.float32
        assert rng[0].shape == (2,) and rng[0].dtype == torch.uint64 and rng[1].dtype == torch.uint64

        grad, out = torch.empty_like(o), torch.empty_like(o)
        with OpLog() as log:
            dq, dk, dv = varlen.backward(vendor.FLASH_VARLEN, grad, q, k, v, out, lse, rng, plan, scale)
        bwd = flash_calls(log, "_flash_attention_backward")
        assert len(bwd) == calls
        for i, a in enumerate(bwd):
            assert a["grad_out"] is grad and a["out"] is out and a["logsumexp"] is lse
            assert a["cum_seq_q"] is plan.cu_q and a["cum_seq_k"] is (plan.cu_k if i == 0 else plan.cu_k2)
            assert (a["max_q"], a["max_k"], a["dropout_p"], a["is_causal"]) == (host.max_q, host.max_k, 0.0, i == 0)
            assert a["rng_state"] is rng[0] and a["unused"] is rng[1]
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_cuda_packed_window_reaches_flash_attention_on_fake_tensors():
    host = varlen.packed_plan(cu_seqlens((4, 4)), False)
    with FakeTensorMode():
        plan = fake_cuda_plan(host)
        q = torch.empty(8, 4, 64, dtype=torch.float16, device="cuda")
        k = torch.empty(8, 2, 64, dtype=torch.float16, device="cuda")
        with OpLog() as log:
            o, lse, rng = varlen.forward(vendor.FLASH_VARLEN, q, k, k, plan, 0.125, (2, 1))
            varlen.backward(vendor.FLASH_VARLEN, o, q, k, k, o, lse, rng, plan, 0.125, (2, 1))
        for name in ("_flash_attention_forward", "_flash_attention_backward"):
            (a,) = flash_calls(log, name)
            assert (a["window_size_left"], a["window_size_right"]) == (2, 1)


def test_split_forward_hands_the_merge_the_vendor_layouts_on_fake_cuda(monkeypatch):
    """The split path's CUDA varlen branch up to the merge: q as a view (no copy), the real keys gathered once,
    o_k and lse_k as strided views of ``[B*Sq, H, D]`` and ``[H, B*Sq]``."""
    B, H, Hkv, S, L, D = 2, 4, 2, 5, 3, 64
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    host = varlen.padded_plan(mask, False, S)
    total_k = int(mask.sum())
    seen = {}
    monkeypatch.setattr(split, "merge_forward", lambda *a: seen.update(args=a) or (a[0], a[5]))
    with FakeTensorMode():
        plan = fake_cuda_plan(host)
        q = torch.empty(B, S, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        k = torch.empty(B, Hkv, S, D, dtype=torch.bfloat16, device="cuda")
        pk = torch.empty(Hkv, L, D, dtype=torch.bfloat16, device="cuda")
        spec = AttentionSpec.build(q, k, key_padding_mask=torch.empty(B, S, dtype=torch.bool, device="cuda"))
        with OpLog() as log:
            out = split._forward(q, k, k, pk, pk, spec, vendor.FLASH_VARLEN, plan)
        (a,) = flash_calls(log, "_flash_attention_forward")
        assert a["query"].shape == (B * S, H, D) and a["query"].stride() == (H * D, D, 1)
        assert a["key"].shape == (total_k, Hkv, D) and a["key"].is_contiguous()
        assert [f.__name__ for f, _ in log.calls].count("index_select.default") == 2  # k and v, once each
        o_k, lse_k = seen["args"][4], seen["args"][5]
        assert o_k.shape == (B, H, S, D) and o_k.stride() == (S * H * D, D, H * D, 1)
        assert lse_k.shape == (B, H, S) and lse_k.stride() == (S, B * S, 1) and lse_k.dtype == torch.float32
        assert out[2].shape == (H, B * S)  # lse_k goes back to the backward in the vendor's layout


def test_custom_ops_with_varlen_arguments_pass_opcheck():
    case = Case(B=2, H=2, Hkv=1, Sq=4, Sk=4, L=2, pad="right", causal=True, gate="dense")
    t, kwargs = make_inputs(case)
    q, k, v, pk, pv, gate = (t[n].detach() for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate"))
    plan = varlen.padded_plan(kwargs["key_padding_mask"], True, case.Sq)
    args = (q, k, v, pk, pv, gate, kwargs["key_padding_mask"], True, 0.25, vendor.CPU_VARLEN, None, -1, -1,
            *varlen.plan_args(plan))
    torch.library.opcheck(torch.ops.fastprefix.split_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse, lse_k, seed, offset = torch.ops.fastprefix.split_attention_fwd(*args)
    assert lse_k.shape == (case.H, case.B * case.Sq)
    bwd = (torch.randn_like(out), q, k, v, pk, pv, gate, kwargs["key_padding_mask"], out, lse, lse_k, seed, offset,
           True, 0.25, vendor.CPU_VARLEN, None, -1, -1, False, *varlen.plan_args(plan))
    torch.library.opcheck(torch.ops.fastprefix.split_attention_bwd.default, bwd,
                          test_utils=("test_schema", "test_faketensor"))


def test_optional_plan_fields_leave_the_dense_split_unchanged():
    """The dense ops keep their arguments: the varlen ones default to none."""
    assert varlen.plan_args(None) == (None, None, None, None, 0, 0, False)
    assert varlen.plan_of_args(*varlen.plan_args(None)) is None
    plan: Optional[varlen.Plan] = varlen.packed_plan(cu_seqlens(), False)
    assert varlen.plan_of_args(*varlen.plan_args(plan))[:7] == plan[:7]
