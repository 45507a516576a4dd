"""Prompt methods (PT, DePT, ADePT) on 🤗 models: the input the model sees is what it would have built itself.

Each test compares, in float64, against an explicit reference: the base model called with
``inputs_embeds = [P ; offset(embed(ids))]`` (``embed`` = the model's own input-embedding module), the same
row run alone, the uncached forward over the same tokens, or the loss on the shifted positions.
"""

import pytest
import torch
from torch import nn

import fastprefix
from helpers.models import PAD, VOCAB, batch, cached_and_uncached_logits, minilm_path, perturb, positions, tiny

EXACT = dict(atol=1e-10, rtol=0)
PROMPT = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=5),
}
METHODS = tuple(PROMPT)


def _rel(got, ref):
    """Max-abs error relative to the reference's max-abs (the figure the tests report on failure)."""
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _close(got, ref, what):
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} vs {list(ref.shape)}"
    err = _rel(got, ref)
    assert err <= 1e-10, f"{what}: relative error {err:.3e}"


# config changes from the tiny families (helpers.families): windows and caps that never bind here (Gemma 2/3 at
# transformers' own defaults, windows of 64), GPT-2's MLP at its default width
CONFIGS = {"gemma2": dict(sliding_window=64, query_pre_attn_scalar=256, attn_logit_softcapping=50.0),
           "gemma3": dict(sliding_window=64, query_pre_attn_scalar=256, layer_types=None),
           "gpt2": dict(n_inner=None)}


def build(kind, head="lm", **config):
    """``kind``'s tiny float64 model (:func:`helpers.models.tiny`) with ``head``, as this file configures it."""
    return tiny(kind, head=head, **CONFIGS.get(kind, {}), **config)


def applied(kind, method, head="lm", scale=0.5, **kw):
    model = build(kind, head)
    fastprefix.apply(model, PROMPT[method](), **kw)
    return perturb(model, scale)


def _offset(module, x):
    """The method's token offset on ``x = embed(ids) [B, S, d]``, written out (float64)."""
    p = {n: v.to(x.dtype) for n, v in module.named_parameters()}  # the module is float32, the model float64
    if isinstance(module, fastprefix.AdaptiveDecomposedPrompt):
        return x + torch.relu(x @ p["down_weight"] + p["down_bias"]) @ p["up_weight"] + p["up_bias"]
    if isinstance(module, fastprefix.DecomposedPrompt):
        return x + module.config.scaling * (p["lora_a"][:x.shape[1]] @ p["lora_b"])
    return x


def _prompted_embeds(model, module, ids):
    x = model.get_input_embeddings()(ids)
    return torch.cat([module.prompt.to(x.dtype).expand(ids.shape[0], -1, -1), _offset(module, x)], 1)


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- row 1: X is the output of the model's own input-embedding module --------------------------------------------
SCALED = ("gemma", "gemma2", "gemma3", "biogpt")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", SCALED + ("electra",))
def test_prompt_input_is_the_embedding_modules_output(kind, method):
    """Gemma 1/2/3 (tensor ``embed_scale``) and BioGPT (float ``embed_scale``) scale inside the embedding
    module; ELECTRA's embedding is narrower than its hidden size (the prompt has the embedding's width)."""
    model = applied(kind, method, head="base" if kind == "electra" else "lm")
    module = model.fastprefix
    ids, mask = batch([6, 4], "right")
    with torch.no_grad():
        got = _main(model(input_ids=ids, attention_mask=mask))
        fastprefix.remove(model)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        want = _main(model(inputs_embeds=_prompted_embeds(model, module, ids), attention_mask=full))
    _close(got, want, f"{kind}-{method}")


@pytest.mark.parametrize("method", METHODS)
def test_encoder_that_scales_only_the_ids_it_embeds(method):
    """Pegasus' encoder multiplies ``embed_tokens(input_ids)`` by ``embed_scale`` but takes ``inputs_embeds`` as
    given: fastprefix finds the scale by running the encoder both ways at apply."""
    model = tiny("pegasus")
    fastprefix.apply(model, PROMPT[method]())
    module = perturb(model).fastprefix
    ids, mask = batch([6, 4], "right")
    dec = torch.arange(3, 7).repeat(2, 1)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        fastprefix.remove(model)
        encoder = model.get_encoder()
        x = encoder.embed_tokens(ids) * encoder.embed_scale
        embeds = torch.cat([module.prompt.to(x.dtype).expand(2, -1, -1), _offset(module, x)], 1)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        want = model(inputs_embeds=embeds, attention_mask=full, decoder_input_ids=dec).logits
    _close(got, want, method)


def test_narrow_embedding_adapter_round_trip(tmp_path):
    """ELECTRA's prompt has the embedding's width (16), not hidden_size (32): save and load agree on it."""
    model = applied("electra", "adept", head="base")
    assert model.fastprefix.prompt.shape == (3, 16)
    fastprefix.save_adapter(model, str(tmp_path))
    loaded = fastprefix.load_adapter(build("electra", head="base"), str(tmp_path))
    ids, mask = batch([6, 4], "right")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                           model(input_ids=ids, attention_mask=mask).last_hidden_state)


class _Affine(nn.Embedding):
    """An input embedding fastprefix cannot reproduce from its table: run as a module."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 1.5 + 0.25


@pytest.mark.parametrize("method, backend", [(m, "torch") for m in METHODS] + [("adept", "triton")],
                         ids=lambda v: v)
def test_unknown_embedding_module_is_run_as_a_module(method, backend):
    model = build("llama")
    table = _Affine(VOCAB, 32, padding_idx=PAD).double()
    table.weight.data.copy_(model.get_input_embeddings().weight)
    model.set_input_embeddings(table)
    fastprefix.apply(model, PROMPT[method](), backend=backend)
    module = perturb(model).fastprefix
    ids, mask = batch([6, 4], "right")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        fastprefix.remove(model)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        want = model(inputs_embeds=_prompted_embeds(model, module, ids), attention_mask=full).logits
    _close(got, want, method)


@pytest.mark.parametrize("method", ["dept", "adept"])
def test_scaled_embedding_triton_path_matches_reference_path(method, monkeypatch):
    """The embedding scale reaches the fused kernels (Triton's interpreter here): same outputs and gradients."""
    import importlib

    kernels = importlib.import_module("fastprefix.kernels.embedding.fused")
    calls = []
    real = getattr(kernels, f"{method}_embedding")
    monkeypatch.setattr(kernels, f"{method}_embedding", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = applied("gemma", method)
    ids, mask = batch([6, 4], "right")
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with fastprefix.use_backend(model, backend):
            out = model(input_ids=ids, attention_mask=mask).logits
        out.pow(2).mean().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in model.fastprefix.named_parameters()}
    assert calls, "the Triton launcher was not called"
    (ref, ref_g), (tri, tri_g) = results["torch"], results["triton"]
    _close(tri, ref, "logits")
    for name in ref_g:
        _close(tri_g[name], ref_g[name], name)


def test_merged_adept_keeps_the_embedding_scale():
    model = applied("gemma", "adept")
    ids, mask = batch([6, 4], "right")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fastprefix.merge(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    _close(after, before, "merged vs unmerged")


# --- row 6: decoder sequence classification pools the last real token of the prompted sequence ------------------
def _classifier_cases():
    """Decoder families with the generic classifier (Llama, Qwen2, Mistral) and GPT-2's own."""
    for kind in ("llama", "qwen2", "mistral", "gpt2"):
        for method in METHODS:
            for side in ("right", "left"):
                yield pytest.param(kind, method, side, id=f"{kind}-{method}-{side}")


@pytest.mark.parametrize("kind, method, side", list(_classifier_cases()))
def test_decoder_sequence_classification_row_equals_row_alone(kind, method, side):
    model = applied(kind, method, head="seq")
    ids, mask = batch([6, 4, 1], side)
    pos = None if side == "right" else positions(mask)  # left padding needs positions (as for the base model)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        alone = []
        for b in range(3):
            real = ids[b][mask[b].bool()][None]
            alone.append(model(input_ids=real).logits[0])
    alone = torch.stack(alone)
    _close(out.logits, alone, f"{kind}-{method}-{side}")
    want = nn.functional.cross_entropy(alone, labels)
    _close(out.loss, want, "loss")


def test_encoder_sequence_classification_is_unchanged():
    """BERT pools its first token through the pooler: fastprefix leaves that alone."""
    model = applied("bert", "adept", head="seq")
    ids, mask = batch([6, 4], "right")
    module = model.fastprefix
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        fastprefix.remove(model)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        want = model(inputs_embeds=_prompted_embeds(model, module, ids), attention_mask=full).logits
    _close(got, want, "bert")


# --- row 8: cached greedy generation equals the uncached forward over the same tokens, logits at every step -------
def _generate_cases():
    """Every way of calling generate, on Llama, Qwen2 and GPT-2 (absolute positions)."""
    for kind in ("llama", "qwen2", "gpt2"):
        for method in METHODS:
            for case in ("unpadded", "unpadded-mask", "unpadded-positions", "left-mask", "left-mask-positions"):
                yield pytest.param(kind, method, case, id=f"{kind}-{method}-{case}")


@pytest.mark.parametrize("kind, method, case", list(_generate_cases()))
def test_generate_logits_equal_uncached_forward_at_every_step(kind, method, case):
    model = applied(kind, method, scale=0.2)
    ids, mask = batch([6, 6] if case.startswith("unpadded") else [6, 3], "left")
    extra = dict(position_ids=positions(mask)) if "positions" in case else None
    pairs = cached_and_uncached_logits(model, ids, mask if "mask" in case else None, generate_kwargs=extra)
    for t, (got, want) in enumerate(pairs):
        _close(got, want, f"step {t}")


def test_decoding_steps_without_mask_number_positions_after_the_prompt():
    """A hand-written decoding loop with a cache: no mask, with or without position ids, equals the uncached forward."""
    from transformers import DynamicCache

    model = applied("llama", "adept", scale=0.2)
    ids, _ = batch([5, 5])
    nxt = torch.tensor([[7], [9]])
    with torch.no_grad():
        want = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
        for with_positions in (False, True):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            pos = torch.full((2, 1), ids.shape[1]) if with_positions else None
            got = model(input_ids=nxt, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]
            _close(got, want, f"position_ids given: {with_positions}")


# --- row 9: labels that index tokens follow the prompt ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_question_answering_positions_shift_by_the_prompt(kind, method):
    model = applied(kind, method, head="qa")
    ids, mask = batch([7, 5], "right")
    start, end = torch.tensor([1, 0]), torch.tensor([4, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    m = 3
    assert out.start_logits.shape == (2, m + ids.shape[1])
    ce = nn.functional.cross_entropy
    want = (ce(out.start_logits, start + m) + ce(out.end_logits, end + m)) / 2
    _close(out.loss, want, f"{kind}-{method}")


@pytest.mark.parametrize("head", ["tok", "mlm"])
def test_token_level_labels_cover_the_users_tokens_only(head):
    model = applied("bert", "dept", head=head)
    ids, mask = batch([7, 5], "right")
    labels = torch.where(mask.bool(), ids % 2 if head == "tok" else ids, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, 3:]
    want = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    _close(out.loss, want, head)


# --- row 10: pad-aware position ids (RoBERTa, XLM-R) -------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
def test_pad_aware_positions_left_padded_row_equals_row_alone(kind, method):
    model = applied(kind, method, head="base")
    ids, mask = batch([7, 4, 1], "left")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for b in range(3):
            real = ids[b][mask[b].bool()][None]
            alone = model(input_ids=real).last_hidden_state[0]
            keep = torch.cat([torch.ones(3, dtype=torch.bool), mask[b].bool()])
            _close(out[b][keep], alone, f"{kind}-{method} row {b}")


# --- row 13: clear errors at the first moment, multiple choice, autocast ------------------------------------------
def test_dept_generation_past_max_length_is_a_clear_error():
    model = build("llama")
    fastprefix.apply(model, fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=8))
    ids, _ = batch([6, 6])
    with pytest.raises(ValueError, match=r"max_length=8.*\b9\b|\b9\b.*max_length=8"):
        model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)


@pytest.mark.parametrize("kind, table, limit", [("bert", 16, 16), ("roberta", 18, 17), ("gpt2", 16, 16)])
def test_input_plus_prompt_longer_than_the_position_table_is_a_clear_error(kind, table, limit):
    extra = {"n_positions": table} if kind == "gpt2" else {"max_position_embeddings": table}
    model = build(kind, head="lm" if kind == "gpt2" else "base", **extra)
    fastprefix.apply(model, PROMPT["pt"]())
    fits, _ = batch([limit - 3])
    model(input_ids=fits)  # m + S = limit: fits exactly
    too_long, _ = batch([limit - 2])
    with pytest.raises(ValueError, match=rf"{limit - 2}.*\b3\b.*{limit + 1}.*\b{limit}\b"):
        model(input_ids=too_long)


def test_real_minilm_512_tokens_plus_prompt_is_a_clear_error():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path())
    fastprefix.apply(model, fastprefix.PromptTuningConfig(num_virtual_tokens=8))
    with pytest.raises(ValueError, match=r"512.*\b8\b.*520.*512"):
        model(input_ids=torch.full((1, 512), 1000))


@pytest.mark.parametrize("method", METHODS)
def test_multiple_choice_flattens_choices_as_the_model_does(method):
    model = applied("bert", method, head="mc")
    module = model.fastprefix
    ids, mask = batch([6, 4, 5, 2], "right")
    ids, mask = ids.view(2, 2, -1), mask.view(2, 2, -1)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        flat = ids.view(4, -1)
        full = torch.cat([torch.ones(4, 3, dtype=mask.dtype), mask.view(4, -1)], 1)
        pooled = model.bert(inputs_embeds=_prompted_embeds(model, module, flat), attention_mask=full).pooler_output
        want = model.classifier(pooled).view(2, 2)
    _close(out.logits, want, method)
    _close(out.loss, nn.functional.cross_entropy(want, labels), "loss")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prompt_methods_train_under_autocast_on_an_fp32_base(kind, method):
    model = build(kind, head="seq" if kind == "bert" else "lm").float().train()
    fastprefix.apply(model, PROMPT[method]())
    perturb(model, 0.2)
    ids, mask = batch([6, 4], "right")
    labels = torch.tensor([0, 1]) if kind == "bert" else torch.where(mask.bool(), ids, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.fastprefix.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert model.fastprefix.prompt.grad.abs().sum() > 0


# ---------------------------------------------------------------- sliding windows and left padding


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_padding_under_a_sliding_window_is_said_not_silent(side):
    # the prompt sits in front of the left padding, which a sliding window counts: padded rows differ from the
    # rows alone once a row is longer than the window (tests/integrations/test_invariants_padding.py pins that),
    # so it warns
    import warnings

    # one layer; the position table and eos id at MistralConfig's defaults
    model = tiny("mistral", num_hidden_layers=1, sliding_window=4, max_position_embeddings=4096 * 32, eos_token_id=2)
    fastprefix.apply(model, fastprefix.PromptTuningConfig(num_virtual_tokens=2, prompt_init="normal"))
    ids, mask = batch((6, 3), side)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=ids, attention_mask=mask)
    said = [w for w in seen if "sliding window of 4 slots" in str(w.message)]
    assert len(said) == (1 if side == "left" else 0), [str(w.message) for w in seen]
