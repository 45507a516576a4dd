"""Several named adapters on one model: add_adapter, set_adapter, delete_adapter, list_adapters, active_adapter, and
save_adapter / load_adapter / to_peft / prompt_embeds by name.

Each adapter, made active, must give exactly (bit for bit) what a fresh model with only that adapter gives, and
switching back must give the first adapter's outputs again; the files are those of a one-adapter model.
"""

import copy

import pytest
import safetensors.torch
import torch

import fastprefix
from fastprefix import peft_io
from fastprefix.adapters import WEIGHTS_NAME
from helpers.models import METHODS, applied, batch, run, tiny

KINDS = ("bert", "llama", "t5")

# a second adapter of each method: another length, rank, projection or gate mode than METHODS'
OTHER = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=4),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=2, rank=3, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=4, rank=2),
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=7),
    "ptv2-proj": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=3, prefix_projection=True,
                                                    projection_hidden=8),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=2, gate="pooled"),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=6),
}


def _out(model, kind):
    ids, mask = batch([6, 3])
    with torch.no_grad():
        return run(model, kind, ids, mask)


def _moved(module, seed):
    """``module`` with its parameters moved off their init (so every path of the adapter matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def _two_adapters(kind, method):
    """``kind``'s model with ``method`` as "default" and OTHER[method] as "b" (active: "default"), and a fresh model
    with only "b"'s weights."""
    model = applied(kind, method)
    fastprefix.add_adapter(model, OTHER[method](), "b")
    b = _moved(model.fastprefix_adapters["b"], seed=7)
    alone = fastprefix.apply(tiny(kind), OTHER[method]())
    alone.fastprefix.load_state_dict(b.state_dict())
    return model, alone


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_each_active_adapter_is_that_adapter_alone(kind, method):
    model = applied(kind, method)
    want_default = _out(model, kind)
    fastprefix.add_adapter(model, OTHER[method](), "b")
    assert fastprefix.list_adapters(model) == ["default", "b"] and fastprefix.active_adapter(model) == "default"
    assert torch.equal(_out(model, kind), want_default)  # adding leaves the active adapter's outputs alone
    b = _moved(model.fastprefix_adapters["b"], seed=7)
    alone = fastprefix.apply(tiny(kind), OTHER[method]())
    alone.fastprefix.load_state_dict(b.state_dict())

    assert fastprefix.set_adapter(model, "b") is model
    assert fastprefix.active_adapter(model) == "b" and model.fastprefix is b
    assert torch.equal(_out(model, kind), _out(alone, kind))
    fastprefix.set_adapter(model, "default")
    assert torch.equal(_out(model, kind), want_default)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_and_load_by_name(tmp_path, method):
    model, alone = _two_adapters("bert", method)
    want_default = _out(model, "bert")
    fastprefix.save_adapter(model, tmp_path / "default")
    fastprefix.save_adapter(model, tmp_path / "b", adapter_name="b")  # inactive: saved from where it sits
    # the files of a one-adapter model: the same tensors under the same keys
    assert safetensors.torch.load_file(tmp_path / "b" / WEIGHTS_NAME).keys() == {
        "fastprefix." + k for k in alone.fastprefix.state_dict()}

    fresh = tiny("bert")
    fastprefix.load_adapter(fresh, tmp_path / "b", adapter_name="b")  # a model without fastprefix: applied as "b"
    fastprefix.load_adapter(fresh, tmp_path / "default", adapter_name="default")  # added beside it, "b" stays active
    assert fastprefix.list_adapters(fresh) == ["b", "default"] and fastprefix.active_adapter(fresh) == "b"
    assert torch.equal(_out(fresh, "bert"), _out(alone, "bert"))
    fastprefix.set_adapter(fresh, "default")
    assert torch.equal(_out(fresh, "bert"), want_default)
    fastprefix.load_adapter(fresh, tmp_path / "b", adapter_name="b")  # into the inactive adapter of that name
    fastprefix.set_adapter(fresh, "b")
    assert torch.equal(_out(fresh, "bert"), _out(alone, "bert"))


def test_training_after_a_switch_trains_the_active_adapter_only():
    model, _ = _two_adapters("llama", "apt")
    default, b = model.fastprefix, model.fastprefix_adapters["b"]
    params = [p for p in model.parameters() if p.requires_grad]  # every adapter's, each once
    assert len(params) == len(list(default.parameters())) + len(list(b.parameters()))
    opt = torch.optim.SGD(params, lr=0.1)
    before = {n: p.detach().clone() for n, p in [*default.named_parameters("d"), *b.named_parameters("b")]}
    fastprefix.set_adapter(model, "b")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}  # the same tensors
    ids, mask = batch([5, 4])
    run(model, "llama", ids, mask).float().pow(2).mean().backward()
    assert all(p.grad is None for p in default.parameters()) and all(p.grad is not None for p in b.parameters())
    opt.step()
    after = {n: p.detach() for n, p in [*default.named_parameters("d"), *b.named_parameters("b")]}
    assert all(torch.equal(after[n], before[n]) == n.startswith("d") for n in before)


def test_delete_and_remove():
    model, _ = _two_adapters("bert", "ptv2")
    keys = set(model.state_dict())
    assert any(k.startswith("fastprefix_adapters.b.") for k in keys)
    with pytest.raises(ValueError, match="'default' is the active adapter: set_adapter another one first"):
        fastprefix.delete_adapter(model, "default")
    fastprefix.delete_adapter(model, "b")
    assert fastprefix.list_adapters(model) == ["default"] and not hasattr(model, "fastprefix_adapters")
    assert not any(k.startswith("fastprefix_adapters") for k in model.state_dict())
    fastprefix.add_adapter(model, OTHER["ptv2"](), "c")
    fastprefix.set_adapter(model, "c")
    fastprefix.remove(model)  # every adapter goes
    assert not any(n.startswith("fastprefix") for n, _ in model.named_parameters())


def test_a_deep_copy_switches_on_its_own():
    model, alone = _two_adapters("bert", "pt")
    twin = copy.deepcopy(model)
    fastprefix.set_adapter(twin, "b")
    assert fastprefix.active_adapter(model) == "default" and fastprefix.active_adapter(twin) == "b"
    assert torch.equal(_out(twin, "bert"), _out(alone, "bert"))
    assert twin.fastprefix is not model.fastprefix_adapters["b"]


@pytest.mark.parametrize("method", ["pt", "dept", "adept"])
def test_prompt_embeds_by_name(method):
    """An adapter's prompt embeddings, read without switching the active adapter (so engines may ask for several
    adapters side by side): the active one stays, and is never "b" meanwhile."""
    model, alone = _two_adapters("llama", method)
    ids, mask = batch([5, 3])
    seen = []
    real = fastprefix.integrations.state.State.embed

    def spy(state, *args, **kwargs):
        seen.append(state.active)
        return real(state, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastprefix.integrations.state.State, "embed", spy)
        got = fastprefix.prompt_embeds(model, ids, mask, adapter_name="b")
    want = fastprefix.prompt_embeds(alone, ids, mask)
    assert seen == ["default"] and fastprefix.active_adapter(model) == "default"
    assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))
    with pytest.raises(ValueError, match=r"no adapter named 'zz' on this model; its adapters are \['default', 'b'\]"):
        fastprefix.prompt_embeds(model, ids, mask, adapter_name="zz")


def test_to_peft_by_name(tmp_path):
    model, alone = _two_adapters("llama", "pt")
    fastprefix.to_peft(model, tmp_path / "named", adapter_name="b")
    fastprefix.to_peft(alone, tmp_path / "alone")
    got, want = (safetensors.torch.load_file(tmp_path / d / peft_io.WEIGHTS_NAME) for d in ("named", "alone"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_errors_name_what_is_wrong(tmp_path):
    model, _ = _two_adapters("bert", "ptv2")
    with pytest.raises(ValueError, match=r"no adapter named 'zz' on this model; its adapters are \['default', 'b'\]"):
        fastprefix.set_adapter(model, "zz")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        fastprefix.save_adapter(model, tmp_path / "x", adapter_name="zz")
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        fastprefix.add_adapter(model, OTHER["ptv2"](), "__base__")
    with pytest.raises(ValueError, match="without '.'"):
        fastprefix.add_adapter(model, OTHER["ptv2"](), "a.b")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        fastprefix.add_adapter(model, OTHER["ptv2"](), "b")
    with pytest.raises(ValueError, match=r"one method per model: this model's adapters are PTuningV2Config \('p_tuning_v2'\), "
                                         r"not APTConfig \('apt'\)"):
        fastprefix.add_adapter(model, METHODS["apt"](), "c")
    with pytest.raises(ValueError, match="prefix_positions='none', the new one 'shift'"):
        fastprefix.add_adapter(model, fastprefix.PTuningV2Config(num_virtual_tokens=3, prefix_positions="shift"), "c")
    assert fastprefix.list_adapters(model) == ["default", "b"]

    # a second adapter may not bring base submodules: the model's are shared by every adapter on it
    head = fastprefix.apply(tiny("bert", head="seq"), METHODS["ptv2"](), trainable=("classifier",))
    fastprefix.save_adapter(head, tmp_path / "head")
    other = fastprefix.apply(tiny("bert", head="seq"), METHODS["ptv2"]())
    with pytest.raises(ValueError, match=r"keeps base submodules \['classifier'\] trainable: .* load it into a model "
                                         "of its own"):
        fastprefix.load_adapter(other, tmp_path / "head", adapter_name="second")
    assert fastprefix.list_adapters(other) == ["default"]
    # an existing name with another config: the message offers a new name
    fastprefix.save_adapter(model, tmp_path / "b", adapter_name="b")
    with pytest.raises(ValueError, match="load it under a new adapter_name to add it"):
        fastprefix.load_adapter(model, tmp_path / "b", adapter_name="default")


def test_a_merged_adept_adapter_stays_active_until_unmerged():
    model, _ = _two_adapters("llama", "adept")
    fastprefix.merge(model)
    with pytest.raises(ValueError, match="merged .* call fastprefix.unmerge"):
        fastprefix.set_adapter(model, "b")
    fastprefix.unmerge(model)
    fastprefix.set_adapter(model, "b")
