"""Which models each method reaches: every cell works exactly, or ``apply`` refuses it with a clear message.

The rule: no model that ``apply`` accepts may fail at its first forward. Each family is a tiny random float64
config (sliding windows of 4 tokens, shorter than the inputs); each cell is one method on it and is one of

- works: the method changes the model's outputs, and each row of a padded batch equals that row alone to
  1e-10 (decoders left-padded as ``generate`` pads; encoders right-padded);
- works right-padded: exact right-padded, but a left-padded row differs from the row alone (checked, so the table
  can't go stale): the prompt sits in front of the left padding, so a sliding window counts the padding between them;
- refused: ``apply`` raises a ValueError matching the table's message and leaves the model as it was.

:data:`REFUSED` and :data:`RIGHT_PADDED` are that table; the README's "What holds, per family and method" shows
it (``test_the_readme_shows_this_table``). Deeper properties (caching, checkpointing, save/load) are the
invariants matrix's job. ``test_windows_and_softcap_match_transformers_masks`` checks the windowed families'
attention against transformers' own masks, cached generation included.
"""

import re
from pathlib import Path

import pytest
import torch

import fastprefix
from helpers.families import FAMILIES as TINY_FAMILIES
from helpers.models import METHODS, PAD, WINDOW, batch, perturb, positions, tiny

EXACT = dict(atol=1e-10, rtol=0)
# Gemma 2's and Bloom's own attention softmaxes in float32 even on float64 inputs, so a prompt method, which
# leaves the attention to the model, moves by float32 rounding when the number of keys changes (padding)
FLOAT32_SOFTMAX = dict(atol=2 ** -20, rtol=0)
FLOAT32_SOFTMAX_FAMILIES = ("gemma2", "bloom")
W = WINDOW  # every sliding window: shorter than the inputs, so that windows matter
TOKENS = dict(bos_token_id=1, eos_token_id=2)  # every model here
D32 = dict(hidden_size=32, num_attention_heads=4)
# family -> (README label, the tiny family (helpers.families), its config overrides besides TOKENS)
REACH = {
    "llama": ("Llama", "llama", {}),
    "mistral": ("Mistral (`sliding_window=None`)", "mistral", {}),
    "mistral-window": ("Mistral (`sliding_window` set)", "mistral", dict(sliding_window=W)),
    "qwen2": ("Qwen2", "qwen2", D32),
    "qwen2-sliding": ("Qwen2 (`use_sliding_window`: a full and a sliding layer)", "qwen2",
                      dict(D32, use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3": ("Qwen3", "qwen3", {}),
    "phi3": ("Phi-3", "phi3", {}),
    "phi3-window": ("Phi-3 (`sliding_window` set)", "phi3", dict(sliding_window=W)),
    "gemma": ("Gemma", "gemma", {}),
    "gemma2": ("Gemma 2 (sliding and full layers, soft-capping)", "gemma2", {}),
    "gemma3": ("Gemma 3 (sliding and full layers)", "gemma3", {}),
    "gpt2": ("GPT-2", "gpt2", dict(n_inner=None)),
    "opt": ("OPT", "opt", {}),
    "falcon": ("Falcon", "falcon", {}),
    "gpt-neox": ("GPT-NeoX", "gpt-neox", {}),
    "bloom": ("Bloom", "bloom", {}),
    "stablelm": ("StableLM", "stablelm", {}),
    "granite": ("Granite", "granite", {}),
    "olmo": ("OLMo", "olmo", {}),
    "bert": ("BERT", "bert", dict(max_position_embeddings=70)),
    "roberta": ("RoBERTa", "roberta", {}),
    "xlm-roberta": ("XLM-RoBERTa", "xlm-roberta", {}),
    "electra": ("ELECTRA", "electra", dict(embedding_size=32, max_position_embeddings=70)),
    "modernbert": ("ModernBERT (local and global layers)", "modernbert", {}),
    "distilbert": ("DistilBERT", "distilbert", {}),
    "deberta-v2": ("DeBERTa-v2", "deberta-v3", dict(max_position_embeddings=70)),
    "t5": ("T5", "t5", dict(tie_word_embeddings=True)),
}
FAMILIES = list(REACH)
METHOD_IDS = ("pt", "dept", "adept", "ptv2", "apt")
METHOD_NAMES = ("PT", "DePT", "ADePT", "P-Tuning v2", "APT")
PROMPT, PREFIX = ("pt", "dept", "adept"), ("ptv2", "apt")
WINDOWED_DECODERS = ("mistral-window", "qwen2-sliding", "phi3-window", "gemma2", "gemma3")

_NOT_ROUTED = ("attention not routed through `AttentionInterface`",
               "{}'s attention is not routed through transformers' AttentionInterface")
# (family, method) -> (the README's reason, the message apply refuses with); every other cell works
REFUSED = {
    **{("falcon", m): (_NOT_ROUTED[0], _NOT_ROUTED[1].format("FalconForCausalLM")) for m in PREFIX},
    **{("bloom", m): (_NOT_ROUTED[0], _NOT_ROUTED[1].format("BloomForCausalLM")) for m in PREFIX},
    **{("stablelm", m): (_NOT_ROUTED[0], _NOT_ROUTED[1].format("StableLmForCausalLM")) for m in PREFIX},
    # T5's position bias and DeBERTa's disentangled attention reach fastprefix's attention as attn_bias
    # (fastprefix/integrations/families/t5.py, deberta.py)
}
# cells exact right-padded only: the prompt goes in front of the padding, which a sliding window counts
RIGHT_PADDED = {(f, m) for f in WINDOWED_DECODERS for m in PROMPT}
# the short row's 3 pads push a 4-token window off the prompt. Fewer pads than the window: Gemma 2's eager
# attention softmaxes float64's lowest value in float32 (-inf), so a query whose window holds only padding gets
# NaN, with or without fastprefix
LENGTHS = (6, 3)


def _tolerance(family, method):
    return FLOAT32_SOFTMAX if family in FLOAT32_SOFTMAX_FAMILIES and method in PROMPT else EXACT


def _build(family):
    """``(model, kind)``: the family's tiny float64 model and its kind, "decoder", "encoder" or "seq2seq"."""
    _, name, overrides = REACH[family]
    return tiny(name, **TOKENS, **overrides), TINY_FAMILIES[name].kind


def _run(model, kind, ids, mask):
    """The main output: logits (decoders; T5's decoder over fixed ids) or the last hidden state (encoders)."""
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind == "decoder":
        kw["position_ids"] = positions(mask)  # as generate numbers a padded batch
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.arange(3, 7).repeat(ids.shape[0], 1)
    with torch.no_grad():
        out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rows(model, kind, method, side):
    """For each row of a ``side``-padded batch: (its output in the batch, its output alone), prompt rows included."""
    ids, mask = batch(LENGTHS, side)
    out = _run(model, kind, ids, mask)
    m = METHODS[method]().num_virtual_tokens if method in PROMPT and kind != "seq2seq" else 0
    pairs = []
    for b in range(len(LENGTHS)):
        real = ids[b][mask[b].bool()][None]
        alone = _run(model, kind, real, torch.ones_like(real))[0]
        keep = torch.cat([torch.ones(m, dtype=torch.bool), mask[b].bool()])
        pairs.append((out[b] if kind == "seq2seq" else out[b][keep], alone))
    return pairs


def _check_cell(model, kind, family, method, base):
    """The cell works: the method moves the outputs, and padded rows equal the rows alone (see the module doc)."""
    sides = ("right",) if kind != "decoder" else ("left", "right") if (family, method) in RIGHT_PADDED else ("left",)
    for side in sides:
        pairs = _rows(model, kind, method, side)
        assert all(bool(torch.isfinite(got).all()) for got, _ in pairs), f"{family}-{method}: {side}-padded NaN"
        if side == "left" and (family, method) in RIGHT_PADDED:
            worst = max(float((got - alone).abs().max()) for got, alone in pairs)
            assert worst > 1e-4, (f"{family}-{method} is padding-exact left-padded too ({worst:.2g}): "
                                  "take it out of RIGHT_PADDED (and the README's footnote)")
            continue
        for b, (got, alone) in enumerate(pairs):
            torch.testing.assert_close(got, alone, **_tolerance(family, method),
                                       msg=lambda e: f"{family}-{method}, {side}-padded row {b}: {e}")
    ids, mask = batch(LENGTHS, "right")
    out = _run(model, kind, ids, mask)
    m = out.shape[1] - base.shape[1]  # prompt rows in front (prompt methods on the model's own sequence)
    real = mask.bool() if kind != "seq2seq" else torch.ones(base.shape[:2], dtype=torch.bool)
    moved = (out[:, m:] - base)[real].abs().max()
    assert moved > 1e-3, f"{family}-{method}: the method does not change the outputs ({moved:.2g})"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_works_exactly_or_is_refused_at_apply(family):
    model, kind = _build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    ids, mask = batch(LENGTHS, "right")
    base = _run(model, kind, ids, mask)
    for method in METHOD_IDS:
        refusal = REFUSED.get((family, method))
        if refusal is None:
            torch.manual_seed(0)
            perturb(fastprefix.apply(model, METHODS[method]()))
            try:
                _check_cell(model, kind, family, method, base)
            finally:
                fastprefix.remove(model)
        else:
            with pytest.raises(ValueError, match=refusal[1]):
                fastprefix.apply(model, METHODS[method]())
        # refused or removed: the model is as it was
        assert not hasattr(model, "fastprefix") and model.config._attn_implementation == impl
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), (family, method)


def test_the_tables_name_only_known_cells():
    assert {f for f, _ in REFUSED | dict.fromkeys(RIGHT_PADDED)} <= set(FAMILIES)
    assert {m for _, m in REFUSED | dict.fromkeys(RIGHT_PADDED)} <= set(METHOD_IDS)
    assert not set(REFUSED) & RIGHT_PADDED


# ------------------------------------------------------------------------------------ the README's table


def reach_table():
    """The README's table of this file's cells (markdown, one row per family)."""
    head = ["| family | " + " | ".join(METHOD_NAMES) + " |", "|---|" + ":-:|" * len(METHOD_NAMES)]
    rows = []
    for family, (label, _, _) in REACH.items():
        cells, said = [], set()
        for method in METHOD_IDS:
            if (family, method) in REFUSED:
                reason = REFUSED[family, method][0]
                cells.append("refused" if reason in said else f"refused: {reason}")
                said.add(reason)
            else:  # ¹: to float32 rounding (Gemma 2's own softmax); ²: right-padded only
                marks = ["¹"] * (_tolerance(family, method) is FLOAT32_SOFTMAX)
                marks += ["²"] * ((family, method) in RIGHT_PADDED)
                cells.append("✓" + " ".join(marks))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(head + rows)


README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- reach table: generated by tests/integrations/test_model_reach.py -->", "<!-- end of reach table -->"


def test_the_readme_shows_this_table():
    text = README.read_text()
    found = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert found, f"README.md has no table between {BEGIN!r} and {END!r}"
    assert found.group(1) == reach_table(), "README's reach table is stale; it should read:\n" + reach_table()


# ------------------------------------------------------------------ windows and soft-capping vs transformers


def _eager_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                            **kwargs):
    """The reference: eager attention over ``[prefix ; keys]`` with the mask transformers built for the layer.

    ``attention_mask`` is transformers' own 4D additive mask (its eager mask function: padding, causality, the
    layer's sliding window, a cropped cache's offsets), added to the real keys' logits as the call's ``attn_bias``;
    the prefix columns get none (visible). Soft-capping before the mask, as transformers' eager Gemma 2 does it.
    The attention itself is the package's explicit twin (:func:`fastprefix.reference.attention.attention_probs`);
    the P-Tuning v2 prefix has no gate.
    """
    from fastprefix.integrations.context import KWARG
    from fastprefix.modules import PTuningV2Prefix
    from fastprefix.reference.attention import attention_probs, explicit_attention
    from fastprefix.spec import AttentionSpec

    pk, pv = PTuningV2Prefix.layer(kwargs[KWARG].prefixes, module._fastprefix_layer)  # [Hkv, L, D]
    pk, pv = pk.to(key.dtype), pv.to(value.dtype)
    spec = AttentionSpec.build(query, key, scale=scaling, attn_bias=attention_mask, softcap=softcap)
    p = attention_probs(query, key, pk, spec)
    out = explicit_attention(query, key, value, pk, pv, spec)
    return out.transpose(1, 2).contiguous(), p


WINDOWED = WINDOWED_DECODERS + ("modernbert",)


@pytest.mark.parametrize("family", WINDOWED)
def test_windows_and_softcap_match_transformers_masks(family, monkeypatch):
    """P-Tuning v2 on a windowed family = an explicit eager attention over ``[prefix ; keys]`` under the mask
    transformers builds for each layer (its sliding windows, soft-capping, and for decoders greedy ``generate``
    past the window, whose sliding-window caches drop their oldest keys), to 1e-10 in float64."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fastprefix.integrations.context import NAME

    model, kind = _build(family)
    torch.manual_seed(0)
    perturb(fastprefix.apply(model, METHODS["ptv2"]()))
    ids, mask = batch(LENGTHS, "left" if kind == "decoder" else "right")

    def outputs():
        if kind != "decoder":
            return [_run(model, kind, ids, mask)]
        seen = []
        hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits.detach().clone()))
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=W + 1, do_sample=False,
                               pad_token_id=PAD, eos_token_id=None)
        finally:
            hook.remove()
        return seen

    got = outputs()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, NAME, _eager_prefix_attention)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    want = outputs()
    assert len(got) == len(want) == (W + 1 if kind == "decoder" else 1)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **EXACT, msg=lambda e: f"{family}, call {step}: {e}")


def test_the_mask_function_knows_transformers_patterns_by_structure():
    """Sliding windows are read from transformers' own mask-function closures (W and the base pattern), and
    anything else (chunked attention, overlays, a look-alike function) is refused, not guessed."""
    from transformers import masking_utils as mu

    from fastprefix.integrations.attention import fastprefix_mask
    from fastprefix.integrations.masks import mask_pattern

    assert mask_pattern(mu.causal_mask_function) == (True, None)
    assert mask_pattern(mu.bidirectional_mask_function) == (False, None)
    assert mask_pattern(mu.sliding_window_causal_mask_function(5)) == (True, (4, 0))
    assert mask_pattern(mu.sliding_window_bidirectional_mask_function(3)) == (False, (3, 3))
    look_alike = mu.and_masks(lambda b, h, q, kv: kv > q - 5, mu.causal_mask_function)
    others = [mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), look_alike,
              mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
              mu.and_masks(mu.sliding_window_overlay(5), mu.bidirectional_mask_function)]
    for fn in others:
        assert mask_pattern(fn) is None
        with pytest.raises(NotImplementedError, match="chunked attention or a custom overlay"):
            fastprefix_mask(1, 3, 3, mask_function=fn)


def test_a_static_cache_is_refused_clearly():
    """A static cache puts the queries at the cache's write position, not after its keys: refused, not misaligned."""
    model, _ = _build("llama")
    fastprefix.apply(model, METHODS["ptv2"]())
    ids, mask = batch((4, 2), "left")
    with pytest.raises(NotImplementedError, match="not a static cache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=PAD,
                       cache_implementation="static")


@pytest.mark.parametrize("method", PREFIX)
def test_opt_takes_the_prefix_where_its_head_calls_the_decoder(method):
    """OPT's ``*ForCausalLM`` calls ``self.model.decoder`` directly: the prefix is computed there, so a forward and
    cached ``generate`` both see it (each step's logits = the uncached forward's, left-padded)."""
    model, kind = _build("opt")
    torch.manual_seed(0)
    perturb(fastprefix.apply(model, METHODS[method]()))
    assert hasattr(model.model.decoder, "_fastprefix_state") and not hasattr(model.model, "_fastprefix_state")
    ids, mask = batch(LENGTHS, "left")
    seen = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].detach().clone()))
    with torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                              eos_token_id=None)
    hook.remove()
    for step, logits in enumerate(seen):
        cur = seqs[:, :ids.shape[1] + step]
        cur_mask = torch.cat([mask, torch.ones(len(cur), step, dtype=mask.dtype)], 1)
        want = _run(model, kind, cur, cur_mask)[:, -1]
        torch.testing.assert_close(logits, want, **EXACT, msg=lambda e: f"step {step}: {e}")
