"""``prefix_positions="shift"``: give the real tokens the positions they get when the prefix sits in the KV cache.

PEFT's prefix tuning (and the original P-Tuning v2 code) hands the model its prefix as ``L`` cached tokens, so
the model numbers the real tokens after them: ``L .. L+S-1`` where fastprefix's default (``"none"``) keeps
``0 .. S-1``. On a model with absolute position embeddings (BERT, RoBERTa, GPT-2) or rotary ones (Llama, Qwen2,
...) that changes the outputs. ``"shift"`` reproduces the cached numbering exactly, per call, from what the
model would compute with ``L`` more cached tokens:

- ``position_ids`` given by the caller (``generate`` makes them from the attention mask): ``+ L`` (PEFT adds
  ``L`` to them too);
- none given, a pad-aware embedding (RoBERTa, XLM-R, ...: pads get ``padding_idx``, real tokens count from
  ``padding_idx + 1``): the real tokens count on after ``past + L``; from ``inputs_embeds`` such a model numbers
  every slot from ``padding_idx + 1`` whatever its cache holds, so nothing changes (as under PEFT);
- none given, otherwise (BERT, GPT-2, rotary decoders): ``past + L .. past + L + S - 1`` (``past``: the tokens
  in fastprefix's KV cache, which never holds the prefix).

Models without ``position_ids`` or with relative positions (T5, DeBERTa: no position to shift) are refused at
``apply``; an input whose shifted positions run past an absolute position table is a ValueError at the
forward naming ``S``, ``L`` and the limit.
"""

from __future__ import annotations

import inspect

import torch

from .context import bind, cache_length
from .embedding import input_embedding
from .inputs import Rules


def refusal(model):
    """Why ``prefix_positions="shift"`` cannot be applied to ``model`` (a sentence), or None if it can."""
    name = type(model).__name__
    cfg = model.config
    base = model.base_model
    kind = getattr(cfg, "position_embedding_type", None)
    model_type = str(getattr(cfg, "model_type", ""))
    if model_type.startswith(("t5", "mt5", "umt5", "longt5", "deberta")):
        return (f"its positions are relative attention biases (model_type {model_type!r}), which a cached prefix "
                "does not move: there is no offset to shift")
    if getattr(cfg, "is_encoder_decoder", False):
        return "the shift is implemented for encoder-only and decoder-only models, not encoder-decoders"
    if kind not in (None, "absolute"):
        return (f"{name} uses {kind!r} position embeddings (config.position_embedding_type): relative positions "
                "have no offset to shift")
    if getattr(cfg, "relative_attention", False) or getattr(cfg, "position_biased_input", True) is False:
        return f"{name} uses relative attention positions (config.relative_attention): there is no offset to shift"
    if getattr(cfg, "alibi", False) or getattr(getattr(cfg, "attn_config", None), "alibi", False):
        return f"{name} uses ALiBi position biases: there is no offset to shift"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return (f"{type(base).__name__}.forward takes no position_ids, so fastprefix cannot give the real tokens the "
                "shifted positions")
    return None


class Shift:
    """Per-call position ids for ``prefix_positions="shift"`` on one model (rules read once, at ``apply``).

    pad: the ``padding_idx`` of a pad-aware position embedding (RoBERTa), else None. rows: the rows of an
    absolute position table (BERT's ``position_embeddings``, GPT-2's ``wpe``), else None (rotary: no table).
    """

    def __init__(self, model, num_virtual_tokens):
        why = refusal(model)
        if why is not None:
            raise ValueError(f"prefix_positions='shift' is not supported on {type(model).__name__}: {why}; use "
                             "prefix_positions='none'")
        self.L = num_virtual_tokens
        self.model_name = type(model).__name__
        try:
            rules = Rules(model, input_embedding(model))
        except ValueError:  # no nn.Embedding input table: no position table to find either
            rules = None
        self.pad = None if rules is None else rules.pad_positions
        self.rows = None if rules is None else rules.position_rows

    def __call__(self, base, args, kwargs):
        """The base model's call arguments (all as keywords) with the shifted ``position_ids``."""
        kw = bind(base, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return kw
        B, S = x.shape[0], x.shape[1]
        past = cache_length(kw.get("past_key_values"), who="prefix_positions='shift' needs")
        given = kw.get("position_ids")
        if given is not None:
            pos = given + self.L
        elif self.pad is not None:
            if ids is None:
                return kw  # numbered from padding_idx + 1 whatever the cache holds: also with the prefix cached
            real = (ids != self.pad).long()
            pos = (real.cumsum(1) + past + self.L) * real + self.pad
        else:
            pos = torch.arange(past + self.L, past + self.L + S, device=x.device).expand(B, S)
        self._check(pos, S, past)
        kw["position_ids"] = pos
        return kw

    def _check(self, pos, S, past):
        if self.rows is None or pos.numel() == 0:
            return
        largest = int(pos.max())
        if largest >= self.rows:
            first = 0 if self.pad is None else self.pad + 1
            cached = f" after {past} cached tokens" if past else ""
            raise ValueError(
                f"prefix_positions='shift' numbers the real tokens after the L={self.L} prefix tokens: this input of "
                f"S={S} tokens{cached} reaches position id {largest}, but {self.model_name}'s position table has "
                f"{self.rows} rows (config.max_position_embeddings), so past + S + L must be at most "
                f"{self.rows - first}: truncate the input to {self.rows - first - self.L - past} tokens")
