"""Task heads are trainable by default (issue 25): a fresh classifier/score/qa_outputs head is not frozen at random,
as PEFT's task types keep it (`modules_to_save`); `trainable=()` opts out, a string is one name, the head is saved
and loaded with the adapter and counted by `print_trainable_parameters`."""

import contextlib
import io

import pytest
import torch

import fastprefix
from helpers.models import tiny

# one layer, float32, the configs' own position tables (and DeBERTa without relative attention)
BERT = dict(num_hidden_layers=1, max_position_embeddings=512)
LLAMA = dict(num_hidden_layers=1, max_position_embeddings=2048, eos_token_id=2)
MODELS = {  # name -> (the tiny family, its head, config overrides, the task heads)
    "bert-seq-cls": ("bert", "seq", BERT, ("classifier",)),
    "bert-token-cls": ("bert", "tok", BERT, ("classifier",)),
    "bert-qa": ("bert", "qa", BERT, ("qa_outputs",)),
    "bert-choice": ("bert", "mc", BERT, ("classifier",)),
    "distilbert-seq-cls": ("distilbert", "seq", dict(n_layers=1, max_position_embeddings=512),
                           ("pre_classifier", "classifier")),
    "deberta-seq-cls": ("deberta-v2", "seq", dict(BERT, relative_attention=False), ("pooler", "classifier")),
    "llama-seq-cls": ("llama", "seq", LLAMA, ("score",)),
    "bert-base": ("bert", "base", BERT, ()),
    "llama-lm": ("llama", "lm", LLAMA, ()),  # its lm_head is pretrained (tied)
}


def _model(name, seed=0):
    """``(a fresh float32 model, its task heads)``."""
    family, head, overrides, heads = MODELS[name]
    return tiny(family, head=head, dtype=torch.float32, seed=seed, **overrides), heads


CONFIGS = {"apt": lambda: fastprefix.APTConfig(num_virtual_tokens=3),
           "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3)}


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_the_task_head_is_trainable_by_default(name, method):
    model, heads = _model(name)
    model = fastprefix.apply(model, CONFIGS[method]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.split(".")[0] in heads + ("fastprefix",)}
    assert trainable == expected
    assert model._fastprefix_state.trainable == heads


def test_trainable_empty_opts_out_and_a_string_is_one_name():
    frozen = fastprefix.apply(_model("bert-seq-cls")[0], CONFIGS["apt"](), trainable=())
    assert {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad} == {"fastprefix"}
    one = fastprefix.apply(_model("bert-seq-cls")[0], CONFIGS["apt"](), trainable="classifier")
    assert one._fastprefix_state.trainable == ("classifier",)
    with pytest.raises(ValueError, match="does not have: 'classifer'"):
        fastprefix.apply(_model("bert-seq-cls")[0], CONFIGS["apt"](), trainable="classifer")


def test_the_head_is_saved_loaded_and_counted(tmp_path):
    model = fastprefix.apply(_model("bert-seq-cls")[0], CONFIGS["apt"]())
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # "trained"
    fastprefix.save_adapter(model, tmp_path / "a")
    loaded = fastprefix.load_adapter(_model("bert-seq-cls", seed=1)[0], tmp_path / "a")  # another random head
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fastprefix.print_trainable_parameters(loaded)
    head = sum(p.numel() for p in loaded.classifier.parameters())
    method = sum(p.numel() for p in loaded.fastprefix.parameters())
    assert out.getvalue().startswith(f"trainable params: {head + method:,d} ||")
