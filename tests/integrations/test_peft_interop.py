"""PEFT interop: ``prefix_positions="shift"``, ``fastprefix.from_peft`` and ``fastprefix.to_peft``.

- round trips PEFT -> fastprefix -> PEFT on the real MiniLM and a tiny GQA Llama, float32, padded batches: the
  fastprefix model's outputs equal PEFT's own model's to 1e-5, and the exported adapter loads in PEFT with
  the same outputs and the same tensors, for PREFIX_TUNING (with and without projection) and PROMPT_TUNING;
- ``"shift"`` positions on BERT, RoBERTa, GPT-2 and Llama in float64 against PEFT (the prefix in its KV cache)
  and against the same fastprefix model given the shifted position ids explicitly (1e-10);
- cached ``generate`` with ``"shift"`` = the uncached forward, and = PEFT's ``generate``;
- refusals: bad configs, positions past the table, models without shiftable positions, other PEFT methods,
  wrong models, damaged files (each leaves the model untouched), methods PEFT cannot hold.
"""

import copy
import dataclasses
import functools
import json
import os
import warnings

import peft
import pytest
import torch

import fastprefix
from fastprefix import peft_io
from fastprefix.integrations import positions as _positions
from helpers.models import PAD, VOCAB, batch, minilm_path, perturb, positions, tiny

FLOAT32 = dict(atol=1e-5, rtol=0)
EXACT = dict(atol=1e-10, rtol=0)
L, M = 5, 3  # prefix length, prompt length


# ------------------------------------------------------------------------------------------------ helpers
def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # PEFT warns about dropped position/token type ids: expected here
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _minilm_base():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path()).eval()


def _minilm():
    """A fresh copy of the real MiniLM (read from disk once)."""
    return copy.deepcopy(_minilm_base())


def _minilm_batch():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(["a cat sat on the mat today", "prefix tuning"], padding=True, return_tensors="pt")
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


BASES = {  # name -> (fresh base model, PEFT task type, inputs of a padded batch, main output)
    "minilm": (_minilm, "FEATURE_EXTRACTION", _minilm_batch, lambda out: out.last_hidden_state),
    "llama": (lambda: tiny("llama", dtype=torch.float32), "CAUSAL_LM",
              lambda: dict(zip(("input_ids", "attention_mask"), batch([6, 3], side="left"))), lambda out: out.logits),
}
ADAPTERS = {
    "prefix": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=L),
    "prefix-proj": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=L, prefix_projection=True,
                                                        encoder_hidden_size=16),
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=M),
}


def _peft_trained(base, task, kind, path, seed=3):
    """A PEFT model as training leaves it (PEFT's init moved off), saved with ``save_pretrained`` to ``path``."""
    model = peft.get_peft_model(base, ADAPTERS[kind](task))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return model.eval()


def _peft_adapter(base, task, kind, path, seed=3):
    _peft_trained(base, task, kind, path, seed)
    return path


def _peft_model(base, path):
    return peft.PeftModel.from_pretrained(base, path).eval()


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, peft_io.WEIGHTS_NAME))


def _untouched(model, reference):
    """``model`` has no fastprefix and the weights and attention of the fresh ``reference``."""
    sd, ref = model.state_dict(), reference.state_dict()
    return (not hasattr(model, "fastprefix") and sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
            and model.config._attn_implementation == reference.config._attn_implementation)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", list(ADAPTERS))
@pytest.mark.parametrize("name", list(BASES))
def test_round_trip_peft_fastprefix_peft(tmp_path, name, kind):
    make, task, inputs, main = BASES[name]
    src = tmp_path / "peft"
    reference = _peft_trained(make(), task, kind, src)  # PEFT's own model (projection MLP and all)
    kw = inputs()
    with torch.no_grad():
        want = main(_quiet(reference, **kw))

    model = fastprefix.from_peft(make(), src)
    config = model.fastprefix.config
    if kind == "prompt":
        assert type(config) is fastprefix.PromptTuningConfig and config.num_virtual_tokens == M
    else:  # PEFT saves the projection's output table, never the MLP
        assert type(config) is fastprefix.PTuningV2Config and config.prefix_positions == "shift"
        assert config.num_virtual_tokens == L and not config.prefix_projection
    with torch.no_grad():
        got = main(model(**kw))
    torch.testing.assert_close(got, want, **FLOAT32)

    dst = fastprefix.to_peft(model, tmp_path / "back")
    for key, tensor in _tensors(src).items():
        assert torch.equal(_tensors(dst)[key], tensor), key
    back = _peft_model(make(), dst)
    with torch.no_grad():
        again = main(_quiet(back, **kw))
    torch.testing.assert_close(again, want, **FLOAT32)


def test_llama_prefix_with_position_ids_and_without(tmp_path):
    """PEFT adds L to given position ids and numbers L.. without them; "shift" does both."""
    make = BASES["llama"][0]
    src = _peft_adapter(make(), "CAUSAL_LM", "prefix", tmp_path / "peft")
    reference, model = _peft_model(make(), src), fastprefix.from_peft(make(), src)
    ids, mask = batch([6, 3], side="left")
    for kw in (dict(attention_mask=mask, position_ids=positions(mask)), dict(attention_mask=mask), {}):
        with torch.no_grad():
            want, got = reference(input_ids=ids, **kw).logits, model(input_ids=ids, **kw).logits
        torch.testing.assert_close(got, want, **FLOAT32, msg=lambda e: f"{sorted(kw)}: {e}")


def test_gqa_prefix_layout_is_pefts(tmp_path):
    """Layer i's key is slot 2i, its value slot 2i+1, each [Hkv, L, D]: PEFT's past_key_values exactly."""
    make = BASES["llama"][0]
    src = _peft_adapter(make(), "CAUSAL_LM", "prefix", tmp_path / "peft")
    reference, model = _peft_model(make(), src), fastprefix.from_peft(make(), src)
    cache = reference.get_prompt(batch_size=1)
    prefixes = model.fastprefix()
    for i in range(model.config.num_hidden_layers):
        k, v = model.fastprefix.layer(prefixes, i)
        assert torch.equal(cache.layers[i].keys[0], k) and torch.equal(cache.layers[i].values[0], v)


def test_classifier_head_travels_as_modules_to_save(tmp_path):
    def make():
        return tiny("bert", head="seq", dtype=torch.float32)

    src = _peft_adapter(make(), "SEQ_CLS", "prefix", tmp_path / "peft")
    reference = _peft_model(make(), src)
    with torch.no_grad():  # the head PEFT trained (saved with the adapter), not the fresh one
        reference.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    reference.save_pretrained(tmp_path / "peft2")
    reference = _peft_model(make(), tmp_path / "peft2")
    ids, mask = batch([6, 3])
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
    model = fastprefix.from_peft(make(), tmp_path / "peft2")
    assert model.classifier.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, **FLOAT32)
    dst = fastprefix.to_peft(model, tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(_peft_model(make(), dst)(input_ids=ids, attention_mask=mask).logits, want,
                                   **FLOAT32)


# ------------------------------------------------------------------------------------------------ "shift" positions
SHIFT_FAMILIES = {"bert": "FEATURE_EXTRACTION", "roberta": "FEATURE_EXTRACTION", "gpt2": "CAUSAL_LM",
                  "llama": "CAUSAL_LM"}


def _shifted(family, config=None):
    config = config or fastprefix.PTuningV2Config(num_virtual_tokens=L, prefix_positions="shift")
    model = tiny(family, dropout=0.0)
    torch.manual_seed(0)  # the method's init draws from the global generator: the same module every call
    return perturb(fastprefix.apply(model, config))


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(SHIFT_FAMILIES))
def test_shift_equals_peft_float64(tmp_path, family, side):
    model = _shifted(family)
    reference = _peft_model(tiny(family, dropout=0.0), fastprefix.to_peft(model, tmp_path / "a"))
    ids, mask = batch([6, 3], side=side)
    calls = [dict(attention_mask=mask)]
    if family in ("gpt2", "llama"):
        calls.append(dict(attention_mask=mask, position_ids=positions(mask)))
    for kw in calls:
        with torch.no_grad():
            got, want = _main(model(input_ids=ids, **kw)), _main(reference(input_ids=ids, **kw))
        torch.testing.assert_close(got, want, **EXACT, msg=lambda e: f"{sorted(kw)}: {e}")


@pytest.mark.parametrize("family", list(SHIFT_FAMILIES))
def test_shift_is_the_none_model_with_shifted_position_ids(family):
    """The explicit reference: "none" with the positions a cached prefix implies, written out here."""
    ids, mask = batch([6, 3], side="left" if family != "bert" else "right")
    shifted = _shifted(family)
    plain = fastprefix.apply(tiny(family, dropout=0.0), fastprefix.PTuningV2Config(num_virtual_tokens=L))
    plain.fastprefix.load_state_dict(shifted.fastprefix.state_dict())
    S = ids.shape[1]
    if family == "roberta":  # pads keep padding_idx, real tokens count from padding_idx + 1 after the prefix
        real = (ids != PAD).long()
        pos = (real.cumsum(1) + L) * real + PAD
    else:
        pos = torch.arange(L, L + S).expand(len(ids), S)
    with torch.no_grad():
        got = _main(shifted(input_ids=ids, attention_mask=mask))
        want = _main(plain(input_ids=ids, attention_mask=mask, position_ids=pos))
        moved = _main(plain(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(got, want, **EXACT)
    assert not torch.allclose(got, moved), "degenerate test: the shift changed nothing"


def test_shift_with_apt_and_projection():
    ids, mask = batch([6, 3], side="left")
    for config in (fastprefix.APTConfig(num_virtual_tokens=L, prefix_positions="shift"),
                   fastprefix.PTuningV2Config(num_virtual_tokens=L, prefix_projection=True, projection_hidden=16,
                                              prefix_positions="shift")):
        shifted = _shifted("llama", config)
        plain = fastprefix.apply(tiny("llama", dropout=0.0), dataclasses.replace(config, prefix_positions="none"))
        plain.fastprefix.load_state_dict(shifted.fastprefix.state_dict())
        with torch.no_grad():
            got = shifted(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            want = plain(input_ids=ids, attention_mask=mask, position_ids=positions(mask) + L).logits
        torch.testing.assert_close(got, want, **EXACT)


def test_shift_with_packed_sequences():
    """Restarting position ids (a padding-free batch) move up by L too: each sequence equals itself alone."""
    model = _shifted("llama")
    a, b = torch.randint(3, VOCAB, (1, 6)), torch.randint(3, VOCAB, (1, 3))
    pos = torch.cat([torch.arange(6), torch.arange(3)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos).logits
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
    torch.testing.assert_close(packed, alone, **EXACT)


def _generate(model, hooked=None, **kw):
    """Greedy ``generate`` of 3 tokens: the sequences and each step's float64 next-token logits (read from the
    forward of ``hooked``, the transformers model, as ``output_logits`` would round them to float32)."""
    seen = []
    hooked = model if hooked is None else hooked
    hook = hooked.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].detach().clone()))
    try:
        with torch.no_grad():
            seqs = _quiet(model.generate, **kw, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None)
    finally:
        hook.remove()
    return seqs, seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shift_generate_equals_uncached_forward_and_peft(tmp_path, family):
    model = _shifted(family)
    ids, mask = batch([6, 3], side="left")
    seqs, seen = _generate(model, input_ids=ids, attention_mask=mask)
    S = ids.shape[1]
    for step, logits in enumerate(seen):
        cur = seqs[:, :S + step]
        cur_mask = torch.cat([mask, torch.ones(len(cur), step, dtype=mask.dtype)], 1)
        with torch.no_grad():
            want = model(input_ids=cur, attention_mask=cur_mask, position_ids=positions(cur_mask),
                         use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, want, **EXACT, msg=lambda e: f"step {step}: {e}")
    reference = _peft_model(tiny(family, dropout=0.0), fastprefix.to_peft(model, tmp_path / "a"))
    peft_seqs, peft_seen = _generate(reference, reference.get_base_model(), input_ids=ids, attention_mask=mask)
    assert torch.equal(peft_seqs, seqs)
    for step, (logits, want) in enumerate(zip(seen, peft_seen, strict=True)):
        torch.testing.assert_close(logits, want, **EXACT, msg=lambda e: f"PEFT, step {step}: {e}")


# ------------------------------------------------------------------------------------------------ config and refusals
def test_prefix_positions_config():
    assert fastprefix.PTuningV2Config().prefix_positions == "none"
    assert fastprefix.APTConfig(prefix_positions="shift").to_dict()["prefix_positions"] == "shift"
    for bad in ("left", "", None, True, 1):
        with pytest.raises(ValueError, match="prefix_positions"):
            fastprefix.PTuningV2Config(prefix_positions=bad)
    old = fastprefix.PTuningV2Config().to_dict()
    del old["prefix_positions"]  # an adapter saved before the field existed
    assert fastprefix.config_from_dict(old).prefix_positions == "none"


def test_shift_saves_and_loads_with_the_adapter(tmp_path):
    model = _shifted("bert")
    ids, mask = batch([6, 3])
    fastprefix.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["prefix_positions"] == "shift"
    fresh = fastprefix.load_adapter(tiny("bert", dropout=0.0), tmp_path)
    assert fresh.fastprefix.config.prefix_positions == "shift"
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).last_hidden_state,
                           model(input_ids=ids, attention_mask=mask).last_hidden_state)
    # an adapter saved before the field existed loads as "none"
    old = fastprefix.apply(tiny("bert", dropout=0.0), fastprefix.PTuningV2Config(num_virtual_tokens=L))
    fastprefix.save_adapter(old, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    del meta["config"]["prefix_positions"]
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    fresh = fastprefix.load_adapter(tiny("bert", dropout=0.0), tmp_path / "old")
    assert fresh.fastprefix.config.prefix_positions == "none"


@pytest.mark.parametrize("family, rows", [("bert", 64), ("roberta", 70), ("gpt2", 64)])
def test_shift_past_the_position_table_is_refused_at_the_forward(family, rows):
    model = _shifted(family)
    first = PAD + 1 if family == "roberta" else 0
    fits = rows - first - L
    ids = torch.randint(3, VOCAB, (1, fits))
    with torch.no_grad():
        model(input_ids=ids)  # S + L positions: exactly the table
    with pytest.raises(ValueError, match=rf"S={fits + 1} tokens.*{rows} rows.*at most {rows - first}"):
        with torch.no_grad():
            model(input_ids=torch.randint(3, VOCAB, (1, fits + 1)))


def test_shift_refused_on_relative_positions():
    deberta = tiny("deberta-v2", position_biased_input=False)  # relative positions only
    t5 = tiny("t5", dropout=0.0)
    assert "relative" in _positions.refusal(deberta) and "relative" in _positions.refusal(t5)
    for model in (deberta, t5):
        with pytest.raises(ValueError, match=type(model).__name__):
            fastprefix.apply(model, fastprefix.PTuningV2Config(num_virtual_tokens=L, prefix_positions="shift"))
        assert not hasattr(model, "fastprefix")
    assert _positions.refusal(tiny("llama", dropout=0.0)) is None
    assert _positions.refusal(tiny("roberta", dropout=0.0)) is None


def _saved(tmp_path, kind="prefix"):
    return _peft_adapter(BASES["llama"][0](), "CAUSAL_LM", kind, tmp_path / "peft")


def _edit_config(path, **change):
    file = os.path.join(path, peft_io.CONFIG_NAME)
    cfg = json.loads(open(file).read())
    cfg.update(change)
    with open(file, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(path, change):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, peft_io.WEIGHTS_NAME)
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _lora(tmp_path):
    model = peft.get_peft_model(BASES["llama"][0](), peft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                       target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _truncate(path):
    file = os.path.join(path, peft_io.WEIGHTS_NAME)
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


BAD_ADAPTERS = {
    "lora": (_lora, "'LORA'"),
    "p_tuning": (lambda t: _edit_config(_saved(t), peft_type="P_TUNING") or t / "peft", "P_TUNING"),
    "seq2seq": (lambda t: _edit_config(_saved(t), num_transformer_submodules=2) or t / "peft", "encoder-decoder"),
    "other-layers": (lambda t: _edit_config(_saved(t), num_layers=3) or t / "peft", "num_layers: adapter 3 vs model 2"),
    "other-heads": (lambda t: _edit_config(_saved(t), num_attention_heads=4, token_dim=32) or t / "peft",
                    "num_attention_heads: adapter 4 vs model 2"),
    "prompt-width": (lambda t: _edit_config(_saved(t, "prompt"), token_dim=48) or t / "peft", "token_dim"),
    "table-shape": (lambda t: _edit_tensors(_saved(t), lambda d: d.update(prompt_embeddings=d["prompt_embeddings"][1:]))
                    or t / "peft", r"prompt_embeddings in .* is \[4, 64\], expected \[5, 64\]"),
    "nan": (lambda t: _edit_tensors(_saved(t), lambda d: d["prompt_embeddings"].view(-1).__setitem__(7, float("nan")))
            or t / "peft", "NaN"),
    "extra-tensor": (lambda t: _edit_tensors(_saved(t), lambda d: d.update(stray=torch.zeros(2))) or t / "peft",
                     "'stray'"),
    "no-table": (lambda t: _edit_tensors(_saved(t), lambda d: d.update(other=d.pop("prompt_embeddings")))
                 or t / "peft", "no 'prompt_embeddings'"),
    "truncated": (lambda t: _truncate(_saved(t)) or t / "peft", "truncated or corrupted"),
    "bad-json": (lambda t: open(os.path.join(_saved(t), peft_io.CONFIG_NAME), "w").write("{") and t / "peft",
                 "not valid JSON"),
    "no-config": (lambda t: t, "no adapter_config.json"),
    "no-weights": (lambda t: os.remove(os.path.join(_saved(t), peft_io.WEIGHTS_NAME)) or t / "peft",
                   "no adapter_model.safetensors"),
    "minilm-adapter": (lambda t: _peft_adapter(_minilm(), "FEATURE_EXTRACTION", "prefix", t / "peft"),
                       "trained on another model"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_from_peft_refuses_and_leaves_the_model_untouched(tmp_path, case):
    make, match = BAD_ADAPTERS[case]
    path = make(tmp_path)
    model, reference = BASES["llama"][0](), BASES["llama"][0]()
    with pytest.raises(ValueError, match=match):
        fastprefix.from_peft(model, path)
    assert _untouched(model, reference)


def test_from_peft_refuses_an_applied_model(tmp_path):
    model = fastprefix.apply(BASES["llama"][0](), fastprefix.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already applied"):
        fastprefix.from_peft(model, _saved(tmp_path))


TO_PEFT_REFUSED = {
    "ptv2-none": (lambda: fastprefix.PTuningV2Config(num_virtual_tokens=L), "prefix_positions='none'"),
    "apt": (lambda: fastprefix.APTConfig(num_virtual_tokens=L, prefix_positions="shift"), "APT's token and layer"),
    "dept": (lambda: fastprefix.DePTConfig(num_virtual_tokens=M, rank=2, max_length=16), "DePT"),
    "adept": (lambda: fastprefix.ADePTConfig(num_virtual_tokens=M, rank=2), "ADePT"),
}


@pytest.mark.parametrize("case", list(TO_PEFT_REFUSED) + ["adept-merged"])
def test_to_peft_refuses_what_peft_cannot_hold(tmp_path, case):
    make, match = TO_PEFT_REFUSED["adept" if case == "adept-merged" else case]
    model = fastprefix.apply(tiny("llama", dropout=0.0), make())
    if case == "adept-merged":
        fastprefix.merge(model)
    with pytest.raises(ValueError, match=match):
        fastprefix.to_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
