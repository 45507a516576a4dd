"""save_adapter / load_adapter round trips and their failure modes, ADePT merge, the APT gate report."""

import json
import os

import pytest
import torch

import fastprefix
from fastprefix.adapters import CONFIG_NAME, WEIGHTS_NAME
from fastprefix.integrations import transformers as integration
from helpers.models import METHODS, PROMPT_METHODS, applied, batch, minilm_path, perturb, run, tiny

EXACT = dict(atol=1e-10, rtol=0)


def _out(model, kind="bert"):
    ids, mask = batch([6, 3])
    with torch.no_grad():
        return run(model, kind, ids, mask)


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_into_a_fresh_model_and_into_an_applied_one(tmp_path, method):
    model = applied("bert", method)
    want = _out(model)
    fastprefix.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["method"] == METHODS[method]().method and meta["fastprefix_version"] == fastprefix.__version__
    assert meta["base_model"]["shape"]["hidden_size"] == 32
    assert set(meta["tensors"]) == {"fastprefix." + k for k in model.fastprefix.state_dict()}

    fresh = tiny("bert")
    assert fastprefix.load_adapter(fresh, tmp_path) is fresh
    assert torch.equal(_out(fresh), want)
    for name, p in fresh.named_parameters():
        assert p.requires_grad == name.startswith("fastprefix.")

    again = tiny("bert")
    fastprefix.apply(again, METHODS[method]())
    fastprefix.load_adapter(again, tmp_path)
    assert torch.equal(_out(again), want)


def test_round_trip_keeps_trainable_base_modules(tmp_path):
    def cls():
        return tiny("bert", head="seq")

    model = fastprefix.apply(cls(), METHODS["apt"](), trainable=("classifier",))
    perturb(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    ids, mask = batch([6, 3])
    want = model(input_ids=ids, attention_mask=mask).logits
    fastprefix.save_adapter(model, tmp_path)
    fresh = fastprefix.load_adapter(cls(), tmp_path)
    assert fresh.classifier.weight.requires_grad
    assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)


def test_real_minilm_round_trip(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a cat on a mat", "prefix tuning"], padding=True, return_tensors="pt")
    model = fastprefix.apply(AutoModel.from_pretrained(path).eval(), METHODS["apt"]())
    perturb(model, scale=0.2)
    with torch.no_grad():
        want = model(**enc).last_hidden_state
    fastprefix.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["base_model"]["name_or_path"] == path
    fresh = fastprefix.load_adapter(AutoModel.from_pretrained(path).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**enc).last_hidden_state, want)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _unchanged(model, snap):
    sd, impl = snap
    now = model.state_dict()
    same = now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    return same and model.config._attn_implementation == impl


def _corrupt_json(d):
    (d / CONFIG_NAME).write_text('{"format": "fastprefix-adapter", "method": ')


def _truncate(d):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _garble_header(d):
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[8:24] = b"\xff" * 16
    (d / WEIGHTS_NAME).write_bytes(bytes(data))


def _rewrite_tensors(d, change):
    """Edit the tensors of a saved adapter, keeping its metadata (the save id pairing it with its JSON)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(d / WEIGHTS_NAME, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(d / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, d / WEIGHTS_NAME, metadata=metadata)


def _edit_meta(d, change):
    meta = json.loads((d / CONFIG_NAME).read_text())
    change(meta)
    (d / CONFIG_NAME).write_text(json.dumps(meta))


BAD = {
    "bad-json": (_corrupt_json, "not valid JSON"),
    "truncated": (_truncate, "truncated or corrupted"),
    "garbled-header": (_garble_header, "truncated or corrupted"),
    "missing-tensor": (lambda d: _rewrite_tensors(d, lambda t: t.pop("fastprefix.gate_bias")), "missing"),
    "extra-tensor": (lambda d: _rewrite_tensors(d, lambda t: t.update(extra=torch.zeros(2))), "unexpected"),
    "wrong-shape": (lambda d: _rewrite_tensors(d, lambda t: t.update({"fastprefix.gate_bias": torch.zeros(2, 3)})),
                    "wrong shapes"),
    "unknown-method": (lambda d: _edit_meta(d, lambda m: m["config"].update(method="lora")), "unknown method"),
    "bad-config-field": (lambda d: _edit_meta(d, lambda m: m["config"].update(num_virtual_tokens=0)), "positive int"),
    "no-weights": (lambda d: os.remove(d / WEIGHTS_NAME), "no adapter.safetensors"),
    "not-an-adapter": (lambda d: _edit_meta(d, lambda m: m.pop("format")), "not a fastprefix adapter"),
}


@pytest.mark.parametrize("applied_first", [False, True], ids=["fresh-model", "applied-model"])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_adapters_are_value_errors_and_leave_the_model_unchanged(tmp_path, bad, applied_first):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    damage, message = BAD[bad]
    damage(tmp_path)
    model = tiny("bert")
    if applied_first:
        fastprefix.apply(model, METHODS["apt"]())
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastprefix.load_adapter(model, tmp_path)
    assert _unchanged(model, snap)
    assert (integration.state_of(model, required=False) is not None) == applied_first


def test_mismatched_model_and_wrong_method_are_value_errors(tmp_path):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    for model, message in ((tiny("roberta"), "trained on a 'bert' model"),  # same sizes, another family
                           (tiny("llama"), "'bert' model"),
                           (fastprefix.apply(tiny("bert"), METHODS["ptv2"]()), "'p_tuning_v2' applied"),
                           (fastprefix.apply(tiny("bert"), fastprefix.APTConfig(num_virtual_tokens=2)), "differs")):
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            fastprefix.load_adapter(model, tmp_path)
        assert _unchanged(model, snap)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        fastprefix.load_adapter(tiny("bert"), tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_adept_merge_runs_plain_prompt_tuning_with_the_same_outputs(kind):
    model = applied(kind, "adept")
    want = _out(model, kind)
    fastprefix.merge(model)
    state = integration.state_of(model)
    assert state.folded is not None and state.folded.shape == model.get_input_embeddings().weight.shape
    assert "folded_embedding" not in model.state_dict() and model.fastprefix.folded_embedding is state.folded
    with torch.no_grad():  # after the fold the FFN is not used at all
        model.fastprefix.up_weight.fill_(float("nan"))
    torch.testing.assert_close(_out(model, kind), want, **EXACT)
    if kind == "llama":
        ids, mask = batch([6, 3], "left")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape == (2, 9)
    fastprefix.unmerge(model)
    assert torch.isnan(_out(model, kind)).all()


def test_merge_refuses_other_methods():
    for method in ("pt", "dept", "apt"):
        with pytest.raises(ValueError, match="nothing to fold"):
            fastprefix.merge(applied("bert", method))


def test_gate_report_values_plot_and_errors(tmp_path):
    model = applied("bert", "apt")
    with pytest.raises(ValueError, match="run a forward"):
        fastprefix.gate_report(model)
    ids, mask = batch([6, 3])
    with torch.no_grad():
        model.fastprefix.layer_scale.copy_(torch.tensor([0.5, 2.0]))
    report = fastprefix.gate_report(model, dict(input_ids=ids, attention_mask=mask))
    stats = integration.state_of(model).gate_stats
    assert report.num_layers == 2 and report.lam == [0.5, 2.0]
    for i in range(2):
        assert report.alpha[i] == pytest.approx(float(stats[i].mean()))
        assert report.gate[i] == pytest.approx(report.lam[i] * report.alpha[i])
        assert len(report.alpha_per_token[i]) == 5 and all(0 < a < 1 for a in report.alpha_per_token[i])
    # the last forward is what gets reported
    _out(model)
    assert fastprefix.gate_report(model).alpha == pytest.approx(report.alpha)
    assert "lambda" in str(report) and set(report.to_dict()) == {"alpha", "lambda", "gate", "alpha_per_token"}
    png = report.plot(tmp_path / "gates.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    fastprefix.probe.record_gates(model, False)
    _out(model)
    with pytest.raises(ValueError, match="run a forward"):
        fastprefix.gate_report(model)
    fastprefix.probe.record_gates(model, True)
    with pytest.raises(ValueError, match="APT"):
        fastprefix.gate_report(applied("bert", "ptv2"))
    with pytest.raises(ValueError, match="mapping"):
        fastprefix.gate_report(model, ids)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_init_from_vocabulary_copies_embedding_rows(method):
    model = tiny("bert")
    fastprefix.apply(model, METHODS[method](), generator=torch.Generator().manual_seed(0))
    table = model.get_input_embeddings().weight.float()
    for row in model.fastprefix.prompt:
        assert (table == row).all(-1).any()
