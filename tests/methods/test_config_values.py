"""Configs are values: frozen after construction, every number finite, changed copies validated again."""

import dataclasses
import json

import pytest
import torch

import fastprefix
from fastprefix.adapters import CONFIG_NAME
from fastprefix.config import CONFIGS
from fastprefix.integrations import transformers as integration
from helpers.models import batch, perturb, run, tiny

FLOAT_FIELDS = [(cls, f.name) for cls in CONFIGS.values() for f in dataclasses.fields(cls)
                if isinstance(getattr(cls(), f.name), float)]


def test_every_float_field_is_covered():
    names = {(cls.__name__, name) for cls, name in FLOAT_FIELDS}
    assert names >= {("PTuningV2Config", "prefix_dropout"), ("APTConfig", "layer_scale_init"),
                     ("APTConfig", "gate_init_std"), ("DePTConfig", "lora_alpha"), ("ADePTConfig", "dropout")}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls, name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
def test_non_finite_numbers_are_refused(cls, name, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{name} must be"):
        cls(**{name: value})


@pytest.mark.parametrize("kw, match", [
    (dict(lora_alpha=0), "lora_alpha must be a finite number > 0, got 0"),  # a zero offset that never trains
    (dict(lora_alpha=-2.0), "lora_alpha must be a finite number > 0"),
    (dict(lora_alpha=True), "lora_alpha must be a finite number > 0, got True"),
    (dict(lora_alpha="8"), "lora_alpha must be a finite number > 0"),
], ids=["zero", "negative", "bool", "string"])
def test_dept_lora_alpha_must_be_a_positive_number(kw, match):
    with pytest.raises(ValueError, match=match):
        fastprefix.DePTConfig(**kw)


@pytest.mark.parametrize("cls, kw", [(fastprefix.APTConfig, dict(gate_init_std=True)),
                                     (fastprefix.APTConfig, dict(layer_scale_init=False)),
                                     (fastprefix.ADePTConfig, dict(dropout=True))],
                         ids=["gate_init_std", "layer_scale_init", "dropout"])
def test_bools_are_not_numbers(cls, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        cls(**kw)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_configs_are_frozen_and_replace_validates(method):
    config = CONFIGS[method]()
    name = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError, match=f"dataclasses.replace\\(config, {name}=...\\)"):
        setattr(config, name, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(config, name)
    assert config == CONFIGS[method]() and hash(config) == hash(CONFIGS[method]())
    changed = dataclasses.replace(config, num_virtual_tokens=7)
    assert changed.num_virtual_tokens == 7 and config.num_virtual_tokens != 7
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        dataclasses.replace(config, num_virtual_tokens=0)


def test_mutating_the_config_after_apply_cannot_reach_the_model_or_its_adapter(tmp_path):
    config = fastprefix.APTConfig(num_virtual_tokens=5)
    model = perturb(fastprefix.apply(tiny("bert"), config))
    ids, mask = batch([6, 3])
    with torch.no_grad():
        want = run(model, "bert", ids, mask)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gate = "pooled"  # before configs were values, this switched the live model's gate
    with torch.no_grad():
        assert torch.equal(run(model, "bert", ids, mask), want)
    assert integration.state_of(model).config.gate == "token" and model.fastprefix.config.gate == "token"
    fastprefix.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["gate"] == "token"
