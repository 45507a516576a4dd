"""Packed sequences reach the attention op packed: one call per layer on the batch as one row ``[1, B * T]`` with
the sequences' ``cu_seqlens`` (never re-padded by the integration), APT's gate per token or per sequence, and the
split path's varlen branch (forced, under Triton's interpreter: the emulated varlen op) giving the reference
path's outputs and gradients in float64.
"""

import pytest
import torch

import fastprefix
from fastprefix import ops
from fastprefix.kernels.attention import vendor
from helpers.models import METHODS, VOCAB, prepared, tiny

LENGTHS = (5, 1, 7, 3)
TOL = dict(rtol=0, atol=1e-10)


def applied(family, method):
    return prepared(tiny(family, dropout=0.0), method)


def packed_ids(rows, seed=3):
    """``input_ids [B, T]`` and ``position_ids`` restarting per sequence, rows of the given sequence lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(3, VOCAB, (sum(r),), generator=g) for r in rows])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    return dict(input_ids=ids, position_ids=positions, use_cache=False)


def spy(monkeypatch):
    calls, real = [], ops.gated_prefix_attention
    monkeypatch.setattr(ops, "gated_prefix_attention", lambda q, *a, **k: calls.append((q.shape, k)) or real(q, *a, **k))
    return calls


@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled"])
def test_packed_calls_the_op_once_per_layer_on_the_packed_row(method, monkeypatch):
    calls = spy(monkeypatch)
    model = applied("llama", method)
    model(**packed_ids([LENGTHS]))
    assert len(calls) == model.config.num_hidden_layers
    T, L = sum(LENGTHS), METHODS[method]().num_virtual_tokens
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for shape, kw in calls:
        assert list(shape) == [1, model.config.num_attention_heads, T, 8]
        assert kw["key_padding_mask"] is None and kw["causal"] is True
        assert kw["cu_seqlens"].dtype == torch.int32 and kw["cu_seqlens"].tolist() == cu
        if method == "apt":  # the token gate reads each token's hidden state as it lies
            assert list(kw["gate_hidden"].shape[:2]) == [1, T]
        if method == "apt-pooled":  # each sequence's own running mean, given to its tokens
            assert list(kw["gate"].shape) == [1, T, L]
    # one cu_seqlens tensor for every layer: the plans memoised on it are built once per forward
    assert len({id(kw["cu_seqlens"]) for _, kw in calls}) == 1


def test_several_packed_rows_are_one_row_of_all_their_sequences(monkeypatch):
    calls = spy(monkeypatch)
    model = applied("qwen2", "apt")
    rows = [(3, 6, 2), (8, 3)]
    model(**packed_ids(rows))
    shape, kw = calls[0]
    assert shape[0] == 1 and shape[2] == 2 * 11
    assert kw["cu_seqlens"].tolist() == [0, 3, 9, 11, 19, 22]


def test_pooled_gate_of_a_packed_encoder_is_each_sequences_mean(monkeypatch):
    calls = spy(monkeypatch)
    model = applied("bert", "apt-pooled")
    model(**packed_ids([LENGTHS]))
    gate = calls[0][1]["gate"][0]  # [T, L]
    start = 0
    for n in LENGTHS:  # one row per sequence: the same gate for each of its tokens
        torch.testing.assert_close(gate[start:start + n], gate[start:start + 1].expand(n, -1), **TOL)
        start += n
    assert not torch.allclose(gate[0], gate[LENGTHS[0]])


@pytest.mark.parametrize("method", ["ptv2", "apt", "apt-pooled"])
def test_split_path_varlen_equals_the_reference_on_packed_models(method, split_calls):
    """The Triton backend with the split path forced runs packed rows natively varlen (here the emulated varlen op)
    and gives the reference backend's outputs and gradients."""
    model = applied("llama", method)
    batch = packed_ids([LENGTHS])
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with fastprefix.use_backend(model, backend):
            out = model(**batch).logits
        out.pow(2).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert split_calls == [vendor.CPU_VARLEN] * model.config.num_hidden_layers
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], **TOL, msg=name)
