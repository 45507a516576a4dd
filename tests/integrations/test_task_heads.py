"""Task heads are trainable by default (issue 25): a fresh classifier/score/qa_outputs head is not frozen at random,
as PEFT's task types keep it (`modules_to_save`); `trainable=()` opts out, a string is one name, the head is saved
and loaded with the adapter and counted by `print_trainable_parameters`."""

import contextlib
import io

import pytest
import torch
import transformers as tf

import fastprefix
from helpers.models import VOCAB

BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40, vocab_size=VOCAB)
LLAMA = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
             vocab_size=VOCAB, pad_token_id=0)
MODELS = {
    "bert-seq-cls": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**BERT)), ("classifier",)),
    "bert-token-cls": (lambda: tf.BertForTokenClassification(tf.BertConfig(**BERT)), ("classifier",)),
    "bert-qa": (lambda: tf.BertForQuestionAnswering(tf.BertConfig(**BERT)), ("qa_outputs",)),
    "bert-choice": (lambda: tf.BertForMultipleChoice(tf.BertConfig(**BERT)), ("classifier",)),
    "distilbert-seq-cls": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        dim=32, n_layers=1, n_heads=4, hidden_dim=40, vocab_size=VOCAB)), ("pre_classifier", "classifier")),
    "deberta-seq-cls": (lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**BERT)),
                        ("pooler", "classifier")),
    "llama-seq-cls": (lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(**LLAMA)), ("score",)),
    "bert-base": (lambda: tf.BertModel(tf.BertConfig(**BERT)), ()),
    "llama-lm": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)), ()),  # its lm_head is pretrained (tied)
}
CONFIGS = {"apt": lambda: fastprefix.APTConfig(num_virtual_tokens=3),
           "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3)}


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_the_task_head_is_trainable_by_default(name, method):
    make, heads = MODELS[name]
    model = fastprefix.apply(make(), CONFIGS[method]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.split(".")[0] in heads + ("fastprefix",)}
    assert trainable == expected
    assert model._fastprefix_state.trainable == heads


def test_trainable_empty_opts_out_and_a_string_is_one_name():
    make, _ = MODELS["bert-seq-cls"]
    frozen = fastprefix.apply(make(), CONFIGS["apt"](), trainable=())
    assert {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad} == {"fastprefix"}
    one = fastprefix.apply(make(), CONFIGS["apt"](), trainable="classifier")
    assert one._fastprefix_state.trainable == ("classifier",)
    with pytest.raises(ValueError, match="does not have: 'classifer'"):
        fastprefix.apply(make(), CONFIGS["apt"](), trainable="classifer")


def test_the_head_is_saved_loaded_and_counted(tmp_path):
    make, _ = MODELS["bert-seq-cls"]
    torch.manual_seed(0)
    model = fastprefix.apply(make(), CONFIGS["apt"]())
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # "trained"
    fastprefix.save_adapter(model, tmp_path / "a")
    torch.manual_seed(1)
    loaded = fastprefix.load_adapter(make(), tmp_path / "a")
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fastprefix.print_trainable_parameters(loaded)
    head = sum(p.numel() for p in loaded.classifier.parameters())
    method = sum(p.numel() for p in loaded.fastprefix.parameters())
    assert out.getvalue().startswith(f"trainable params: {head + method:,d} ||")
