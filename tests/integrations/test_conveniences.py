"""``fastprefix.print_trainable_parameters`` (PEFT's line and counts) and ``fastprefix.disabled`` (the base model,
bit for bit, inside the block; the method back after it)."""

import contextlib
import copy
import io

import pytest
import torch

import fastprefix
from helpers.models import METHODS, VOCAB, perturb, tiny

ALL = ("pt", "dept", "adept", "adept-merged", "ptv2", "ptv2-proj", "apt", "apt-pooled")


def _printed(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def _pair(method, family="llama", **kw):
    """(base, applied): the same weights, the method's parameters moved off their init."""
    base = tiny(family, dropout=0.0)
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # the method's init draws from the global generator: the same module every call
    fastprefix.apply(model, METHODS[method.replace("-merged", "")](), **kw)
    perturb(model)
    if method.endswith("-merged"):
        fastprefix.merge(model)
    return base, model


def _batch():
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 31, 6, 0, 0, 0]])
    mask = (ids != 0).long()
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))


# ---------------------------------------------------------------- print_trainable_parameters
@pytest.mark.parametrize("method", ["pt", "ptv2"])
def test_printed_line_is_peft_s(method):
    """The same method through PEFT prints the same line (PT: an [m, d] prompt; P-Tuning v2: an [L, 2 N Hkv D]
    table on this GQA model, as PEFT sizes it)."""
    import peft

    base = tiny("llama", dropout=0.0)
    ours = fastprefix.apply(copy.deepcopy(base), METHODS[method]())
    m = ours.fastprefix.num_virtual_tokens
    cfg = (peft.PromptTuningConfig if method == "pt" else peft.PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                                   num_virtual_tokens=m)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    line = _printed(fastprefix.print_trainable_parameters, ours)
    assert line == _printed(theirs.print_trainable_parameters)
    trainable, total = fastprefix.trainable_parameters(ours)
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " \
                   f"{100 * trainable / total:.4f}\n"


def test_counts_by_hand():
    """ADePT: m d + 2 r d + r + d, plus a base module kept trainable (GPT-2's final norm, 2 d); GPT-2's tied
    input and output embeddings counted once."""
    _, model = _pair("adept", family="gpt2", trainable=("transformer.ln_f",))
    d, m, r = 32, 3, 5
    method = m * d + 2 * r * d + r + d
    gpt2 = tiny("gpt2", dropout=0.0)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    # every module's own parameters, less the second count of the tied [V, d] table
    base = sum(p.numel() for mod in gpt2.modules() for p in mod.parameters(recurse=False)) - VOCAB * d
    assert fastprefix.trainable_parameters(model) == (method + 2 * d, base + method)
    line = _printed(fastprefix.print_trainable_parameters, model)
    assert line.startswith(f"trainable params: {method + 2 * d:,d} || all params: {base + method:,d} ||")


def test_count_refusals():
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        fastprefix.print_trainable_parameters("model")
    with pytest.raises(ValueError, match="no parameters"):
        fastprefix.print_trainable_parameters(torch.nn.ReLU())


# ---------------------------------------------------------------- disabled
@pytest.mark.parametrize("method", ALL)
def test_disabled_is_the_base_model_bit_for_bit(method):
    base, model = _pair(method)
    batch = _batch()
    with torch.no_grad():
        applied, plain = model(**batch).logits, base(**batch).logits
        with fastprefix.disabled(model) as inside:
            assert inside is model
            assert torch.equal(model(**batch).logits, plain)
        assert torch.equal(model(**batch).logits, applied)  # the method is back
    assert applied.shape != plain.shape or not torch.equal(applied, plain)


@pytest.mark.parametrize("method", ["pt", "apt"])
def test_disabled_generate(method):
    base, model = _pair(method)
    batch = _batch()
    kw = dict(input_ids=batch["input_ids"][:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with fastprefix.disabled(model):
        got = model.generate(**kw)
    assert torch.equal(got, base.generate(**kw))


@pytest.mark.parametrize("method", ["dept", "ptv2"])
def test_disabled_restores_after_an_exception_and_nests(method):
    base, model = _pair(method)
    batch = _batch()
    with torch.no_grad():
        applied, plain = model(**batch).logits, base(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):
            with fastprefix.disabled(model):
                raise RuntimeError("boom")
        assert torch.equal(model(**batch).logits, applied)
        with fastprefix.disabled(model):
            with fastprefix.disabled(model):
                assert torch.equal(model(**batch).logits, plain)
            assert torch.equal(model(**batch).logits, plain)  # still inside the outer block
        assert torch.equal(model(**batch).logits, applied)


@pytest.mark.parametrize("method", ["adept-merged", "apt", "pt"])
def test_disabled_in_training(method):
    """Training mode with gradients: inside, the base model's loss and head gradient, nothing for the method
    (a merged ADePT does not refuse the training forward: its fold is not used); after, the method trains."""
    base, model = _pair(method, trainable=("lm_head",))
    for p in base.parameters():
        p.requires_grad_(False)
    base.lm_head.weight.requires_grad_(True)
    batch = dict(_batch(), labels=_batch()["input_ids"])
    base.train(), model.train()
    with fastprefix.disabled(model):
        loss = model(**batch).loss
        loss.backward()
    want = base(**batch).loss
    want.backward()
    assert torch.equal(loss, want)
    assert torch.equal(model.lm_head.weight.grad, base.lm_head.weight.grad)
    assert all(p.grad is None for p in model.fastprefix.parameters())
    if method == "adept-merged":
        with pytest.raises(RuntimeError, match="merged"):
            model(**batch)
        fastprefix.unmerge(model)
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.fastprefix.parameters())


def test_remove_inside_disabled():
    base, model = _pair("apt")
    batch = _batch()
    with fastprefix.disabled(model):
        fastprefix.remove(model)
    assert not hasattr(model, "fastprefix")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_disabled_needs_an_applied_model():
    with pytest.raises(ValueError, match="fastprefix is not applied"):
        with fastprefix.disabled(tiny("llama", dropout=0.0)):
            pass


@pytest.mark.parametrize("family, method", [("bert", "ptv2"), ("bert", "dept"), ("t5", "adept"), ("gpt2", "apt")],
                         ids=["bert-ptv2", "bert-dept", "t5-adept", "gpt2-apt"])
def test_disabled_other_families(family, method):
    """An encoder (BERT's original attention, no prompt), an encoder-decoder (T5: no prompt on the encoder input)
    and GPT-2: bit for bit the base model inside, the method after."""
    base, model = _pair(method, family=family)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 31, 6, 0, 0, 0]])
    kw = dict(input_ids=ids, attention_mask=(ids != 0).long())
    if family == "t5":
        kw["labels"] = torch.tensor([[4, 5, 6], [7, 8, 9]])

    def out(mod):
        result = mod(**kw)
        return result.logits if family != "bert" else result.last_hidden_state

    with torch.no_grad():
        applied, plain = out(model), out(base)
        with fastprefix.disabled(model):
            assert torch.equal(out(model), plain)
        assert torch.equal(out(model), applied)
