"""A new user's mistakes get errors that say what to do (issue 25): config fields, what `apply` is given, adapter
folders of the other kind, the attention's tensor layout, heads that refuse prompt inputs, Gemma 3's bidirectional
variant, and a checkpointed backward that crosses a `fastprefix.disabled` block."""

import json

import peft
import pytest
import torch

import fastprefix
from helpers.models import VOCAB, tiny


def _bert():
    """A one-layer float32 ``BertModel`` (with BertConfig's own position table: the weights a bare build draws)."""
    return tiny("bert", dtype=torch.float32, num_hidden_layers=1, max_position_embeddings=512)


@pytest.mark.parametrize("cls,kwargs,closest", [
    (fastprefix.APTConfig, dict(num_tokens=8), "num_virtual_tokens"),
    (fastprefix.DePTConfig, dict(r=4), "rank"),
    (fastprefix.PTuningV2Config, dict(prefix_dropuot=0.1), "prefix_dropout"),
], ids=["num_tokens", "r", "typo"])
def test_a_misspelt_field_names_the_fields_and_the_closest(cls, kwargs, closest):
    with pytest.raises(ValueError, match=f"did you mean {closest!r}.*its fields are .*{closest}"):
        cls(**kwargs)
    with pytest.raises(TypeError):  # still the TypeError any unknown keyword argument is
        cls(**kwargs)
    with pytest.raises(ValueError, match=f"did you mean {closest!r}"):
        fastprefix.config_from_dict({"method": cls.method, **kwargs})


def test_task_type_says_the_head_is_found_from_the_model():
    with pytest.raises(ValueError, match="task_type.*task head from the model"):
        fastprefix.PromptTuningConfig(task_type="SEQ_CLS")


@pytest.mark.parametrize("config,says", [
    (fastprefix.APTConfig, r"instantiate it, e\.g\. fastprefix\.APTConfig\("),
    ({"method": "apt", "num_virtual_tokens": 4}, r"fastprefix\.config_from_dict"),
    (peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION"), r"fastprefix\.from_peft"),
], ids=["class", "dict", "peft-config"])
def test_apply_says_what_to_pass_instead(config, says):
    model = _bert()
    with pytest.raises(ValueError, match=says):
        fastprefix.apply(model, config)
    assert not hasattr(model, "fastprefix")


def _bert_adapter(tmp_path):
    model = fastprefix.apply(_bert(), fastprefix.PTuningV2Config(num_virtual_tokens=3))
    return fastprefix.save_adapter(model, tmp_path / "fp")


def test_from_peft_on_a_fastprefix_folder_points_at_load_adapter(tmp_path):
    folder = _bert_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"fastprefix adapter, not a PEFT one: .*fastprefix\.load_adapter"):
        fastprefix.from_peft(_bert(), folder)


def test_load_adapter_on_a_peft_folder_points_at_from_peft(tmp_path):
    model = peft.get_peft_model(_bert(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION"))
    model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    with pytest.raises(ValueError, match=r"PEFT adapter \(PREFIX_TUNING\), not a fastprefix one: .*from_peft"):
        fastprefix.load_adapter(_bert(), tmp_path / "peft")


def test_save_adapter_onto_an_existing_file_says_so(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"not a folder")
    model = fastprefix.apply(_bert(), fastprefix.PTuningV2Config(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        fastprefix.save_adapter(model, target)
    assert target.read_bytes() == b"not a folder"


@pytest.mark.parametrize("H,Hkv", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_bshd_layout_is_named_as_a_layout_problem(H, Hkv):
    B, S, D, L = 2, 7, 16, 3
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D)  # transformers' layout before its transpose
    prefix = torch.randn(Hkv, L, D)
    with pytest.raises(ValueError, match=r"look like \[B, S, H, D\].*q\.transpose\(1, 2\)"):
        fastprefix.gated_prefix_attention(q, k, k, prefix, prefix)


@pytest.mark.parametrize("make", [
    lambda: tiny("t5", head="seq", dtype=torch.float32),
    lambda: tiny("t5", head="qa", dtype=torch.float32),
    lambda: tiny("bart", head="seq", dtype=torch.float32),
], ids=["t5-seq-cls", "t5-qa", "bart-seq-cls"])
def test_heads_that_refuse_inputs_embeds_are_refused_at_apply(make):
    model = make()
    name = type(model).__name__
    with pytest.raises(ValueError, match=f"prompt methods .* inputs_embeds, and {name} "):
        fastprefix.apply(model, fastprefix.PromptTuningConfig(num_virtual_tokens=3))
    assert not hasattr(model, "fastprefix")


def test_gemma3_bidirectional_is_refused_at_apply():
    model = tiny("gemma3", dtype=torch.float32, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        fastprefix.apply(model, fastprefix.APTConfig(num_virtual_tokens=3))
    assert not hasattr(model, "fastprefix")


@pytest.mark.parametrize("forward_disabled", [True, False], ids=["forward-inside", "backward-inside"])
def test_a_checkpointed_backward_across_a_disabled_block_names_both(forward_disabled):
    model = tiny("llama", dtype=torch.float32)  # the generator where a bare build leaves it: the same init and ids
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fastprefix.apply(model, fastprefix.PTuningV2Config(num_virtual_tokens=3)).train()
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(RuntimeError, match=r"fastprefix\.disabled.*gradient checkpointing"):
        if forward_disabled:
            with fastprefix.disabled(model):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            with fastprefix.disabled(model):
                loss.backward()
