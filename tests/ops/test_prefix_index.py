"""Per-row adapters in one attention call: ``prefix_index`` picks each batch row's prefix from a table
``[A, Hkv, L, D]`` and ``prefix_lengths`` gives each adapter its own length (the later slots hidden).

The contract (float64): row b of the call is row b alone with its adapter's first ``n`` slots as an ordinary
shared prefix, ``[Hkv, n, D]`` (n = 0: the real keys alone; a query that then sees nothing gets 0), on every
formulation the reference picks (split for a gate per query or per-row lengths, folded SDPA otherwise, explicit
with a bias or softcap), and through the Triton backend under the interpreter; gradients reach the table (summed
over the rows that share an adapter) and the gate.
"""

import math

import pytest
import torch

import fastprefix

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)


def _inputs(B=4, H=4, Hkv=2, Sq=5, Sk=7, L=3, D=8, A=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x = dict(q=r(B, H, Sq, D), k=r(B, Hkv, Sk, D), v=r(B, Hkv, Sk, D), prefix_k=r(A, Hkv, L, D),
             prefix_v=r(A, Hkv, L, D))
    kpm = torch.ones(B, Sk, dtype=torch.bool)
    kpm[1, :3] = False  # left padding
    kpm[B - 1, :] = False  # a row with no real key at all
    gate = torch.rand(B, Sq, L, generator=g, dtype=F64) * 2
    return x, kpm, gate


def _alone(x, b, a, n, gate, **call):
    """Row b with adapter a's first n slots as an ordinary shared prefix (n = 0: the real keys alone)."""
    q, k, v = (x[name][b:b + 1] for name in ("q", "k", "v"))
    if n > 0:
        return fastprefix.gated_prefix_attention(q, k, v, x["prefix_k"][a, :, :n], x["prefix_v"][a, :, :n],
                                                 gate=None if gate is None else gate[b:b + 1, :, :n], backend="torch",
                                                 **{**call, "key_padding_mask": call["key_padding_mask"][b:b + 1]})
    H, Hkv, Sq, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    Sk = k.shape[2]
    keys, values = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    s = q @ keys.transpose(-1, -2) * D ** -0.5
    seen = call["key_padding_mask"][b][None, None, None, :].expand(1, H, Sq, Sk)
    if call.get("causal"):
        seen = seen & torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    p = torch.softmax(s.masked_fill(~seen, -math.inf), dim=-1)
    return torch.where(seen.any(-1, keepdim=True), p, 0) @ values


INDEX, LENGTHS = [2, 0, 1, 2], [3, 2, 0]  # row 3 (no real key) takes adapter 2 (length 0): it sees nothing


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full-length", "own-lengths"])
@pytest.mark.parametrize("gate_mode", [None, "token"], ids=["ptv2", "gate-per-query"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_each_row_is_that_row_alone_with_its_adapter(lengths, gate_mode, causal):
    x, kpm, gate = _inputs()
    gate = gate if gate_mode else None
    idx = torch.tensor(INDEX)
    lens = None if lengths is None else torch.tensor(lengths)
    out = fastprefix.gated_prefix_attention(**x, gate=gate, key_padding_mask=kpm, causal=causal, prefix_index=idx,
                                            prefix_lengths=lens, backend="torch")
    assert torch.isfinite(out).all()
    for b, a in enumerate(INDEX):
        n = x["prefix_k"].shape[2] if lens is None else lengths[a]
        torch.testing.assert_close(out[b:b + 1], _alone(x, b, a, n, gate, key_padding_mask=kpm, causal=causal),
                                   **TIGHT)


def test_the_explicit_formulation_hides_the_slots_after_the_cap():
    """A bias and a softcap take the explicit formulation: the hidden slots are -inf after the cap (a capped -inf
    would be -softcap, still some mass)."""
    x, kpm, gate = _inputs()
    idx, lens = torch.tensor(INDEX), torch.tensor(LENGTHS)
    bias = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3), dtype=F64)
    call = dict(gate=gate, key_padding_mask=kpm, attn_bias=bias, softcap=2.0, backend="torch")
    out = fastprefix.gated_prefix_attention(**x, **call, prefix_index=idx, prefix_lengths=lens)
    for b, a in enumerate(INDEX):
        n = LENGTHS[a]
        if n == 0:
            continue  # the real keys alone (_alone has no bias or cap)
        want = fastprefix.gated_prefix_attention(
            *(x[name][b:b + 1] for name in ("q", "k", "v")), x["prefix_k"][a, :, :n], x["prefix_v"][a, :, :n],
            gate=gate[b:b + 1, :, :n], key_padding_mask=kpm[b:b + 1], attn_bias=bias, softcap=2.0, backend="torch")
        torch.testing.assert_close(out[b:b + 1], want, **TIGHT)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # no prefix slot, no real key: 0, not NaN


@pytest.mark.parametrize("bias_grad", [False, True], ids=["frozen-bias", "trained-bias"])
def test_a_bias_with_own_lengths_matches_the_explicit_formulation(bias_grad, monkeypatch):
    """A bias with per-row lengths (T5's position bias): a frozen one joins the CPU op's mask on the split path, one
    that requires grad takes the explicit formulation; both are the explicit formulation's output and gradients, and
    a row of an empty adapter is the bias'd attention over its real keys alone."""
    from fastprefix.reference import attention as reference
    from fastprefix.reference import split
    from fastprefix.spec import AttentionSpec

    calls = []
    real = split.split_attention
    monkeypatch.setattr(split, "split_attention", lambda *a: calls.append(1) or real(*a))

    x, kpm, gate = _inputs()
    kpm[3, 2:] = True  # the empty adapter's row sees some real keys
    idx, lens = torch.tensor(INDEX), torch.tensor(LENGTHS)
    bias = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_(bias_grad)
    leaves = {**{n: t.clone().requires_grad_() for n, t in x.items()}, "gate": gate.clone().requires_grad_()}
    call = dict(key_padding_mask=kpm, causal=True, attn_bias=bias, prefix_index=idx, prefix_lengths=lens)
    out = fastprefix.gated_prefix_attention(**leaves, **call, backend="torch")
    assert len(calls) == (0 if bias_grad else 1)
    spec = AttentionSpec.build(leaves["q"], leaves["k"], gate=leaves["gate"], **call)
    table = [leaves[n].index_select(0, idx) for n in ("prefix_k", "prefix_v")]
    want = reference.explicit_attention(leaves["q"], leaves["k"], leaves["v"], *table, spec, leaves["gate"])
    torch.testing.assert_close(out, want, **TIGHT)
    inputs = list(leaves.values()) + ([bias] if bias_grad else [])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    for got, ref in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(got, ref, **TIGHT)
    q, k, v = (x[n][3:4] for n in ("q", "k", "v"))
    alone = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=False,
        attn_mask=bias.detach() + torch.where(kpm[3:4, None, None, :] & torch.ones(5, 7, dtype=torch.bool).tril(2),
                                              0.0, -math.inf))
    torch.testing.assert_close(out[3:4], alone, **TIGHT)


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full-length", "own-lengths"])
def test_gradcheck_through_the_table_and_the_gate(lengths):
    x, kpm, gate = _inputs(B=3, H=2, Hkv=1, Sq=3, Sk=4, L=3, D=4, A=3)
    kpm[2, :] = True
    inputs = {**x, "gate": gate[:3]}
    names = list(inputs)
    for t in inputs.values():
        t.requires_grad_(True)
    idx = torch.tensor([2, 0, 2])  # two rows share adapter 2: its gradient is their sum
    lens = None if lengths is None else torch.tensor(lengths)

    def f(*args):
        return fastprefix.gated_prefix_attention(**dict(zip(names, args)), key_padding_mask=kpm, causal=True,
                                                 prefix_index=idx, prefix_lengths=lens, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["kernels", "reference-for-lengths"])
def test_the_triton_backend_matches(lengths):
    """Full-length adapters run the kernels on the rows' prefixes; per-row lengths run the reference path."""
    x, kpm, gate = _inputs()
    idx = torch.tensor(INDEX)
    lens = None if lengths is None else torch.tensor(lengths)
    call = dict(gate=gate, key_padding_mask=kpm, causal=True, prefix_index=idx, prefix_lengths=lens)
    out = fastprefix.gated_prefix_attention(**x, **call, backend="triton")
    torch.testing.assert_close(out, fastprefix.gated_prefix_attention(**x, **call, backend="torch"), **TIGHT)


@pytest.mark.parametrize("edit,match", [
    (dict(prefix_lengths=torch.tensor([1, 1, 1]), prefix_index=None), "prefix_lengths .* needs prefix_index"),
    (dict(prefix_index=torch.tensor([0, 1])), r"prefix_index must be an int32 or int64 tensor of shape \[B=4\]"),
    (dict(prefix_index=torch.tensor([0.0, 1, 2, 0])), "prefix_index must be an int32 or int64 tensor"),
    (dict(prefix_index=torch.tensor([0, 1, 3, 0])), r"prefix_index values must be in \[0, A=3\)"),
    (dict(prefix_lengths=torch.tensor([1, 4, 0])), r"prefix_lengths values must be in \[0, L=3\]"),
    (dict(prefix_lengths=torch.tensor([1, 2])), "prefix_lengths must have one length per table row, A=3"),
    (dict(prefix_k=torch.zeros(2, 3, 8, dtype=F64)), r"prefix_k must have shape \[A, Hkv=2, L, D=8\]"),
], ids=["lengths-without-index", "index-length", "index-dtype", "index-range", "lengths-range", "lengths-size",
        "table-dims"])
def test_bad_input_is_a_clear_error(edit, match):
    x, kpm, _ = _inputs()
    call = dict(**x, key_padding_mask=kpm, prefix_index=torch.tensor(INDEX), prefix_lengths=torch.tensor(LENGTHS))
    call.update(edit)
    with pytest.raises(ValueError, match=match):
        fastprefix.gated_prefix_attention(**call)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_a_query_that_sees_nothing_gets_zero_in_every_dtype(dtype):
    """The CPU op's log-sum-exp of a row with no real key sits near the lowest finite value of its mask's dtype (q's):
    with no prefix slot either, the row is 0 (in fp16 that value is -65504, not a float32 extreme)."""
    x, kpm, _ = _inputs()
    x = {name: t.to(dtype) for name, t in x.items()}
    out = fastprefix.gated_prefix_attention(**x, key_padding_mask=kpm, prefix_index=torch.tensor(INDEX),
                                            prefix_lengths=torch.tensor(LENGTHS), backend="torch")
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # row 3: no real key, adapter 2 of length 0
