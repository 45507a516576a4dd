"""``fastprefix.prompt_embeds``: the engine input of a prompt-method model reproduces the applied model.

An inference engine's prompt-embeddings input (vLLM's ``prompt_embeds``) runs the *base* model on the rows it is
given, numbering positions from 0. Each test feeds the rows to the un-applied base model's ``inputs_embeds`` and
compares with the applied model, in float64, on families with rotary positions (Llama), learned absolute positions
(GPT-2) and an embedding module that scales the tokens by sqrt(d) (Gemma).
"""

import copy

import pytest
import torch

import fastprefix
from helpers.models import METHODS, batch, perturb, tiny

FAMILIES = ("llama", "gpt2", "gemma")
PROMPTS = ("pt", "dept", "adept", "adept-merged")
TOL = 1e-10


def _pair(family, method, dtype=torch.float64):
    """(base, applied): the same weights, the method's parameters moved off their init."""
    base = tiny(family, dropout=0.0).to(dtype)
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # the method's init draws from the global generator: the same module every call
    fastprefix.apply(model, METHODS[method.replace("-merged", "")]())
    perturb(model)
    if method.endswith("-merged"):
        fastprefix.merge(model)
    return base, model


def _padded(lengths, side):
    return batch(lengths, side, seed=3)


def _feeds(model):
    """Record the ``inputs_embeds`` the applied model's forward receives (a pre-hook after fastprefix's)."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("inputs_embeds")),
                                    with_kwargs=True)
    return seen


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_input_gives_applied_logits(family, method, side):
    base, model = _pair(family, method)
    m = model.fastprefix.num_virtual_tokens
    ids, mask = _padded([5, 2, 7], side)
    S = ids.shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers a padded batch
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # [B, m+S, V]
    rows = fastprefix.prompt_embeds(model, ids, mask)
    assert isinstance(rows, list) and len(rows) == ids.shape[0]
    for b, row in enumerate(rows):
        n = int(mask[b].sum())
        assert row.shape == (m + n, base.config.hidden_size) and row.dtype == torch.float64
        assert not row.requires_grad
        real = slice(m, m + n) if side == "right" else slice(m + S - n, m + S)
        expected = torch.cat([want[b, :m], want[b, real]])
        with torch.no_grad():
            got = base(inputs_embeds=row[None]).logits[0]  # the engine: the base model, positions 0..m+n-1
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"row {b}: max |logit error| {err:.3e}"


@pytest.mark.parametrize("method", PROMPTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_rows_are_what_the_model_feeds_its_forward(method, dtype):
    """Unpadded: the rows are bit for bit the ``inputs_embeds`` the applied model computes, in its dtype."""
    _, model = _pair("gemma", method, dtype)
    seen = _feeds(model)
    ids, _ = _padded([6, 6], "right")
    with torch.no_grad():
        model(input_ids=ids)
    rows = fastprefix.prompt_embeds(model, ids)
    assert all(row.dtype == dtype for row in rows)
    assert torch.equal(torch.stack(rows), seen[-1])


def test_engine_input_rebatched_with_padding():
    """The rows re-padded into one batch (as a 🤗 model takes them) give the same logits as one at a time."""
    base, model = _pair("llama", "dept")
    ids, mask = _padded([4, 7, 1], "left")
    rows = fastprefix.prompt_embeds(model, ids, mask)
    L = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), L, rows[0].shape[1], dtype=rows[0].dtype)
    keep = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        embeds[b, :len(row)], keep[b, :len(row)] = row, 1
    with torch.no_grad():
        batched = base(inputs_embeds=embeds, attention_mask=keep).logits
        for b, row in enumerate(rows):
            alone = base(inputs_embeds=row[None]).logits[0]
            assert (batched[b, :len(row)] - alone).abs().max().item() <= TOL


def test_inference_mode_whatever_the_model_mode():
    """ADePT in training mode: no dropout in the rows, and the module's modes are left as they were."""
    _, model = _pair("llama", "adept")
    ids, _ = _padded([5], "right")
    model.eval()
    want = fastprefix.prompt_embeds(model, ids)[0]
    model.train()
    got = fastprefix.prompt_embeds(model, ids)[0]
    assert torch.equal(got, want)
    assert model.fastprefix.training and model.training


@pytest.mark.parametrize("method", ["ptv2", "apt"])
def test_prefix_methods_are_refused(method):
    _, model = _pair("llama", method)
    with pytest.raises(ValueError, match="prefix method.*generate"):
        fastprefix.prompt_embeds(model, torch.tensor([[3, 4, 5]]))


def test_not_applied_is_refused():
    with pytest.raises(ValueError, match="fastprefix is not applied"):
        fastprefix.prompt_embeds(tiny("llama", dropout=0.0), torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("ids, mask, match", [
    (torch.tensor([3, 4, 5]), None, r"input_ids must be an integer tensor of shape \[B, S\], got \[3\]"),
    (torch.tensor([[3.0, 4.0]]), None, r"input_ids must be an integer tensor .* torch.float32"),
    (torch.zeros(1, 0, dtype=torch.long), None, r"S >= 1"),
    (torch.tensor([[3, 4, 5]]), torch.ones(1, 2), r"attention_mask must have input_ids' shape \[1, 3\], got \[1, 2\]"),
    (torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2, 1]]), r"only 0 \(padding\) and 1"),
    (torch.tensor([[3, 4, 5]]), torch.tensor([[1, 0, 1]]), r"rows \[0\] have padding between real tokens"),
    (torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), r"rows \[1\] have no real token"),
], ids=["1d", "float-ids", "empty", "mask-shape", "mask-values", "mask-hole", "mask-empty-row"])
def test_bad_input_is_refused(ids, mask, match):
    _, model = _pair("llama", "pt")
    with pytest.raises(ValueError, match=match):
        fastprefix.prompt_embeds(model, ids, mask)


@pytest.mark.parametrize("method", ["pt", "adept"])
def test_encoder_decoder_rows_are_the_encoder_input(method):
    """T5: the rows are the encoder's ``inputs_embeds``; the base model on them gives the applied model's logits."""
    base, model = _pair("t5", method)
    ids, mask = _padded([4, 6], "right")
    labels = torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        for b, row in enumerate(fastprefix.prompt_embeds(model, ids, mask)):
            got = base(inputs_embeds=row[None], labels=labels[b:b + 1]).logits[0]
            assert (got - want[b]).abs().max().item() <= TOL
