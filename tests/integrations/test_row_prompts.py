"""Per-row adapters in one call of a prompt-method model (PT, DePT, ADePT): ``model(..., adapter_names=[...])``.

Two adapters of different prompt lengths and a ``"__base__"`` row in one padded batch: row b must give what row b
gives alone with its adapter active (``"__base__"``: with the method disabled), in float64, on a decoder (Llama), an
encoder (BERT) and an encoder-decoder (T5). A row with a shorter prompt than the call's longest, M, has M - m hidden
slots: in front of it on a decoder (every row's tokens at columns M..), after it elsewhere (column 0 is the row's
own first slot). Training on the mixed batch gives each adapter the gradient of its own rows run alone, also under
gradient checkpointing; ``generate`` with the names gives each step the logits of the uncached forward and each
row its tokens alone; mistakes are errors before any work.
"""

import pytest
import torch

import fastprefix
from fastprefix.integrations.named import activated
from helpers.families import FAMILIES
from helpers.models import PAD, assert_adapter_name_errors, batch, cached_and_uncached_logits, positions, tiny

KINDS = ("llama", "bert", "t5")
# and the positions of GPT-2 (an absolute table on a decoder) and RoBERTa (numbered from the padding of the ids)
POSITIONED = ("gpt2", "roberta")
METHODS = ("pt", "dept", "adept")
# "default" (3 prompt slots) and "b" (5, another rank) of each method; no dropout, so training compares exactly
FIRST = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=5, dropout=0.0),
}
OTHER = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=5),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=5, rank=2, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=5, rank=3, dropout=0.0),
}
LENGTH = {"default": 3, "b": 5, "__base__": 0}
M = 5  # the longest prompt of a call that names "b"
NAMES = ["b", "default", "__base__", "b"]
CLOSE = dict(rtol=0, atol=1e-12)


def _model(kind, method, head=None):
    """``kind``'s tiny float64 model (no dropout) with ``method`` as "default" and a longer "b", both adapters in
    float64 and moved off their init (DePT's and ADePT's offsets start at zero)."""
    model = tiny(kind, head=head, dropout=0.0)
    torch.manual_seed(0)
    fastprefix.apply(model, FIRST[method]())
    fastprefix.add_adapter(model, OTHER[method](), "b")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (model.fastprefix, model.fastprefix_adapters["b"]):
            for p in module.double().parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _kind(kind):
    return FAMILIES[kind].kind


def _call(kind, lengths=(6, 4, 5, 3)):
    ids, mask = batch(list(lengths), side="left" if _kind(kind) == "decoder" else "right")
    kw = dict(input_ids=ids, attention_mask=mask)
    if _kind(kind) == "seq2seq":
        kw["labels"] = torch.arange(3, 7).repeat(len(lengths), 1)
    return kw


def _out(model, kind, **kw):
    out = model(**kw)
    return out.last_hidden_state if _kind(kind) == "encoder" else out.logits


def _alone(model, kind, kw, b, name):
    """Row b alone, its adapter active (the base model for "__base__")."""
    row = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if name == "__base__":
        with fastprefix.disabled(model):
            return _out(model, kind, **row)
    with activated(model, name):
        return _out(model, kind, **row)


def _own(kind, out, name, width=M):
    """Row ``out``'s own slots (its prompt, then its tokens) in a call of prompt width ``width``: hidden slots in
    front on a decoder, after the row on an encoder; T5's outputs are the decoder's, all its own."""
    m, S = LENGTH[name], out.shape[0] - width
    if _kind(kind) == "seq2seq":
        return out
    return out[width - m:] if _kind(kind) == "decoder" else out[:m + S]


def _real(kind, kw, b, name):
    """Which of row b's own slots are real: its prompt and its unpadded tokens (T5: every decoder slot)."""
    if _kind(kind) == "seq2seq":
        return slice(None)
    return torch.cat([torch.ones(LENGTH[name], dtype=torch.bool), kw["attention_mask"][b].bool()])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS + POSITIONED)
def test_each_row_is_that_row_alone_with_its_adapter(kind, method):
    model, kw = _model(kind, method), _call(kind)
    with torch.no_grad():
        out = _out(model, kind, **kw, adapter_names=NAMES)
        if _kind(kind) != "seq2seq":
            assert out.shape[1] == M + kw["input_ids"].shape[1]
        for b, name in enumerate(NAMES):
            real = _real(kind, kw, b, name)
            torch.testing.assert_close(_own(kind, out[b], name)[real], _alone(model, kind, kw, b, name)[0][real],
                                       **CLOSE, msg=lambda m, b=b: f"row {b} ({NAMES[b]}): {m}")
    assert fastprefix.active_adapter(model) == "default"


@pytest.mark.parametrize("kind", KINDS)
def test_a_call_of_base_rows_only_is_the_base_model_bit_for_bit(kind):
    model, kw = _model(kind, "adept"), _call(kind)
    with torch.no_grad():
        got = _out(model, kind, **kw, adapter_names=["__base__"] * 4)
        with fastprefix.disabled(model):
            want = _out(model, kind, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_decoder_classifier_pools_each_rows_last_token(method):
    """A decoder classifier pools each row's last real token, wherever its hidden slots put it."""
    model, kw = _model("llama", method, head="seq"), _call("llama")
    kw["position_ids"] = positions(kw["attention_mask"])
    with torch.no_grad():
        got = model(**kw, adapter_names=NAMES).logits
        for b, name in enumerate(NAMES):
            torch.testing.assert_close(got[b], _alone(model, "llama", kw, b, name)[0], **CLOSE)


def test_causal_lm_loss_scores_each_rows_own_tokens():
    """Labels follow the rows: the mixed call's loss is the token-weighted mean of the rows' losses alone."""
    model, kw = _model("llama", "dept"), _call("llama")
    mask = kw["attention_mask"]
    kw["labels"] = torch.where(mask.bool(), kw["input_ids"], -100)
    with torch.no_grad():
        mixed = model(**kw, adapter_names=NAMES).loss
        total, count = 0.0, 0
        for b, name in enumerate(NAMES):
            row = {k: v[b:b + 1] for k, v in kw.items()}
            # a prompted row never scores its first real token (nothing of the row precedes it); the base model
            # scores it from the pad before it, if any
            scored = int(mask[b].sum()) - (1 if name != "__base__" or mask[b, 0] else 0)
            if name == "__base__":
                with fastprefix.disabled(model):
                    loss = model(**row).loss
            else:
                with activated(model, name):
                    loss = model(**row).loss
            total, count = total + loss * scored, count + scored
    # (transformers computes the loss in float32)
    torch.testing.assert_close(mixed, total / count, rtol=1e-6, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_gets_the_gradient_of_its_own_rows(kind, method, checkpointing):
    """A loss that sums per-row terms (each row's own outputs against a fixed random direction, weighted): each
    adapter's gradient from the mixed batch equals the sum of its rows' gradients run alone (checkpointed: one
    forward and backward of the mixed batch before, and non-reentrant recomputes)."""
    model, kw = _model(kind, method), _call(kind)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = ["b", "default", "__base__", "default"]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    direction = torch.randn(_out(model, kind, **{k: v[:1] for k, v in kw.items()}).shape[-1],
                            generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(out, rows, width):
        terms = [_own(kind, out[i], names[b], width)[_real(kind, kw, b, names[b])].sum(0) @ direction
                 for i, b in enumerate(rows)]
        return (torch.stack(terms) * weights[list(rows)]).sum()

    if checkpointing:
        _out(model, kind, **kw, adapter_names=names).sum().backward()  # an earlier forward and backward
        model.zero_grad()
    loss(_out(model, kind, **kw, adapter_names=names), range(4), M).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for b, name in enumerate(names):
        row = {k: v[b:b + 1] for k, v in kw.items()}
        if name == "__base__":  # nothing trainable on the base model: no gradient to add
            continue
        with activated(model, name):
            loss(_out(model, kind, **row), [b], LENGTH[name]).backward()
    alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == alone.keys()
    assert any(k.startswith("fastprefix_adapters.b.") for k in mixed)
    assert any(k.startswith("fastprefix.") for k in mixed)
    for k in mixed:
        assert alone[k].abs().max() > 0, k
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("method", METHODS)
def test_generate_logits_equal_the_uncached_forward_at_every_step(method):
    """Greedy generate with a KV cache on a left-padded mixed batch: every step's logits are the uncached forward's
    over the same tokens and names (generate numbers the positions from the mask)."""
    model, kw = _model("llama", method), _call("llama", lengths=(5, 3, 4, 2))
    pairs = cached_and_uncached_logits(model, kw["input_ids"], kw["attention_mask"], adapter_names=NAMES)
    for t, (got, want) in enumerate(pairs):
        assert _rel(got, want) <= 1e-12, f"step {t}: {_rel(got, want):.3e}"


def test_decoding_steps_without_mask_or_positions_number_each_row_alone():
    """A hand-written decoding loop with a cache and no mask: each row's hidden slots stay hidden, and its new
    token gets the position it has alone."""
    from transformers import DynamicCache

    model = _model("llama", "adept")
    ids, _ = batch([5, 5, 5])
    nxt = torch.tensor([[7], [9], [11]])
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True, adapter_names=names)
        got = model(input_ids=nxt, past_key_values=cache, use_cache=True, adapter_names=names).logits[:, -1]
        full = torch.cat([ids, nxt], 1)
        for b, name in enumerate(names):
            want = _alone(model, "llama", dict(input_ids=full, use_cache=False), b, name)[0, -1]
            torch.testing.assert_close(got[b], want, **CLOSE)


@pytest.mark.parametrize("search", [dict(do_sample=False), dict(num_beams=2, do_sample=False)],
                         ids=["greedy", "beam-search"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_gives_each_row_its_tokens_alone(kind, method, search):
    """generate(..., adapter_names=...) (with its KV cache; beam search repeats each row, and its name) gives each
    row the tokens it generates alone with its adapter active (the base model for "__base__")."""
    model, kw = _model(kind, method), _call(kind, lengths=(5, 3, 4))
    ids, mask = kw["input_ids"], kw["attention_mask"]
    names = ["b", "default", "__base__"]
    call = dict(max_new_tokens=4, pad_token_id=PAD, eos_token_id=None, **search)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **call)
        for b, name in enumerate(names):
            row = dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], **call)
            if name == "__base__":
                with fastprefix.disabled(model):
                    want = model.generate(**row)[0]
            else:
                with activated(model, name):
                    want = model.generate(**row)[0]
            torch.testing.assert_close(out[b], want, rtol=0, atol=0)
    assert fastprefix.active_adapter(model) == "default"


def test_mistakes_are_errors_before_any_work():
    model, kw = _model("llama", "pt"), _call("llama")
    assert_adapter_name_errors(model, kw)
    with pytest.raises(ValueError, match="adapter_names has 2 names for a batch of 4 rows"):
        model.generate(**kw, adapter_names=NAMES[:2], max_new_tokens=2, pad_token_id=PAD)
    t5, t5_kw = _model("t5", "pt"), _call("t5")
    with pytest.raises(ValueError, match=r"no adapter named 'zz'.*\['default', 'b'\]"):
        t5.generate(input_ids=t5_kw["input_ids"], adapter_names=["zz"] * 4, max_new_tokens=2)


def test_what_hidden_slots_would_change_is_refused():
    """A row with a shorter prompt carries hidden slots: a question-answering loss would normalise over them, and a
    decoder that takes no position ids could not give the row its positions alone. Both are errors that say so;
    adapters of one prompt length are served."""
    qa = _model("bert", "pt", head="qa")
    kw = _call("bert")
    start = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="start_positions with adapters of different prompt lengths"):
        qa(**kw, start_positions=start, end_positions=start + 1, adapter_names=NAMES)
    same = qa(**kw, start_positions=start, end_positions=start + 1, adapter_names=["b"] * 4)
    with activated(qa, "b"):
        torch.testing.assert_close(same.loss, qa(**kw, start_positions=start, end_positions=start + 1).loss,
                                   **CLOSE)
    bloom = tiny("bloom")
    fastprefix.apply(bloom, FIRST["pt"]())
    fastprefix.add_adapter(bloom, OTHER["pt"](), "b")
    ids, mask = batch([4, 3], "left")
    with pytest.raises(ValueError, match="BloomForCausalLM.forward does not take"):
        bloom(input_ids=ids, attention_mask=mask, adapter_names=["b", "default"])
    bloom(input_ids=ids, attention_mask=mask, adapter_names=["b", "b"])  # one length: nothing hidden


@pytest.mark.parametrize("method", ["adept"])
def test_multiple_choice_gives_each_rows_choices_its_adapter(method):
    """``[B, C, S]`` choices are flattened as the model does; each row's choices take the row's adapter, and the
    pooled first slot is each choice's own."""
    model = _model("bert", method, head="mc")
    ids, mask = batch([6, 4, 5, 2], "right")
    ids, mask = ids.view(2, 2, -1), mask.view(2, 2, -1)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=["b", "__base__"]).logits
        with activated(model, "b"):
            first = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
        with fastprefix.disabled(model):
            second = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(got, torch.cat([first, second]), **CLOSE)


@pytest.mark.parametrize("method", ["dept", "adept"])
def test_the_triton_backend_gives_the_same_rows(method):
    """Under Triton's interpreter each adapter's rows run the fused embedding kernel: the rows are the torch
    backend's."""
    model, kw = _model("llama", method), _call("llama")
    with torch.no_grad():
        want = _out(model, "llama", **kw, adapter_names=NAMES)
        with fastprefix.use_backend(model, "triton"):
            got = _out(model, "llama", **kw, adapter_names=NAMES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
