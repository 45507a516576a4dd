"""Configs and modules: validation, JSON round trips, reference inits, parameter budgets."""

import json
import math

import pytest
import torch

import fastprefix
from fastprefix import (ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config)

ALL_CONFIGS = [PromptTuningConfig(num_virtual_tokens=4), PTuningV2Config(num_virtual_tokens=3, prefix_projection=True),
               APTConfig(num_virtual_tokens=2, gate="pooled"), DePTConfig(rank=4, max_length=16),
               ADePTConfig(rank=3, dropout=0.0)]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.method)
def test_config_json_round_trip(config):
    text = config.to_json()
    assert json.loads(text)["method"] == config.method
    assert fastprefix.config_from_json(text) == config


BAD_CONFIGS = {
    "zero-tokens": (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    "float-tokens": (lambda: PTuningV2Config(num_virtual_tokens=2.5), "num_virtual_tokens"),
    "bad-gate": (lambda: APTConfig(gate="layer"), "gate must be one of"),
    "dropout-1": (lambda: ADePTConfig(dropout=1.0), "dropout"),
    "zero-rank": (lambda: DePTConfig(rank=0), "rank"),
    "bad-init": (lambda: ADePTConfig(prompt_init="zeros"), "prompt_init"),
    "nan-lambda": (lambda: APTConfig(layer_scale_init=float("nan")), "layer_scale_init"),
}


@pytest.mark.parametrize("make,match", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_from_dict_rejects_unknown_method_and_fields():
    with pytest.raises(ValueError, match="unknown method"):
        fastprefix.config_from_dict({"method": "lora"})
    with pytest.raises(ValueError, match="unknown ADePTConfig fields"):
        fastprefix.config_from_dict({"method": "adept", "rnak": 4})


def test_dept_scaling_is_reference_default():
    assert DePTConfig(rank=16).scaling == pytest.approx(8 / math.sqrt(16))


def _ids_and_table(V=20, d=12, B=2, S=5):
    return torch.randint(0, V, (B, S)), torch.randn(V, d)


@pytest.mark.parametrize("module_cls,config", [
    (fastprefix.DecomposedPrompt, DePTConfig(num_virtual_tokens=3, rank=4, max_length=8)),
    (fastprefix.AdaptiveDecomposedPrompt, ADePTConfig(num_virtual_tokens=3, rank=4)),
], ids=["dept", "adept"])
def test_decomposed_prompts_start_as_identity_offset(module_cls, config):
    ids, table = _ids_and_table()
    module = module_cls(config, 12).train()
    out = module(ids, table)
    assert out.shape == (2, 3 + 5, 12)
    torch.testing.assert_close(out[:, 3:], table[ids], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :3], module.prompt.detach().expand(2, 3, 12), rtol=0, atol=0)


def test_adept_init_and_budget():
    d, m, r = 768, 60, 19
    module = fastprefix.AdaptiveDecomposedPrompt(ADePTConfig(num_virtual_tokens=m, rank=r), d)
    assert sum(p.numel() for p in module.parameters()) == m * d + 2 * r * d + r + d == 76051
    assert module.down_weight.shape == (d, r)
    # nn.Linear(d, r)'s kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(d)
    assert module.down_weight.abs().max() <= 1 / math.sqrt(d)
    assert module.down_weight.abs().max() > 0.9 / math.sqrt(d)
    assert not module.up_weight.any() and not module.up_bias.any() and not module.down_bias.any()


def test_dept_init():
    module = fastprefix.DecomposedPrompt(DePTConfig(num_virtual_tokens=4, rank=8, max_length=300), 16)
    assert module.lora_a.shape == (300, 8) and module.lora_b.shape == (8, 16)
    assert module.lora_a.abs().max() <= 1 / math.sqrt(8) and not module.lora_b.any()


def test_prompt_tuning_and_vocab_init():
    ids, table = _ids_and_table()
    module = fastprefix.PromptTuning(PromptTuningConfig(num_virtual_tokens=4), 12)
    module.init_prompt_from_vocab(table, generator=torch.Generator().manual_seed(0))
    rows = [(table == p).all(-1).nonzero().numel() > 0 for p in module.prompt.detach()]
    assert all(rows)
    out = module(ids, table)
    torch.testing.assert_close(out, torch.cat([module.prompt.detach().expand(2, 4, 12), table[ids]], 1))


def test_adept_dropout_only_in_training():
    ids, table = _ids_and_table()
    module = fastprefix.AdaptiveDecomposedPrompt(ADePTConfig(num_virtual_tokens=2, rank=6, dropout=0.5), 12)
    torch.nn.init.normal_(module.up_weight)
    module.eval()
    assert torch.equal(module(ids, table), module(ids, table))
    module.train()
    assert not torch.equal(module(ids, table), module(ids, table))


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_ptuning_v2_prefix_layout(projection):
    N, Hkv, L, D, d = 3, 2, 4, 8, 16
    module = fastprefix.PTuningV2Prefix(PTuningV2Config(num_virtual_tokens=L, prefix_projection=projection,
                                                        projection_hidden=10), N, Hkv, D, d)
    prefixes = module()
    assert prefixes.shape == (2 * N, Hkv, L, D)
    flat = module.embedding if not projection else module.projection(module.embedding)
    # reference slot order: layer i's key is slot 2i, its value slot 2i + 1, of the 2N axis
    k1, v1 = module.layer(prefixes, 1)
    torch.testing.assert_close(k1, flat.view(L, 2 * N, Hkv, D)[:, 2].transpose(0, 1))
    torch.testing.assert_close(v1, flat.view(L, 2 * N, Hkv, D)[:, 3].transpose(0, 1))


@pytest.mark.parametrize("gate", ["token", "pooled"])
def test_adaptive_prefix_gate(gate):
    N, Hkv, L, D, d = 2, 2, 3, 4, 10
    module = fastprefix.AdaptivePrefix(APTConfig(num_virtual_tokens=L, gate=gate, layer_scale_init=0.5), N, Hkv, D, d)
    assert module.gate_weight.shape == (N, d, L) and not module.gate_bias.any()
    assert torch.equal(module.layer_scale, torch.full((N,), 0.5))
    hidden, kpm = torch.randn(2, 5, d), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    kw = module.gate_kwargs(1, hidden, kpm)
    q = torch.randn(2, 4, 5, D)
    k = v = torch.randn(2, Hkv, 5, D)
    pk, pv = module.layer(module(), 1)
    out = fastprefix.gated_prefix_attention(q, k, v, pk, pv, **kw, key_padding_mask=kpm)
    want_gate = fastprefix.apt_gate(hidden, module.gate_weight[1], module.gate_bias[1], module.layer_scale[1],
                                    mode=gate, key_padding_mask=kpm)
    want = fastprefix.gated_prefix_attention(q, k, v, pk, pv, gate=want_gate, key_padding_mask=kpm)
    torch.testing.assert_close(out, want)


def test_module_rejects_wrong_config():
    with pytest.raises(ValueError, match="expected a ADePTConfig"):
        fastprefix.AdaptiveDecomposedPrompt(DePTConfig(), 8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastprefix.PTuningV2Prefix(PTuningV2Config(), 2, 0, 8, 16)
