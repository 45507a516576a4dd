"""Packed sequences (padding-free batches): every packed sequence gives what it gives alone.

A packed row ``[1, T]`` holds the sequences of ``LENGTHS`` (one of length 1) back to back, signalled as
transformers' padding-free path does: ``position_ids`` restarting per sequence (the mask functions' packed
overlay, and the attention's own reading of them when a KV cache keeps the mask functions from seeing it),
FlashAttention's ``cu_seq_lens_q/k`` + ``max_length_q/k``, or both. Each sequence alone gets the positions it
has in the row. Prefix methods (P-Tuning v2, APT with either gate) on Llama, Qwen2, Mistral and BERT; prompt
methods (PT, DePT, ADePT) put their prompt in front of every sequence. Float64, 1e-10, forward and gradients.
"""

import warnings

import pytest
import torch

import fastprefix
from fastprefix.integrations.packing import prompt_packing, token_slots
from helpers.models import METHODS, VOCAB, prepared, tiny

LENGTHS = (5, 1, 7, 3)
TOL = dict(rtol=0, atol=1e-10)
DECODERS = ("llama", "qwen2", "mistral")


def sequences(lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def restarting(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def packed_kwargs(seqs, signal):
    """``input_ids [1, T]`` and the packing signal(s) of ``signal``."""
    lengths = [len(s) for s in seqs]
    kw = dict(input_ids=torch.cat(seqs)[None])
    if signal in ("position_ids", "cache", "both"):
        kw["position_ids"] = restarting(lengths)
    if signal in ("cu_seq_lens", "both"):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(lengths), max_length_k=max(lengths))
    if signal != "cache":  # "cache": the model makes a KV cache, so only the attention sees the restarts
        kw["use_cache"] = False
    return kw


def alone_positions(seqs, signal):
    """Each sequence's positions in the packed row: its own from 0, or (cu_seq_lens only) the row's."""
    starts = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()])
    return [torch.arange(len(s)) + (starts[i] if signal == "cu_seq_lens" else 0) for i, s in enumerate(seqs)]


def output(model, family, **kw):
    out = model(**kw)
    return out.last_hidden_state if family == "bert" else out.logits


def applied(family, method, backend=None):
    """``family``'s tiny model with ``method`` applied, the same weights every call."""
    # the method module in float64 (it is created in float32): its gradients compare to 1e-10
    return prepared(tiny(family, dropout=0.0), method, backend=backend)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_and_alone(model, family, seqs, signal):
    """(packed output, the alone outputs concatenated, packed grads, alone grads) of a fixed linear loss."""
    model.zero_grad()
    packed = output(model, family, **packed_kwargs(seqs, signal))
    w = torch.randn(packed.shape, dtype=packed.dtype, generator=torch.Generator().manual_seed(5))
    (packed * w).sum().backward()
    g_packed = grads(model)
    model.zero_grad()
    outs = [output(model, family, input_ids=s[None], position_ids=p[None], use_cache=False)
            for s, p in zip(seqs, alone_positions(seqs, signal))]
    alone = torch.cat(outs, dim=1)
    (alone * w).sum().backward()
    return packed, alone, g_packed, grads(model)


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


PREFIX_CELLS = [(f, m, "position_ids") for f in DECODERS for m in ("ptv2", "apt", "apt-pooled")]
PREFIX_CELLS += [("llama", "apt", s) for s in ("cache", "cu_seq_lens", "both")]
PREFIX_CELLS += [("llama", "apt-pooled", "cu_seq_lens"), ("qwen2", "ptv2", "both")]
PREFIX_CELLS += [("bert", m, s) for m in ("ptv2", "apt-pooled") for s in ("position_ids", "cu_seq_lens")]


@pytest.mark.parametrize("family, method, signal", [pytest.param(*c, id="-".join(c)) for c in PREFIX_CELLS])
def test_prefix_packed_equals_alone(family, method, signal):
    model = applied(family, method)
    packed, alone, g_packed, g_alone = packed_and_alone(model, family, sequences(), signal)
    torch.testing.assert_close(packed, alone, **TOL)
    assert_grads_close(g_packed, g_alone)


@pytest.mark.parametrize("method", ["ptv2", "apt-pooled"])
def test_length_one_sequences_at_both_ends(method):
    model = applied("llama", method)
    packed, alone, g_packed, g_alone = packed_and_alone(model, "llama", sequences((1, 4, 1)), "position_ids")
    torch.testing.assert_close(packed, alone, **TOL)
    assert_grads_close(g_packed, g_alone)


def test_several_packed_rows():
    """Rows of a [B, T] batch packed differently (transformers' rule holds for any batch size)."""
    model = applied("qwen2", "apt")
    rows = [sequences((3, 6, 2), seed=4), sequences((8, 3), seed=5)]
    kw = dict(input_ids=torch.stack([torch.cat(r) for r in rows]),
              position_ids=torch.cat([restarting([len(s) for s in r]) for r in rows]), use_cache=False)
    packed = output(model, "qwen2", **kw)
    for b, row in enumerate(rows):
        alone = torch.cat([output(model, "qwen2", input_ids=s[None], position_ids=torch.arange(len(s))[None],
                                  use_cache=False) for s in row], dim=1)
        torch.testing.assert_close(packed[b:b + 1], alone, **TOL)


@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens"])
def test_sliding_window_applies_within_each_packed_sequence(signal):
    """Mistral with a 3-token window (shorter than the sequences): the window runs inside each sequence."""
    model = prepared(tiny("mistral", sliding_window=3), "apt", seed=None)
    packed, alone, g_packed, g_alone = packed_and_alone(model, "mistral", sequences(), signal)
    torch.testing.assert_close(packed, alone, **TOL)
    assert_grads_close(g_packed, g_alone)


def test_packed_calls_the_op_once_per_layer_packed(monkeypatch):
    """Packed rows reach the op packed, never re-padded: one call per layer on ``[1, H, T, D]`` with the sequences'
    ``cu_seqlens`` and no padding mask (issue 26; it used to be the unpacked ``[n, H, S_max, D]`` batch)."""
    from fastprefix import ops

    calls, real = [], ops.gated_prefix_attention
    monkeypatch.setattr(ops, "gated_prefix_attention",
                        lambda q, *a, **k: calls.append((q.shape, k)) or real(q, *a, **k))
    model = applied("llama", "apt")
    model(**packed_kwargs(sequences(), "position_ids"))
    assert len(calls) == model.config.num_hidden_layers
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for shape, kw in calls:
        assert list(shape) == [1, model.config.num_attention_heads, sum(LENGTHS), 8]
        assert kw.get("key_padding_mask") is None and kw["cu_seqlens"].tolist() == cu


def _count_kernel_launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or run(self, *a, **k))
    return launches


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_triton_packed_equals_reference_packed(method, monkeypatch):
    seqs = sequences((4, 1, 3))
    model = applied("llama", method)
    launches = _count_kernel_launches(monkeypatch)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with fastprefix.use_backend(model, backend):
            out = output(model, "llama", **packed_kwargs(seqs, "both"))
        out.pow(2).sum().backward()
        results.append((out, grads(model)))
    assert launches, "the Triton model launched no kernel"
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    assert_grads_close(results[1][1], results[0][1])


def test_packed_attention_maps_are_each_sequences_own_placed_in_the_row():
    model = applied("llama", "apt")
    seqs = sequences()
    packed = model(**packed_kwargs(seqs, "position_ids"), output_attentions=True).attentions
    L, T = METHODS["apt"]().num_virtual_tokens, sum(LENGTHS)
    start = 0
    for s in seqs:
        n = len(s)
        alone = model(input_ids=s[None], position_ids=torch.arange(n)[None], output_attentions=True).attentions
        for layer, (p, a) in enumerate(zip(packed, alone)):
            assert p.shape[-1] == L + T
            expect = torch.zeros_like(p[:, :, start:start + n])
            expect[..., :L] = a[..., :L]
            expect[..., L + start:L + start + n] = a[..., L:]
            torch.testing.assert_close(p[:, :, start:start + n], expect, **TOL, msg=f"layer {layer}")
        start += n


def test_packed_checkpointed_grads_equal_plain():
    seqs = sequences()
    results = []
    for checkpointing in (False, True):
        model = applied("llama", "apt-pooled").train()
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5.18+ names it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        output(model, "llama", **packed_kwargs(seqs, "position_ids")).pow(2).sum().backward()
        results.append(grads(model))
    assert_grads_close(results[1], results[0])


def _flattened(seqs):
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s.tolist()} for s in seqs])
    return dict(batch, use_cache=False)


def lm_loss(logits, labels):
    """The causal-LM loss transformers computes (next-token labels, -100 ignored, mean), kept in float64 (its
    own loss runs in float32)."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), shifted.flatten(), ignore_index=-100)


def _padded(seqs):
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), labels=labels,
                use_cache=False)


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_training_on_packed_batches(method):
    """The collator's packed batch gives the padded batch's loss and gradients; a few steps lower the loss."""
    seqs = sequences((5, 2, 7, 3))
    model = applied("llama", method).train()
    losses = {}
    for name, batch in (("padded", _padded(seqs)), ("packed", _flattened(seqs))):
        model.zero_grad()
        labels = batch.pop("labels")
        loss = lm_loss(model(**batch).logits, labels)
        loss.backward()
        losses[name] = (loss.detach(), grads(model))
    torch.testing.assert_close(losses["packed"][0], losses["padded"][0], **TOL)
    assert_grads_close(losses["packed"][1], losses["padded"][1])

    opt = torch.optim.AdamW(model.fastprefix.parameters(), lr=1e-2)
    batch = _flattened(seqs)
    first = None
    for _ in range(5):
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(**batch).loss.item() < first


# ------------------------------------------------------------------------------------------------ prompt methods
@pytest.mark.parametrize("method", ["pt", "dept", "adept"])
@pytest.mark.parametrize("signal", ["position_ids", "both"])
def test_prompt_packed_equals_each_prompted_alone(method, signal):
    """The prompt in front of every packed sequence: the row is the prompted sequences back to back."""
    model = applied("llama", method)
    m = model.fastprefix.num_virtual_tokens
    seqs = sequences()
    seen = []
    model.model.register_forward_pre_hook(lambda mod, a, k: seen.append(dict(k)), with_kwargs=True)
    kw = packed_kwargs(seqs, signal)
    packed = output(model, "llama", **kw)
    alone = torch.cat([output(model, "llama", input_ids=s[None], position_ids=torch.arange(len(s))[None],
                              use_cache=False) for s in seqs], dim=1)
    assert packed.shape[1] == sum(LENGTHS) + m * len(LENGTHS)
    torch.testing.assert_close(packed, alone, **TOL)
    slots = token_slots(prompt_packing(kw), m)
    assert slots[0, :2].tolist() == [m, m + 1] and slots[0, 5].item() == 2 * m + 5
    if signal == "both":
        cu = [0, *torch.tensor([n + m for n in LENGTHS]).cumsum(0).tolist()]
        assert seen[0]["cu_seq_lens_q"].tolist() == cu and seen[0]["cu_seq_lens_k"].tolist() == cu
        assert seen[0]["max_length_q"] == max(LENGTHS) + m


def test_prompt_packed_loss_is_each_sequences():
    """Labels get -100 on every prompt slot: the packed loss is the token-weighted mean of the alone losses."""
    model = applied("llama", "adept")
    m = model.fastprefix.num_virtual_tokens
    seqs = sequences((5, 2, 7, 3))
    seen = []
    model.register_forward_pre_hook(lambda mod, a, k: seen.append(k.get("labels")), with_kwargs=True)
    packed = model(**_flattened(seqs))
    alone_labels = [torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs]  # the collator's separator first
    prompt = torch.full((m,), -100)
    assert seen[-1].tolist() == [torch.cat([torch.cat([prompt, a]) for a in alone_labels]).tolist()]
    total = count = 0
    for s, labels in zip(seqs, alone_labels):
        alone = model(input_ids=s[None], position_ids=torch.arange(len(s))[None], labels=labels[None],
                      use_cache=False)
        total, count = total + lm_loss(alone.logits, seen[-1]) * (len(s) - 1), count + len(s) - 1
    torch.testing.assert_close(lm_loss(packed.logits, seen[0]), total / count, **TOL)


def test_prompt_packed_refusals():
    cls = tiny("llama", head="seq")
    fastprefix.apply(cls, METHODS["pt"]())
    with pytest.raises(ValueError, match="last token.*packed row"):
        cls(**packed_kwargs(sequences(), "position_ids"))
    lm = applied("llama", "pt")
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="same number of sequences"):
        lm(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]), use_cache=False)


# -------------------------------------------------------------------------------------------------- validation
def _with(kw, **changes):
    return {**kw, **changes}


@pytest.mark.parametrize("case, match", [
    ("q_ne_k", "must be equal"),
    ("not_to_T", "rise from 0"),
    ("only_q", "must come together"),
    ("float", "1-D integer"),
    ("disagree", "different sequences"),
    ("batch2", "batch must be"),
    ("padding", "hides tokens"),
])
@pytest.mark.parametrize("method", ["apt", "pt"])
def test_bad_packing_signals_are_value_errors(case, match, method):
    model = applied("llama", method)
    kw = packed_kwargs(sequences(), "both")
    cu = kw["cu_seq_lens_q"]
    bad = {
        "q_ne_k": dict(cu_seq_lens_k=torch.tensor([0, 6, 16], dtype=torch.int32)),
        "not_to_T": dict(cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1]),
        "only_q": dict(cu_seq_lens_k=None),
        "float": dict(cu_seq_lens_q=cu.double(), cu_seq_lens_k=cu.double()),
        "disagree": dict(position_ids=restarting((6, 7, 3))),
        "batch2": dict(input_ids=kw["input_ids"].expand(2, -1), position_ids=None),
        "padding": dict(position_ids=None, attention_mask=torch.ones_like(kw["input_ids"]).index_fill(1,
                        torch.tensor([3]), 0)),
    }[case]
    with pytest.raises(ValueError, match=match):
        model(**_with(kw, **bad))
