"""Rewrite a model call's keyword arguments for the prompt methods (PT, DePT, ADePT).

The prompt becomes part of the input: ``input_ids [B, S]`` turn into ``inputs_embeds [B, m+S, d]`` at the
top-level forward (as PEFT does, so models that add position embeddings inside their embedding module,
like BERT, position the prompt too), and every per-token input grows by the m prompt slots, so that the
model sees the prompted sequence exactly as it would have built it from ids:

- ``attention_mask``: m ones in front (the prompt is real);
- ``token_type_ids``: m zeros in front (BERT);
- ``position_ids``: the prompt takes positions ``0..m-1`` and the tokens move up by m. When none are
  given and the model numbers positions from ``input_ids`` with padding (RoBERTa, XLM-R, ...: pads get
  ``padding_idx``, real tokens count from ``padding_idx + 1``), the positions it would have computed for
  the prompted ids are passed (with ``inputs_embeds`` it would number every slot, pads included);
- ``labels`` of token-level losses (integer, shaped like ``input_ids``): m ``-100`` in front. The prompt adds
  no scored target: a language model's loss scores each slot on the next token, so the last prompt slot would
  score the first real token, which the model alone never scores (nothing precedes it); its label becomes
  ``-100`` too, and the loss scores exactly the tokens the base model scores, padded or packed. Sequence
  labels ``[B]`` and an encoder-decoder's decoder labels are left alone; ``start_positions`` /
  ``end_positions`` (question answering) index tokens, so they move up by m;
- ``*ForMultipleChoice`` inputs ``[B, C, S]``: the choices are flattened as the model does, each prompted;
- decoder ``*ForSequenceClassification`` pools the last non-pad token, which it finds from ``input_ids``
  (gone): the last real token's hidden state is handed to its head at the last slot (see :func:`pool_hook`).

A prompted input longer than the model's position table is a ValueError naming both lengths.

Decoding with a KV cache: the prompt is embedded once, in the first call (empty cache); later calls
bring only new tokens, and their ``attention_mask`` (which covers the cache) and ``position_ids`` still
count without the prompt, so they get the same extension (a call without a mask keeps the positions the
cache implies). Encoder-decoders (T5): the encoder input gets the prompt; when ``generate`` runs the
encoder on its own, a pre-hook on the encoder does the same, and later calls extend the encoder padding
mask to the encoder output's length.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch
from torch import nn

from .context import cache_length, current
from .masks import sliding_window
from .packing import IGNORE_INDEX, prompt_inputs, prompt_packing
from .state import STATE

_TOKEN_INDEX_ARGS = ("start_positions", "end_positions")  # labels that index tokens (question answering)


class Rules:
    """How a model numbers, bounds and pools its input, read once at ``apply`` from the model's modules.

    pad_positions: the ``padding_idx`` of an embedding that numbers positions from ``input_ids`` (else None).
    position_rows: rows of an absolute position table (``position_embeddings``, GPT-2's ``wpe``), else None.
    pool_last: a decoder ``*ForSequenceClassification`` that pools the last non-pad token of ``input_ids``.
    pad_token_id: the id that rule counts as padding.
    next_token_loss: a decoder language model whose loss scores slot t on label t + 1 (``*ForCausalLM``).
    """

    def __init__(self, model, embedding):
        owner = next((m for m in model.modules() if any(c is embedding for c in m.children())), None)
        table = None
        for name in ("position_embeddings", "wpe"):
            t = getattr(owner, name, None)
            if type(t) is nn.Embedding:
                table = t
        self.position_rows = None if table is None else table.num_embeddings
        pad = getattr(owner, "padding_idx", None)
        numbers_from_ids = owner is not None and (
            hasattr(owner, "create_position_ids_from_input_ids")
            or hasattr(sys.modules.get(type(owner).__module__), "create_position_ids_from_input_ids"))
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.pad_positions = pad if (table is not None and numbers_from_ids and takes_positions
                                     and isinstance(pad, int) and not isinstance(pad, bool)) else None
        self.model_name = type(model).__name__
        self.pool_last = _pools_last_token(model)
        self.next_token_loss = _scores_next_token(model)
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        self.window = sliding_window(model.config)

    def check_length(self, length, m, largest=None):
        """The prompted input must fit the position table: ``length`` slots (prompt and cache included), or
        the ``largest`` position id passed to the model."""
        if self.position_rows is None:
            return
        offset = 0 if self.pad_positions is None else self.pad_positions + 1
        limit = self.position_rows - offset
        if largest is not None:  # the caller's own position ids: only the largest must be in the table
            if largest >= self.position_rows:
                raise ValueError(f"the prompted input reaches position id {largest} ({m} prompt slots in front) but "
                                 f"{self.model_name}'s position table has {self.position_rows} rows "
                                 "(config.max_position_embeddings)")
        elif length > limit:
            raise ValueError(f"an input of {length - m} tokens + {m} prompt tokens needs {length} positions, but "
                             f"{self.model_name} numbers at most {limit} (its position table has {self.position_rows}"
                             f" rows, config.max_position_embeddings): truncate the input to {limit - m} tokens")


def _warn_left_padding_in_window(rules, mask, m):
    """Prompt methods put the prompt in front of the left padding; a sliding window counts the padding
    slots, so once a row is longer than the window its tokens can lose sight of the prompt sooner than
    they would alone. Not silent: say so (right padding is exact)."""
    if getattr(rules, "window", None) is None or mask is None or mask.shape[-1] == 0:  # (older pickles: no window)
        return
    if bool((~mask[:, 0].bool() & mask.bool().any(dim=-1)).any()):
        warnings.warn(
            f"{rules.model_name} attends within a sliding window of {rules.window} slots, and this batch is "
            f"left-padded: the prompt method's {m} prompt slots sit in front of the padding, so once a row is "
            "longer than the window its tokens stop seeing the prompt earlier than the row alone would, and "
            "padded rows no longer equal the rows alone. Pad on the right (tokenizer.padding_side='right') "
            "for exact results", stacklevel=4)


def _pools_last_token(model):
    """A decoder ``*ForSequenceClassification`` (Llama, Qwen2, GPT-2, ...): it pools the last non-pad token."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) or not name.endswith("SequenceClassification"):
        return False
    try:
        return "last_non_pad_token" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


def _scores_next_token(model):
    """A decoder-only language model, whose loss shifts the labels: slot t is scored on the token at t + 1."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    return getattr(model, "loss_type", None) == "ForCausalLM" or \
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def first_token_unscored(labels, first):
    """``labels [N, T]`` (a new tensor, changed in place) with the label at column ``first[i]`` of row i set to
    ``-100`` (rows with ``first[i] < 0`` left alone): the prompt adds no scored target (see the module docstring)."""
    rows, cols = torch.arange(labels.shape[0], device=labels.device), first.clamp_min(0)
    labels[rows, cols] = torch.where(first >= 0, IGNORE_INDEX, labels[rows, cols])  # no host sync
    return labels


def _prepend(x, m, value):
    """``[B, S, ...]`` -> ``[B, m+S, ...]`` with m slots of ``value`` in front."""
    head = torch.full((x.shape[0], m, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([head, x], dim=1)


def _shift_positions(position_ids, m):
    return position_ids + m


def _embed(state, kwargs):
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if ids is None:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("fastprefix prompt methods embed the input themselves: pass input_ids, not inputs_embeds")
        return None
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = state.embed(ids, mask)
    return ids


def encoder_inputs(state, kwargs):
    """An encoder stack called on its own (``generate`` on T5): prompt the input, extend its mask."""
    m = state.num_virtual_tokens
    if kwargs.get("input_ids") is None:  # the top-level hook already embedded the input
        return kwargs
    if _embed(state, kwargs) is not None and kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], m, 1)
    return kwargs


def _pad_aware_positions(ids, m, pad):
    """The position ids a pad-aware embedding computes for ``[prompt ; ids]`` (the prompt slots are real)."""
    real = torch.cat([torch.ones(ids.shape[0], m, dtype=torch.long, device=ids.device), (ids != pad).long()], 1)
    return real.cumsum(1) * real + pad


def _last_real_slot(ids, m, pad_token_id):
    """Where the model's head pools in the prompted sequence: the rightmost slot that is not ``pad_token_id``
    in ``[prompt ; ids]`` (the model's own rule on ``input_ids``, the prompt counted as real)."""
    if pad_token_id is None:
        return None
    S = ids.shape[1]
    real = (ids != pad_token_id).long()
    cols = torch.arange(1, S + 1, device=ids.device)
    return m - 1 + (cols * real).amax(1)  # m - 1 (the last prompt slot) for a row of pads only


def pool_hook(module, args, kwargs, output):
    """Forward hook on a decoder classifier's base model: its last slot becomes the last real token's.

    The head scores every slot and pools slot -1 when it gets no ``input_ids`` (fastprefix passes
    ``inputs_embeds``): handing it the hidden state of the slot it would have pooled keeps right-padded rows
    exact. Acts only inside a prompted top-level call (its context holds the slot, see
    ``hooks.prompt_pre_hook``), once, never on a direct call.
    """
    ctx = current(getattr(module, STATE))
    slot = None if ctx is None else ctx.pooled
    if slot is None:
        return output
    ctx.pooled = None  # the call's own base-model forward takes it
    hidden = output[0]
    if hidden.shape[0] != slot.shape[0]:
        return output
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), slot.to(hidden.device)]
    hidden = torch.cat([hidden[:, :-1], last.unsqueeze(1)], dim=1)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output[next(iter(output.keys()))] = hidden
    return output


def _flat(x, S):
    """``[..., S]`` per-token inputs of a multiple-choice call -> ``[N, S]`` (as the model flattens them)."""
    return None if x is None else x.reshape(-1, S)


def model_inputs(state, kwargs, ctx):
    """The top-level forward's keyword arguments, rewritten for a prompt of m tokens; ``ctx``: the call's
    ForwardContext, which gets the slot a decoder classifier's head pools (``ctx.pooled``)."""
    m = state.num_virtual_tokens
    mask = kwargs.get("attention_mask")
    if state.encoder_decoder:
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:  # the encoder already ran (generate): only its mask may lag behind
            length = encoder_outputs[0].shape[1]
            if mask is not None and mask.shape[1] == length - m:
                kwargs["attention_mask"] = _prepend(mask, m, 1)
            return kwargs
        if _embed(state, kwargs) is not None and mask is not None:
            kwargs["attention_mask"] = _prepend(mask, m, 1)
        return kwargs

    past = cache_length(kwargs.get("past_key_values"))
    if past == 0:
        return _first_call(state, kwargs, m, ctx)
    return _decoding_step(state, kwargs, m, past)


def _first_call(state, kwargs, m, ctx):
    rules = state.inputs
    ids = kwargs.get("input_ids")
    if ids is None:
        _embed(state, kwargs)  # raises for inputs_embeds
        return kwargs
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3):
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be [B, S] (or [B, C, S] for multiple choice), got {shape}")
    packing = prompt_packing(kwargs)
    if packing is not None:  # a padding-free batch: the prompt goes in front of every packed sequence
        return prompt_inputs(state, kwargs, packing)
    lead, S = ids.shape[:-1], ids.shape[-1]  # [B] or [B, C]: choices are flattened as the model does
    flat = ids.reshape(-1, S)
    mask = _flat(kwargs.get("attention_mask"), S)
    kwargs["input_ids"] = None
    embeds = state.embed(flat, mask)
    kwargs["inputs_embeds"] = embeds.view(*lead, m + S, embeds.shape[-1])

    def grown(x, value):
        return _prepend(_flat(x, S), m, value).view(*lead, m + S)

    if mask is not None:
        _warn_left_padding_in_window(rules, mask, m)
        kwargs["attention_mask"] = grown(mask, 1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = grown(kwargs["token_type_ids"], 0)
    pos = kwargs.get("position_ids")
    largest = None
    if pos is not None:
        pos = _flat(pos, S)
        front = torch.arange(m, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], m)
        kwargs["position_ids"] = torch.cat([front, _shift_positions(pos, m)], dim=-1).view(*lead, m + S)
        largest = int(pos.max()) + m if rules.position_rows is not None else None
    elif rules.pad_positions is not None:
        kwargs["position_ids"] = _pad_aware_positions(flat, m, rules.pad_positions).view(*lead, m + S)
    rules.check_length(m + S, m, largest)
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == ids.shape:
        labels = grown(labels, IGNORE_INDEX)
        if rules.next_token_loss:  # each row's first real token stays unscored, as the model alone leaves it
            real = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.bool()
            first = torch.where(real.any(-1), m + real.long().argmax(-1), -1)
            labels = first_token_unscored(labels.reshape(-1, m + S), first).view(*lead, m + S)
        kwargs["labels"] = labels
    for name in _TOKEN_INDEX_ARGS:
        index = kwargs.get(name)
        if isinstance(index, torch.Tensor) and not index.is_floating_point():
            kwargs[name] = index + m
    if rules.pool_last:
        ctx.pooled = _last_real_slot(flat, m, rules.pad_token_id)
    return kwargs


def _decoding_step(state, kwargs, m, past):
    """A decoding step: the cache already holds the prompt; new tokens still get the method's offset.

    The caller's ``attention_mask`` and ``position_ids`` count without the prompt (generate makes them from
    the unprompted input): both move up by m. A step without a mask and without position ids is numbered by
    the model from the cache length, which includes the prompt: already right.
    """
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    new = ids if ids is not None else kwargs.get("inputs_embeds")
    if new is None:
        return kwargs
    n = new.shape[1]
    unprompted = mask is None or mask.shape[1] == past + n - m
    if not unprompted:  # the caller already counts the prompt (a mask over the whole cache)
        return kwargs
    if ids is not None:
        full = mask if mask is not None else torch.ones(ids.shape[0], past + n - m, dtype=torch.long,
                                                         device=ids.device)
        embeds = state.embed_continuation(ids, full)
        if embeds is not None:
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
    if mask is not None:
        kwargs["attention_mask"] = _prepend(mask, m, 1)
    rules, largest = state.inputs, None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = _shift_positions(kwargs["position_ids"], m)
        largest = int(kwargs["position_ids"].max()) if rules.position_rows is not None else None
    elif rules.pad_positions is not None and ids is not None and kwargs.get("input_ids") is None:
        # a pad-aware embedding given inputs_embeds would number the new tokens from its start: number them
        # as it does from input_ids, after the cache (which holds the prompt)
        real = (ids != rules.pad_positions).long()
        kwargs["position_ids"] = (real.cumsum(1) + past) * real + rules.pad_positions
    state.inputs.check_length(past + n, m, largest)
    return kwargs
