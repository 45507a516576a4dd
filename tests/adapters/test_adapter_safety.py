"""Adapters that don't belong are refused, saves never destroy the previous adapter, merged models don't train."""

import json
import os

import pytest
import torch

import fastprefix
from fastprefix import adapters
from fastprefix.adapters import CONFIG_NAME, WEIGHTS_NAME
from fastprefix.integrations import transformers as integration
from fastprefix.integrations.families import model_shape
from helpers.models import METHODS, applied, batch, run, tiny


def _qwen2_shaped_like_tiny_llama():
    """A Qwen2 with exactly the tiny Llama's sizes: the shape fingerprint alone can't tell them apart."""
    return tiny("qwen2", hidden_size=32, num_attention_heads=4)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _unchanged(model, snap):
    sd, impl = snap
    now = model.state_dict()
    return now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd) \
        and model.config._attn_implementation == impl


def _refused(model, directory, match, method=None):
    """load_adapter raises a ValueError matching ``match`` and leaves ``model`` exactly as it was."""
    if method is not None:
        fastprefix.apply(model, METHODS[method]())
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastprefix.load_adapter(model, directory)
    assert _unchanged(model, snap)
    assert (integration.state_of(model, required=False) is not None) == (method is not None)


def _out(model, kind="bert"):
    ids, mask = batch([6, 3], "left" if kind == "llama" else "right")
    with torch.no_grad():
        return run(model, kind, ids, mask)


def _edit_meta(d, change):
    meta = json.loads((d / CONFIG_NAME).read_text())
    change(meta)
    (d / CONFIG_NAME).write_text(json.dumps(meta))


def _rewrite_tensors(d, change, metadata=True):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(d / WEIGHTS_NAME, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(d / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, d / WEIGHTS_NAME, metadata=meta if metadata else {"format": "pt"})


APPLIED = [None, "ptv2"]  # load into a fresh model, or into one with the method applied
APPLIED_IDS = ["fresh-model", "applied-model"]


@pytest.mark.parametrize("method", APPLIED, ids=APPLIED_IDS)
def test_an_adapter_of_another_family_with_the_same_shape_is_refused(tmp_path, method):
    fastprefix.save_adapter(applied("llama", "ptv2"), tmp_path)
    qwen2 = _qwen2_shaped_like_tiny_llama()
    assert model_shape(qwen2).to_dict() | {"model_type": "llama"} == \
        model_shape(tiny("llama")).to_dict()
    _refused(qwen2, tmp_path, "trained on a 'llama' model \\(LlamaForCausalLM\\), not on a 'qwen2' model "
                              "\\(Qwen2ForCausalLM\\)", method)


def test_another_config_class_of_the_same_family_is_refused(tmp_path):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    _edit_meta(tmp_path, lambda m: m["base_model"].update(config_class="MyBertConfig"))
    _refused(tiny("bert"), tmp_path, "configured by MyBertConfig, this 'bert' model \\(BertModel\\) is configured "
                                     "by BertConfig")


def test_a_model_of_the_same_family_and_another_shape_is_refused(tmp_path):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    wider = tiny("bert", hidden_size=48, max_position_embeddings=512)  # BertConfig's own position table
    _refused(wider, tmp_path, "different shape \\(hidden_size: adapter 32 vs model 48, head_dim: adapter 8 vs model 12")


@pytest.mark.parametrize("method", [None, "apt"], ids=APPLIED_IDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_tensors_are_refused_by_name(tmp_path, value, method):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    _rewrite_tensors(tmp_path, lambda t: t["fastprefix.gate_bias"].view(-1).__setitem__(3, value))
    _refused(tiny("bert"), tmp_path, "NaN or infinite values: \\['fastprefix.gate_bias'\\]", method)


@pytest.mark.parametrize("method", [None, "apt"], ids=APPLIED_IDS)
def test_an_adapter_from_a_newer_major_version_is_refused_naming_both(tmp_path, method):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    major = int(fastprefix.__version__.split(".")[0])
    _edit_meta(tmp_path, lambda m: m.update(fastprefix_version=f"{major + 1}.0.0"))
    _refused(tiny("bert"), tmp_path, f"written by fastprefix {major + 1}.0.0, a newer major version than this "
                                     f"fastprefix {fastprefix.__version__}", method)


@pytest.mark.parametrize("version", [None, "", "banana", 1], ids=["missing", "empty", "word", "number"])
def test_an_unreadable_version_is_refused(tmp_path, version):
    fastprefix.save_adapter(applied("bert", "apt"), tmp_path)
    _edit_meta(tmp_path, lambda m: m.update(fastprefix_version=version))
    _refused(tiny("bert"), tmp_path, f"lacks a valid fastprefix_version \\(got {version!r}\\)")


def test_a_newer_minor_version_and_the_first_format_still_load(tmp_path):
    model = applied("bert", "apt")
    want = _out(model)
    fastprefix.save_adapter(model, tmp_path)
    major = fastprefix.__version__.split(".")[0]
    _edit_meta(tmp_path, lambda m: m.update(fastprefix_version=f"{major}.99.0"))
    assert torch.equal(_out(fastprefix.load_adapter(tiny("bert"), tmp_path)), want)

    # what 0.1.0 wrote before the save id and the config class: its model_type was in the shape already
    def first_format(meta):
        del meta["save_id"], meta["base_model"]["config_class"]
        meta["fastprefix_version"] = "0.1.0"
        meta["base_model"]["shape"].pop("embedding_size", None)
    _edit_meta(tmp_path, first_format)
    _rewrite_tensors(tmp_path, lambda t: None, metadata=False)
    assert torch.equal(_out(fastprefix.load_adapter(tiny("bert"), tmp_path)), want)


def test_files_of_two_saves_are_refused(tmp_path):
    """A process killed between the two renames of a save: new tensors under the old config."""
    old, new = tmp_path / "old", tmp_path / "new"
    fastprefix.save_adapter(applied("bert", "apt"), old)
    fastprefix.save_adapter(applied("bert", "apt", scale=0.7), new)
    os.replace(new / WEIGHTS_NAME, old / WEIGHTS_NAME)
    _refused(tiny("bert"), old, "adapter.safetensors in .* is not the one adapter_config.json was saved with")


class _Boom(Exception):
    pass


def _fail_on_call(monkeypatch, target, name, n):
    """Make ``target.name`` raise on its n-th call (1-based); earlier calls run normally."""
    real, calls = getattr(target, name), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Boom(f"{name} failed (call {n})")
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, fake)


def _fail_mid_write(monkeypatch, n):
    """The n-th staged file gets half its bytes written, then the disk 'fills up'."""
    real, calls = os.fdopen, []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise _Boom("disk full")

    def fake(*args, **kwargs):
        calls.append(1)
        f = real(*args, **kwargs)
        return HalfWriter(f) if len(calls) == n else f
    monkeypatch.setattr(adapters.os, "fdopen", fake)


FAILURES = {
    "serialising": lambda mp: _fail_on_call(mp, __import__("safetensors.torch").torch, "save", 1),
    "writing-tensors": lambda mp: _fail_mid_write(mp, 1),
    "writing-config": lambda mp: _fail_mid_write(mp, 2),
    "flushing-config": lambda mp: _fail_on_call(mp, adapters.os, "fsync", 2),
    "renaming-tensors": lambda mp: _fail_on_call(mp, adapters.os, "replace", 1),
    "renaming-config": lambda mp: _fail_on_call(mp, adapters.os, "replace", 2),  # after the tensors moved in
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_save_failing_at_any_point_leaves_the_previous_adapter_intact(tmp_path, monkeypatch, failure):
    old = applied("bert", "apt")
    want = _out(old)
    fastprefix.save_adapter(old, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    FAILURES[failure](monkeypatch)
    with pytest.raises(_Boom):
        fastprefix.save_adapter(applied("bert", "apt", scale=0.7), tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # nothing changed, nothing left behind
    assert torch.equal(_out(fastprefix.load_adapter(tiny("bert"), tmp_path)), want)


def test_a_failed_first_save_leaves_no_files(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, adapters.os, "replace", 2)
    with pytest.raises(_Boom):
        fastprefix.save_adapter(applied("bert", "apt"), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def test_saved_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    fastprefix.save_adapter(applied("bert", "pt"), tmp_path)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask


def _train_step(model, kind="bert"):
    ids, mask = batch([6, 3])
    return run(model.train(), kind, ids, mask).pow(2).mean()


def test_a_merged_adept_model_refuses_to_train_until_unmerged():
    model = applied("bert", "adept")
    fastprefix.merge(model)
    with pytest.raises(RuntimeError, match="call fastprefix.unmerge\\(model\\) before training"):
        _train_step(model)
    with torch.no_grad():  # inference is unaffected, in either mode
        _train_step(model)
    want = _out(model.eval())
    assert torch.equal(_out(model), want)
    model.eval().zero_grad()
    run(model, "bert", *batch([6, 3])).sum().backward()  # eval with gradients (e.g. saliency) is inference too
    fastprefix.unmerge(model)
    _train_step(model).backward()
    assert all(p.grad is not None for n, p in model.fastprefix.named_parameters() if n != "prompt")


def test_a_merged_model_with_a_frozen_ffn_may_train_its_prompt():
    model = applied("bert", "adept")
    fastprefix.merge(model)
    for name, p in model.fastprefix.named_parameters():
        p.requires_grad_(name == "prompt")
    _train_step(model).backward()
    assert model.fastprefix.prompt.grad is not None


def test_remove_takes_the_merge_guard_off():
    model = applied("bert", "adept")
    hooks = dict(model._forward_pre_hooks)
    fastprefix.merge(model)
    fastprefix.merge(model)  # merging twice keeps one guard
    assert len(model._forward_pre_hooks) == len(hooks) + 1
    fastprefix.remove(model)
    assert len(model._forward_pre_hooks) == 0
    _train_step(model)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_trainable_parameter_gets_a_gradient(method, kind="bert"):
    """No trainable fastprefix parameter is silently bypassed: each gets a non-zero gradient from one step
    (perturbed off the init, whose zero up-projections zero the down-projections' gradients)."""
    model = applied(kind, method).train()
    for module in model.modules():  # deterministic: dropout could zero a small prefix's path by chance
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    _train_step(model, kind).backward()
    for name, p in model.fastprefix.named_parameters():
        assert p.grad is not None and bool(p.grad.ne(0).any()), f"{method}: {name} got no gradient"


def test_save_adapter_takes_the_tensors_from_a_given_full_state_dict(tmp_path):
    """The FSDP2 path (tests/integrations/test_scale.py) on one process: tensors from the gathered state dict, checked."""
    model = applied("bert", "apt")
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["fastprefix.layer_scale"] = full["fastprefix.layer_scale"] + 1.0  # tell the two sources apart
    fastprefix.save_adapter(model, tmp_path, state_dict=full)
    loaded = fastprefix.load_adapter(tiny("bert"), tmp_path)
    assert torch.equal(loaded.fastprefix.layer_scale, full["fastprefix.layer_scale"])
    del full["fastprefix.gate_bias"]
    with pytest.raises(ValueError, match="state_dict lacks the adapter's tensors \\['fastprefix.gate_bias'\\]"):
        fastprefix.save_adapter(model, tmp_path / "other", state_dict=full)
