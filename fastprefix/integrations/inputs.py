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

Per-row adapters (``adapter_names``): every rewrite above asks the call's ``rows.RowPrompts`` (also made for a call
without them: the active adapter on every row), which embeds each adapter's rows with its own prompt and offset and
places each per-token input row by row. Rows whose prompts are shorter than the call's longest, M, get M - m hidden
slots (mask 0): in front of the row on a decoder, which then gets the row's positions alone as ``position_ids``;
after the row on an encoder and T5's encoder. The call is ``M + S`` slots wide; token labels, the pooled slot and
decoding steps follow each row. What the hidden slots would change is refused (a question-answering loss over the
row's slots, a decoder without ``position_ids``, packed rows); a ``"__base__"`` row is embedded as the base model
embeds it and its labels are scored as the base model scores them.
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
    takes_positions: the model's forward takes ``position_ids``.
    decoder_only: a decoder-only model (causal, decoded with a KV cache): per-row prompts of different lengths put
    a row's hidden slots in front of it (see ``rows.RowPrompts``).
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
        self.takes_positions = takes_positions
        self.decoder_only = _decoder_only(model)
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


def _decoder_only(model):
    """A decoder-only model: causal self-attention (Llama, GPT-2, ... and their classifiers), not an
    encoder-decoder."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    if getattr(model.config, "is_decoder", False) or _scores_next_token(model) or _pools_last_token(model):
        return True
    return any(getattr(m, "is_causal", None) is True for m in model.modules())


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


def _embedded(rows, kwargs):
    """Take the call's ``input_ids`` into ``inputs_embeds`` (the rows' prompts in front); return the ids, or None
    when the call has none (``inputs_embeds`` given instead is a ValueError)."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if ids is None:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("fastprefix prompt methods embed the input themselves: pass input_ids, not inputs_embeds")
        return None
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = rows.embed(ids, mask)
    return ids


def encoder_inputs(state, kwargs, rows):
    """An encoder stack called on its own (``generate`` on T5): prompt the input, extend its mask. ``rows``: the
    call's ``rows.RowPrompts``."""
    if kwargs.get("input_ids") is None:  # the top-level hook already embedded the input
        return kwargs
    return _encoder_call(kwargs, rows)


def _encoder_call(kwargs, rows):
    """The encoder input of an encoder-decoder: the prompted embeddings and the grown padding mask."""
    ids = _embedded(rows, kwargs)
    if ids is not None:
        mask = rows.mask(kwargs.get("attention_mask"), ids.shape[1])
        if mask is not None:
            kwargs["attention_mask"] = mask
    return kwargs


def _last_real_slot(ids, start, pad_token_id):
    """Where the model's head pools in the prompted sequence: the rightmost slot that is not ``pad_token_id``
    in each row's ``[prompt ; ids]`` (the model's own rule on ``input_ids``, the prompt counted as real), its
    tokens starting at column ``start`` (an int, or ``[B]``)."""
    if pad_token_id is None:
        return None
    S = ids.shape[1]
    real = (ids != pad_token_id).long()
    cols = torch.arange(1, S + 1, device=ids.device)
    return start - 1 + (cols * real).amax(1)  # start - 1 (the last prompt slot) for a row of pads only


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


def model_inputs(state, kwargs, ctx, rows):
    """The top-level forward's keyword arguments, rewritten for the call's prompts; ``ctx``: the call's
    ForwardContext, which gets the slot a decoder classifier's head pools (``ctx.pooled``); ``rows``: the call's
    ``rows.RowPrompts`` (every row's adapter, and where its slots go)."""
    M = rows.width
    mask = kwargs.get("attention_mask")
    if state.encoder_decoder:
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:  # the encoder already ran (generate): only its mask may lag behind
            length = encoder_outputs[0].shape[1]
            if (mask is None and not rows.aligned) or (mask is not None and mask.shape[1] == length - M):
                kwargs["attention_mask"] = rows.mask(mask, length - M)
            return kwargs
        return _encoder_call(kwargs, rows)

    past = cache_length(kwargs.get("past_key_values"))
    if past == 0:
        return _first_call(state, kwargs, rows, ctx)
    return _decoding_step(state, kwargs, rows, past)


def _refuse_unaligned(rules, rows, kwargs, numbered_by_model):
    """Per-row prompts of different lengths leave hidden slots in the rows with shorter prompts: refuse what those
    slots would change (``numbered_by_model``: the call gives no position ids, so a decoder needs them passed)."""
    if rows.aligned:
        return
    for name in _TOKEN_INDEX_ARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"adapter_names: {name} with adapters of different prompt lengths ({sorted(set(rows.sizes))}) is not "
                f"supported: {rules.model_name}'s question-answering loss normalises over every slot of a row, and a "
                "row with a shorter prompt carries hidden slots it does not have alone, so its loss would differ. "
                "Compute the loss from start_logits/end_logits over each row's own slots, or run adapters of one "
                "prompt length per call")
    if rows.front and numbered_by_model and not getattr(rules, "takes_positions", False):
        raise ValueError(
            f"adapter_names: adapters of different prompt lengths ({sorted(set(rows.sizes))}) on "
            f"{rules.model_name}: a row with a shorter prompt has hidden slots in front of it, so its tokens need the "
            f"positions they have alone as position_ids, which {rules.model_name}.forward does not take. Run "
            "adapters of one prompt length per call (or one adapter per call, fastprefix.set_adapter)")


def _first_call(state, kwargs, rows, ctx):
    rules = state.inputs
    ids = kwargs.get("input_ids")
    if ids is None:
        _embedded(rows, kwargs)  # raises for inputs_embeds
        return kwargs
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3):
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be [B, S] (or [B, C, S] for multiple choice), got {shape}")
    packing = prompt_packing(kwargs)
    if packing is not None:  # a padding-free batch: the prompt goes in front of every packed sequence
        if rows.per_row:
            raise ValueError("adapter_names: per-row adapters with packed sequences (a padding-free batch) are not "
                             "supported; pad the batch (one sequence a row)")
        return prompt_inputs(state, kwargs, packing)
    lead, S = ids.shape[:-1], ids.shape[-1]  # [B] or [B, C]: choices are flattened as the model does
    flat = ids.reshape(-1, S)
    rows = rows.repeated(flat.shape[0] // ids.shape[0])
    M = rows.width
    pos = kwargs.get("position_ids")
    _refuse_unaligned(rules, rows, kwargs, numbered_by_model=pos is None and rules.pad_positions is None)
    mask = _flat(kwargs.get("attention_mask"), S)
    kwargs["input_ids"] = None
    embeds = rows.embed(flat, mask)
    kwargs["inputs_embeds"] = embeds.view(*lead, M + S, embeds.shape[-1])

    def grown(x, value, hidden=0):
        return rows.grow(_flat(x, S), value, hidden).view(*lead, M + S)

    if mask is not None:
        _warn_left_padding_in_window(rules, mask, M)
    full = rows.mask(mask, S)
    if full is not None:
        kwargs["attention_mask"] = full.view(*lead, M + S)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = grown(kwargs["token_type_ids"], 0)
    largest = None
    if pos is not None:
        kwargs["position_ids"] = rows.positions(_flat(pos, S)).view(*lead, M + S)
        largest = int(kwargs["position_ids"].max()) if rules.position_rows is not None else None
    elif rules.pad_positions is not None:
        kwargs["position_ids"] = rows.pad_aware_positions(flat, rules.pad_positions).view(*lead, M + S)
    else:
        own = rows.own_positions(S)  # a decoder's rows with hidden slots in front: their positions alone
        if own is not None:
            kwargs["position_ids"] = own.view(*lead, M + S)
    rules.check_length(M + S, M, largest)
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == ids.shape:
        labels = grown(labels, IGNORE_INDEX, IGNORE_INDEX)
        if rules.next_token_loss:  # each row's first real token stays unscored, as the model alone leaves it
            real = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.bool()
            first = torch.where(real.any(-1), rows.tokens_start() + real.long().argmax(-1), -1)
            if rows.per_row:  # a "__base__" row scores what the base model scores: all but its own first slot
                first = torch.where(rows.lengths > 0, first, rows.tokens_start())
            labels = first_token_unscored(labels.reshape(-1, M + S), first).view(*lead, M + S)
        kwargs["labels"] = labels
    for name in _TOKEN_INDEX_ARGS:
        index = kwargs.get(name)
        if isinstance(index, torch.Tensor) and not index.is_floating_point():
            kwargs[name] = index + M  # (rows with hidden slots were refused)
    if rules.pool_last:
        ctx.pooled = _last_real_slot(flat, rows.tokens_start(), rules.pad_token_id)
    return kwargs


def _decoding_step(state, kwargs, rows, past):
    """A decoding step: the cache already holds the prompts; new tokens still get their adapter's offset.

    The caller's ``attention_mask`` and ``position_ids`` count without the prompt (generate makes them from
    the unprompted input): the mask gets the M columns in front of the cache (each row's prompt, and the hidden
    slots of a shorter one), the positions move up by each row's prompt length. A step without a mask and without
    position ids is numbered by the model from the cache length, which includes the prompt: already right when
    no slot is hidden; otherwise each row is given its positions alone (and a mask that hides its hidden slots).
    """
    M = rows.width
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    new = ids if ids is not None else kwargs.get("inputs_embeds")
    if new is None:
        return kwargs
    n = new.shape[1]
    unprompted = mask is None or mask.shape[1] == past + n - M
    if not unprompted:  # the caller already counts the prompt (a mask over the whole cache)
        return kwargs
    rules = state.inputs
    if not rows.aligned and not rows.front:
        raise ValueError(f"adapter_names: {rules.model_name} is not a decoder-only model, so a row's hidden slots "
                         "(adapters of different prompt lengths) sit after its tokens, where decoding would append "
                         "after them; decode with adapters of one prompt length per call")
    pos = kwargs.get("position_ids")
    _refuse_unaligned(rules, rows, kwargs, numbered_by_model=pos is None and rules.pad_positions is None)
    # the caller's mask, or the one it implies (every token real), over the cache without the prompt and the new tokens
    step_mask = mask if mask is not None else torch.ones(new.shape[0], past + n - M, dtype=torch.long,
                                                         device=new.device)
    if ids is not None:
        embeds = rows.continuation(ids, step_mask)
        if embeds is not None:
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
    if mask is not None or not rows.aligned:
        kwargs["attention_mask"] = torch.cat([rows.prompt_mask(step_mask), step_mask], dim=1)
    largest = None
    if pos is not None:
        kwargs["position_ids"] = pos + rows.shift()
        largest = int(kwargs["position_ids"].max()) if rules.position_rows is not None else None
    elif rules.pad_positions is not None and ids is not None and (kwargs.get("input_ids") is None or not rows.aligned):
        # a pad-aware embedding given inputs_embeds would number the new tokens from its start (and from ids after
        # the whole cache, hidden slots included): number them as it does from input_ids, after the row's own
        # cache (which holds its prompt)
        real = (ids != rules.pad_positions).long()
        kwargs["position_ids"] = (real.cumsum(1) + rows.past_alone(past)) * real + rules.pad_positions
    elif not rows.aligned:  # the model would number from the cache, hidden slots included: each row's count alone
        kwargs["position_ids"] = rows.past_alone(past) + torch.arange(n, device=new.device)
    rules.check_length(past + n, M, largest)
    return kwargs
