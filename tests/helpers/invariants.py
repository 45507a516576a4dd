"""The invariants matrix: every family x every method variant x every property, float64 against a reference.

A cell is ``<family>-<method>-<property>``, e.g. ``llama-apt-padded_eq_alone``; ``-k`` selects any slice
(``pytest tests/integrations -k gemma2``, ``-k causal``, ``-k triton``). The properties, each checked against an
explicit reference, and the test files that hold them:

- ``padded_eq_alone`` (``tests/integrations/test_invariants_padding.py``): each row of a padded batch (right
  padding; also left for decoders and RoBERTa, whose positions follow the padding) equals that row run alone,
  prompt rows included.
- ``causal`` (``test_invariants_padding.py``): replacing the later tokens leaves every earlier output unchanged,
  unpadded without a mask and left-padded with one (decoders; T5's decoder).
- ``generate_eq_uncached`` (``tests/integrations/test_invariants_decoding.py``): greedy ``generate`` with the KV
  cache gives, at every step, the logits of the uncached forward over the same tokens: a left-padded batch with
  ``attention_mask``, and an unpadded one without.
- ``checkpoint_eq_plain`` (``tests/integrations/test_invariants_training.py``): two forwards of different shapes,
  then one backward, under non-reentrant gradient checkpointing give the gradients of the same forwards without
  checkpointing, the method's dropout on.
- ``remove_bitexact`` (``test_invariants_training.py``): after ``apply``, a training step and ``remove``, the model
  is bit for bit the base model.
- ``saveload_bitexact`` (``test_invariants_training.py``): ``save_adapter`` then ``load_adapter`` into a fresh
  model reproduces the outputs bitwise.

A family/method pair fastprefix cannot serve exactly is refused at ``apply`` (cell ``...-refused_at_apply``, in
``test_invariants_padding.py``): a ``ValueError`` naming the model. :data:`REFUSED` is that list; the README's
table shows the same matrix. The windowed families (Mistral with ``sliding_window``, Gemma 2/3) have windows
shorter than the test inputs.

Each family is a tiny random float64 model (:func:`helpers.models.tiny`, :data:`MODELS`), built once and
deep-copied per cell. Method parameters start at a zero offset (DePT/ADePT's B = 0, APT's W ~ 0.02): every cell
perturbs them first. Those files run the PyTorch reference path; ``tests/integrations/test_invariants_triton.py``
runs a slice of the same cells for a decoder and an encoder through the Triton kernels.
"""

import dataclasses
import re
import warnings

import pytest
import torch

import fastprefix
from helpers.models import METHODS, PAD, PREFIX_METHODS, PROMPT_METHODS, VOCAB, WINDOW, prepared
from helpers.models import batch as _batch
from helpers.models import positions as _positions
from helpers.models import tiny

# the matrix's families: name -> (the tiny family, its config overrides); the base models' dropout is off
# (``dropout=0.0``): the matrix checks what fastprefix does, and the only randomness in training mode is then
# the method's own dropout
MODELS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),  # no sliding window, as Mistral 7B v0.2+
    "mistral_window": ("mistral", dict(sliding_window=WINDOW)),  # a sliding window, as Mistral 7B v0.1
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "bert": ("bert", {}),
    "roberta": ("roberta", {}),
    "t5": ("t5", {}),
}
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "mistral_window", "phi3", "gpt2", "gemma", "gemma2", "gemma3")
WINDOWED = ("mistral_window", "gemma2", "gemma3")  # sliding windows of WINDOW tokens
ENCODERS = ("bert", "roberta")
ENCODER_DECODERS = ("t5",)
FAMILIES = DECODERS + ENCODERS + ENCODER_DECODERS


def base_model(family):
    """The matrix's ``family``: a fresh copy of its tiny float64 model in eval mode (the same weights every call)."""
    name, overrides = MODELS[family]
    return tiny(name, dropout=0.0, **overrides)

EXACT = dict(atol=1e-10, rtol=0)
# Gemma 2 has only transformers' eager attention, whose softmax runs in float32 even on float64 inputs: its own
# outputs move by float32 rounding (5e-8 measured) when the number of keys changes (padding, cache vs no cache).
# The prompt methods leave the attention to the model, so their Gemma 2 cells that compare different key lengths
# allow that rounding, 20x over (the bugs this matrix exists for are 1e-3 and up); the prefix methods replace it
# with fastprefix's float64 attention and are exact.
FLOAT32_SOFTMAX = dict(atol=2 ** -20, rtol=0)
LENGTHS = (6, 4, 1)  # a padded batch of three, one sequence a single token
# Gemma 2's eager attention softmaxes float64's lowest value in float32 (-inf): a query whose 4-token window holds
# only padding gets NaN, with or without fastprefix. Its batches keep fewer pads than the window.
GEMMA2_LENGTHS = (6, 4, 3)
NEW_TOKENS = 3
T5_DECODER_IDS = torch.tensor([[PAD, 5, 9, 17]])

# (family, method) -> why apply refuses it; the refusal must be a ValueError naming the model
REFUSED = {}  # none at present: T5's prefix methods run its position bias as attn_bias (integrations/families/t5.py)
# (family, method) pairs whose left-padded rows differ from the rows alone: the prompt sits in front of the left
# padding, which the sliding window counts (the window is measured in slots). padded_eq_alone checks that they
# do differ, so that the README's footnote can't go stale, and checks them right-padded.
LEFT_PADDING_MOVES_THE_PROMPT = {(f, m) for f in WINDOWED for m in PROMPT_METHODS}


def properties(family):
    """The properties that apply to ``family`` (causality and decoding need a causal decoder)."""
    if family in ENCODERS:
        return ("padded_eq_alone", "checkpoint_eq_plain", "remove_bitexact", "saveload_bitexact")
    return ("padded_eq_alone", "causal", "generate_eq_uncached", "checkpoint_eq_plain", "remove_bitexact",
            "saveload_bitexact")


# ---------------------------------------------------------------------------------------------- helpers


def _lengths(family):
    return GEMMA2_LENGTHS if family == "gemma2" else LENGTHS


def _tolerance(family, method):
    """The tolerance of a comparison across different key lengths (padded vs alone, cached vs uncached)."""
    return FLOAT32_SOFTMAX if family == "gemma2" and method in PROMPT_METHODS else EXACT


def _applied(family, method, backend="torch", config=None, double=True):
    """``family``'s tiny model with ``method`` applied and its parameters perturbed off their init.

    ``double``: cast the method module to float64 too (it is created in float32), so gradients compare to
    rounding; save/load keeps the float32 module a user has.
    """
    return prepared(base_model(family), config or method, backend=backend, double=double)


def _reference(model):
    """Run the reference side of a comparison on the PyTorch path (a no-op for the bulk, already there)."""
    return fastprefix.use_backend(model, "torch")


def _forward(model, family, ids, mask=None, decoder_ids=None, **kw):
    """The model's main output: logits (decoders; T5's decoder over ``decoder_ids``) or last hidden state.

    Decoders get the position ids of their padding mask, as ``generate`` passes them; RoBERTa derives its own.
    """
    kw = dict(kw, input_ids=ids)
    if mask is not None:
        kw["attention_mask"] = mask
        if family in DECODERS:
            kw["position_ids"] = _positions(mask)
    if family in ENCODER_DECODERS:
        kw["decoder_input_ids"] = T5_DECODER_IDS.expand(ids.shape[0], -1) if decoder_ids is None else decoder_ids
    out = model(**kw)
    return out.last_hidden_state if family in ENCODERS else out.logits


def _prompt_rows(model, family):
    """m: the prompt rows in front of a token-level output (prompt methods on the model's own sequence)."""
    if family in ENCODER_DECODERS or not hasattr(model.fastprefix, "prompt"):
        return 0
    return model.fastprefix.num_virtual_tokens


def _loss(out):
    # a fixed random projection: every output element gets its own gradient
    g = torch.Generator().manual_seed(7)
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()


def _checkpointing(model):
    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# -------------------------------------------------------------------------------------------- properties


def padded_eq_alone(family, method, backend):
    model = _applied(family, method, backend)
    m = _prompt_rows(model, family)
    sides = ("right", "left") if family in DECODERS or family == "roberta" else ("right",)
    for side in sides:
        ids, mask = _batch(_lengths(family), side)
        with torch.no_grad():
            out = _forward(model, family, ids, mask)
        worst = 0.0
        for b, n in enumerate(_lengths(family)):
            real = ids[b][mask[b].bool()][None]
            with torch.no_grad(), _reference(model):
                alone = _forward(model, family, real, torch.ones_like(real))[0]
            keep = torch.cat([torch.ones(m, dtype=torch.bool), mask[b].bool()])
            got = out[b] if family in ENCODER_DECODERS else out[b][keep]
            if side == "left" and (family, method) in LEFT_PADDING_MOVES_THE_PROMPT:
                worst = max(worst, float((got - alone).abs().max()))
                continue
            torch.testing.assert_close(got, alone, **_tolerance(family, method),
                                       msg=lambda e: f"{side}-padded row {b} ({n} tokens): {e}")
        if side == "left" and (family, method) in LEFT_PADDING_MOVES_THE_PROMPT:
            assert worst > 1e-4, (f"left-padded rows equal the rows alone ({worst:.2g}): take ({family!r}, "
                                  f"{method!r}) out of LEFT_PADDING_MOVES_THE_PROMPT and the README's footnote")


def causal(family, method, backend):
    model = _applied(family, method, backend)
    m = _prompt_rows(model, family)
    t = 3  # tokens t.. change; outputs at the prompt and at tokens < t must not
    # unpadded without a mask, and left-padded with one (the last tokens are real in every row)
    for case, (ids, mask) in {"no mask": (_batch((6, 6), "right")[0], None),
                              "left-padded": _batch((6, 4), "left")}.items():
        later = ids.clone()
        later[:, t:] = (ids[:, t:] + 1 + torch.arange(ids.shape[1] - t)) % (VOCAB - 3) + 3
        with torch.no_grad():
            if family in ENCODER_DECODERS:  # the decoder is the causal part; the encoder input stays
                a = _forward(model, family, ids, mask, decoder_ids=ids)
                b = _forward(model, family, ids, mask, decoder_ids=later)
                m = 0
            else:
                a, b = _forward(model, family, ids, mask), _forward(model, family, later, mask)
        torch.testing.assert_close(b[:, :m + t], a[:, :m + t], **EXACT,
                                   msg=lambda e: f"{case}: outputs before token {t}: {e}")
        assert not torch.allclose(b[:, m + t:], a[:, m + t:]), "degenerate test: later tokens changed nothing"


def _generate_logits(model, **kw):
    """Greedy ``generate`` of NEW_TOKENS; returns the sequences and the float64 next-token logits of every step."""
    seen = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].detach().clone()))
    try:
        with torch.no_grad():
            seqs = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                                  eos_token_id=None)
    finally:
        hook.remove()
    assert len(seen) == NEW_TOKENS, f"generate called the model {len(seen)} times for {NEW_TOKENS} tokens"
    return seqs, seen


def generate_eq_uncached(family, method, backend):
    model = _applied(family, method, backend)
    if family in ENCODER_DECODERS:
        ids, mask = _batch((6, 3), "right")
        seqs, seen = _generate_logits(model, input_ids=ids, attention_mask=mask)
        for step, logits in enumerate(seen):
            with torch.no_grad(), _reference(model):
                want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seqs[:, :step + 1],
                             use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, want, **EXACT, msg=lambda e: f"step {step}: {e}")
        return
    for case, (ids, mask) in {"left-padded, attention_mask": _batch((6, 3), "left"),
                              "unpadded, no attention_mask": (_batch((5, 5), "right")[0], None)}.items():
        kw = {} if mask is None else dict(attention_mask=mask)
        seqs, seen = _generate_logits(model, input_ids=ids, **kw)
        S = ids.shape[1]
        for step, logits in enumerate(seen):
            cur = seqs[:, :S + step]
            cur_mask = None if mask is None else torch.cat([mask, torch.ones(len(cur), step, dtype=mask.dtype)], 1)
            with torch.no_grad(), _reference(model):
                want = _forward(model, family, cur, cur_mask, use_cache=False)[:, -1]
            torch.testing.assert_close(logits, want, **_tolerance(family, method),
                                       msg=lambda e: f"{case}, step {step}: {e}")


def checkpoint_eq_plain(family, method, backend):
    config = METHODS[method]()
    if method in PREFIX_METHODS:  # per-forward dropout masks must survive the recompute too
        config = dataclasses.replace(config, prefix_dropout=0.1)
    side = "left" if family in DECODERS else "right"
    batches = [_batch((6, 3), side), _batch((5, 5, 2), side, seed=3)]  # two shapes: [2, 6] then [3, 5]
    grads = []
    for checkpointed in (False, True):  # the plain run is the reference: on the PyTorch path
        model = _applied(family, method, backend if checkpointed else "torch", config=config).train()
        if checkpointed:
            _checkpointing(model)
        torch.manual_seed(3)  # the same dropout masks in both runs
        loss = sum(_loss(_forward(model, family, ids, mask)) for ids, mask in batches)
        loss.backward()
        grads.append({n: p.grad for n, p in model.fastprefix.named_parameters()})
    plain, ckpt = grads
    missing = [n for n, g in plain.items() if g is None or not bool(g.any())]
    assert not missing, f"degenerate test: no gradient for {missing}"
    for name, want in plain.items():
        assert ckpt[name] is not None, f"checkpointed run: no gradient for {name}"
        torch.testing.assert_close(ckpt[name], want, **EXACT, msg=lambda e: f"{name}: {e}")


def remove_bitexact(family, method, backend):
    model = base_model(family)
    params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    ids, mask = _batch(_lengths(family), "right")
    with torch.no_grad():
        before = _forward(model, family, ids, mask)
    prepared(model, method, backend=backend, double=False)
    _loss(_forward(model.train(), family, ids, mask)).backward()  # a training step's worth of state
    model.eval()
    with torch.no_grad():
        during = _forward(model, family, ids, mask)
    m = _prompt_rows(model, family)
    assert not torch.allclose(during[:, m:], before), "degenerate test: the method had no effect"
    fastprefix.remove(model)
    with torch.no_grad():
        after = _forward(model, family, ids, mask)
    assert torch.equal(after, before), f"outputs after remove differ by {(after - before).abs().max():.3g}"
    state = model.state_dict()
    assert state.keys() == params.keys()
    assert all(torch.equal(state[n], p) for n, p in params.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert model.config._attn_implementation == impl


def saveload_bitexact(family, method, backend, tmp_path):
    model = _applied(family, method, backend, double=False)
    ids, mask = _batch(_lengths(family), "right")
    with torch.no_grad():
        want = _forward(model, family, ids, mask)
    fastprefix.save_adapter(model, tmp_path)
    fresh = fastprefix.load_adapter(base_model(family), tmp_path, backend=backend)
    saved, loaded = model.fastprefix.state_dict(), fresh.fastprefix.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        got = _forward(fresh, family, ids, mask)
    assert torch.equal(got, want), f"outputs after load differ by {(got - want).abs().max():.3g}"


PROPERTIES = {f.__name__: f for f in (padded_eq_alone, causal, generate_eq_uncached, checkpoint_eq_plain,
                                      remove_bitexact, saveload_bitexact)}


def refused_at_apply(family, method):
    model = base_model(family)
    name, model_type = type(model).__name__, model.config.model_type
    impl, requires_grad = model.config._attn_implementation, {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as refusal:
        fastprefix.apply(model, METHODS[method]())
    assert re.search(f"{name}|{model_type}", str(refusal.value)), \
        f"the refusal does not name the model ({name}): {refusal.value}"
    assert not hasattr(model, "fastprefix"), "a refused apply left the method module on the model"
    assert model.config._attn_implementation == impl
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert all(not m._forward_pre_hooks for m in model.modules()), "a refused apply left a hook"


# --------------------------------------------------------------------------------------------- the matrix


def cells(props):
    """The matrix's cells of the properties ``props`` (``"refused_at_apply"`` for a refused pair) as pytest params
    ``(family, method, prop)`` with the id ``<family>-<method>-<property>``."""
    for family in FAMILIES:
        for method in PROMPT_METHODS + PREFIX_METHODS:
            for prop in ("refused_at_apply",) if (family, method) in REFUSED else properties(family):
                if prop in props:
                    yield pytest.param(family, method, prop, id=f"{family}-{method}-{prop}")


def check(family, method, prop, backend, tmp_path):
    """Run one cell of the matrix on ``backend`` (its references always on the PyTorch path)."""
    if prop == "refused_at_apply":
        return refused_at_apply(family, method)
    extra = dict(tmp_path=tmp_path) if prop == "saveload_bitexact" else {}
    PROPERTIES[prop](family, method, backend, **extra)

