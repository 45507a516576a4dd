"""TRL's SFTTrainer on a tiny random Llama with each method, completion-only loss.

Prefix methods train with ``trl.SFTTrainer`` itself, prompt methods with ``fastprefix.integrations.trl.SFTTrainer``
(a drop-in subclass: the prompt adds m slots in front of the logits, which TRL's logit paths don't expect). Each
run: a few steps on a tiny in-memory prompt/completion dataset with a word-level tokenizer built in the test (no
download), the loss going down, and one batch checked by hand in float64: where the prompt sits in the model's
input, that its m slots carry label -100, and that the loss is the cross-entropy of the real completion tokens.
Padding-free batches (``padding_free=True``, ``packing=True``) give the padded batch's loss; a ``compute_loss_func``
(TRL's path through the full logits) sees the input tokens' logits.
"""

from types import SimpleNamespace

import pytest
import torch
import trl  # a test dependency (setup.py extra "test"), as is datasets, which it brings
from datasets import Dataset

import fastprefix
from fastprefix.integrations.trl import SFTTrainer
from helpers.models import tiny

WORDS = "the a cat dog bird sat ran flew on under over mat rug tree big small red blue".split()
PROMPTS = ["the cat sat on the", "a dog ran under a", "the bird flew over the", "a small cat sat on a"]
COMPLETIONS = [" red mat", " big tree", " blue rug", " small mat"]
METHODS = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=4),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=4, rank=3, max_length=16),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=4, rank=3),
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=4),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=4),
}
PROMPT_METHODS = ("pt", "dept", "adept")
STEPS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: more intra-op threads only wait on each other (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer():
    """A word-level fast tokenizer: <pad> 0, <eos> 1, <unk> 2, then the words (special tokens split out first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(method):
    """The tiny Llama over this tokenizer's vocabulary (<pad> 0, <eos> 1, no <bos>), in training mode."""
    model = tiny("llama", vocab_size=len(WORDS) + 3, bos_token_id=None, eos_token_id=1).train()
    return fastprefix.apply(model, METHODS[method]())


def _trainer(method, tmp_path, steps=STEPS, loss=None, **config):
    """TRL's defaults (gradient checkpointing on) but float64 on CPU, a constant learning rate, no saving;
    ``loss``: a ``compute_loss_func``."""
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.3,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=True, bf16=False, disable_tqdm=True, seed=0, **config)
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    cls = SFTTrainer if method in PROMPT_METHODS else trl.SFTTrainer  # prefix methods: TRL's own trainer
    return cls(model=_model(method), args=args, train_dataset=data, processing_class=_tokenizer(),
               compute_loss_func=loss)


def _seen_inputs(model):
    """The keyword arguments the model's forward body receives (a pre-hook after fastprefix's own)."""
    seen = {}
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


def _check_batch(trainer, batch):
    """Completion-only labels: exactly the completion tokens and <eos> carry their ids, the rest -100."""
    tok = trainer.processing_class
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        prompt_len = next(len(p) for p in prompt_ids if ids[b, :len(p)].tolist() == p)
        assert (labels[b, :prompt_len] == -100).all() and (labels[b, n:] == -100).all()
        assert torch.equal(labels[b, prompt_len:n], ids[b, prompt_len:n]) and ids[b, n - 1] == tok.eos_token_id


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trains_with_completion_only_loss(method, tmp_path):
    trainer = _trainer(method, tmp_path)
    assert trainer.completion_only_loss and trainer.args.gradient_checkpointing
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses

    # one batch by hand, in eval mode (no dropout)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    _check_batch(trainer, batch)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    seen = _seen_inputs(model)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits
    if method in PROMPT_METHODS:
        m = model.fastprefix.num_virtual_tokens
        assert logits.shape[1] == m + ids.shape[1]
        # the prompt sits in front: m slots holding the prompt, label -100, attention 1; then the batch as it was
        assert (seen["labels"][:, :m] == -100).all() and torch.equal(seen["labels"][:, m:], labels)
        assert (seen["attention_mask"][:, :m] == 1).all() and torch.equal(seen["attention_mask"][:, m:], mask)
        prompt = model.fastprefix.prompt.detach().to(seen["inputs_embeds"].dtype)
        assert torch.equal(seen["inputs_embeds"][:, :m], prompt.expand(ids.shape[0], -1, -1))
        logits = logits[:, m:]  # the input tokens' slots
    else:
        assert logits.shape[1] == ids.shape[1] and torch.equal(seen["labels"], labels)
    # slot t predicts token t + 1; token 0 is a prompt token (label -100), so the slot before it is not needed
    assert (labels[:, 0] == -100).all()
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    # the loss TRL trains on (its fused LM head, with its metrics) and the model's own loss on the same batch; both
    # round through float32 (transformers casts the logits with .float(), TRL's head likewise), hence 1e-6: a slot
    # off by one would move the loss by ~1e-1
    with torch.no_grad():
        trained = trainer.compute_loss(model, dict(batch))
    assert abs(trained.item() - want.item()) <= 1e-6 and abs(out.loss.item() - want.item()) <= 1e-6


PACKED = {"padding_free": dict(padding_free=True, max_length=None), "packing": dict(packing=True, max_length=64)}


@pytest.mark.parametrize("method, packing", [(m, "padding_free") for m in METHODS] + [("pt", "packing"),
                                                                                      ("apt", "packing")])
def test_padding_free_batch_equals_padded(method, packing, tmp_path):
    """TRL's padding-free batches (the sequences in one row, positions restarting, no attention mask; also what
    ``packing=True`` makes, best-fit packing into rows of ``max_length``): each packed sequence gets the prefix, or
    its own prompt, as if alone, so TRL's loss is the padded batch's."""
    padded, packed = _trainer(method, tmp_path), _trainer(method, tmp_path, **PACKED[packing])
    rows, row = next(iter(padded.get_train_dataloader())), next(iter(packed.get_train_dataloader()))
    assert "attention_mask" not in row and row["input_ids"].shape[0] == 1
    assert row["input_ids"].shape[1] == int(rows["attention_mask"].sum())  # the same 4 sequences, unpadded
    with torch.no_grad():
        want = padded.compute_loss(padded.model.eval(), dict(rows))
        got = packed.compute_loss(packed.model.eval(), dict(row))
    assert abs(got.item() - want.item()) <= 1e-6  # TRL's head rounds through float32


def _next_token_loss(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func``: the mean next-token cross-entropy of the full logits against TRL's labels."""
    logits = outputs.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_logit_paths_see_the_input_tokens(method, tmp_path):
    """A ``compute_loss_func`` takes TRL's path through the full logits: it gets the S input tokens' logits,
    aligned with TRL's labels, padded or padding-free (and trains)."""
    trainer = _trainer(method, tmp_path, steps=1, loss=_next_token_loss)
    trainer.train()
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    m = model.fastprefix.num_virtual_tokens
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, m:]
        want = _next_token_loss(SimpleNamespace(logits=logits), batch["labels"])
        assert abs(trainer.compute_loss(model, dict(batch)).item() - want.item()) <= 1e-12  # float64 throughout
        # evaluation hands compute_metrics the logits with TRL's labels: the input tokens' logits
        _, eval_logits, eval_labels = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
        assert torch.equal(eval_logits, logits) and torch.equal(eval_labels, batch["labels"])
        packed = _trainer(method, tmp_path, loss=_next_token_loss, padding_free=True, max_length=None)
        packed.model.load_state_dict(model.state_dict())
        row = next(iter(packed.get_train_dataloader()))  # each sequence's first label is -100: no cross-talk
        assert abs(packed.compute_loss(packed.model.eval(), dict(row)).item() - want.item()) <= 1e-12
