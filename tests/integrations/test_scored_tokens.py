"""The same tokens scored, however the batch is built (issue 25): the prompt adds no scored target, so a
language model's loss scores exactly the tokens the base model scores, on a padded batch and on the same sequences
packed padding-free (positions restarting per sequence, every sequence's first label -100 as
`DataCollatorWithFlattening` makes it), for every method; and `loss * count` over the scored tokens is the
per-token loss sum the Trainer's `num_items_in_batch` (labels[..., 1:] != -100) expects."""

import pytest
import torch

import fastprefix
from helpers.models import prepared, tiny

VOCAB, PAD = 61, 0
LENGTHS = (5, 3, 4)
METHODS = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=16),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=4),
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=4),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=4),
}


def _model(method):
    # the tiny Llama over this vocabulary, with LlamaConfig's own position table
    return prepared(tiny("llama", vocab_size=VOCAB, max_position_embeddings=2048), METHODS[method](), seed=None,
                    double=False)


def _sequences():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in LENGTHS]


def _padded(seqs):
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), PAD)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _packed(seqs):
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])
    labels[0, starts] = -100  # DataCollatorWithFlattening's separator: no sequence scores its first token
    return dict(input_ids=ids, position_ids=positions, labels=labels)


def _scored(labels):
    """What the Trainer counts for a causal LM (num_items_in_batch): labels[..., 1:] != -100."""
    return int((labels[..., 1:] != -100).sum())


@pytest.mark.parametrize("method", METHODS)
def test_padded_and_padding_free_batches_score_the_same_tokens(method):
    model = _model(method)
    seqs = _sequences()
    padded, packed = _padded(seqs), _packed(seqs)
    assert _scored(padded["labels"]) == _scored(packed["labels"]) == sum(n - 1 for n in LENGTHS)
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
        with fastprefix.disabled(model):  # the base model alone, on the padded batch
            loss_base = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss_padded, loss_packed, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(loss_base)


@pytest.mark.parametrize("method", ["pt", "dept", "adept"])
def test_a_prompt_adds_no_scored_target(method):
    """The loss of a prompted padded batch is the mean over the base model's scored tokens of the prompted model's
    per-token losses: recomputed here from the logits, the first real token of each row left out."""
    model = _model(method)
    batch = _padded(_sequences())
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    m = METHODS[method]().num_virtual_tokens
    logits = out.logits[:, m:].float()  # the input tokens' slots (transformers' loss upcasts to float32)
    losses = []
    for b, n in enumerate(LENGTHS):
        # slot t of the input predicts token t + 1; the last prompt slot (predicting token 0) is not scored
        losses.append(torch.nn.functional.cross_entropy(logits[b, :n - 1], batch["input_ids"][b, 1:n],
                                                        reduction="sum"))
    torch.testing.assert_close(out.loss, torch.stack(losses).sum() / sum(n - 1 for n in LENGTHS), rtol=1e-6,
                               atol=1e-6)
