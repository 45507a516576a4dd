"""Rewrite a model call's keyword arguments for the prompt methods (PT, DePT, ADePT).

The prompt becomes part of the input: ``input_ids [B, S]`` turn into ``inputs_embeds [B, m+S, d]`` at the
top-level forward (as PEFT does, so models that add position embeddings inside their embedding module,
like BERT, position the prompt too), and every per-token input grows by the m prompt slots:

- ``attention_mask``: m ones in front (the prompt is real);
- ``token_type_ids``: m zeros in front (BERT);
- ``position_ids``: the prompt takes positions ``0..m-1`` and the tokens move up by m;
- ``labels`` of token-level losses (integer, shaped like ``input_ids``): m ``-100`` in front. Sequence
  labels ``[B]`` and an encoder-decoder's decoder labels are left alone.

Decoding with a KV cache: the prompt is embedded once, in the first call (empty cache); later calls
bring only new tokens, and their ``attention_mask`` (which covers the cache) and ``position_ids`` still
count without the prompt, so they get the same extension. Encoder-decoders (T5): the encoder input gets
the prompt; when ``generate`` runs the encoder on its own, a pre-hook on the encoder does the same, and
later calls extend the encoder padding mask to the encoder output's length.
"""

from __future__ import annotations

import inspect

import torch

IGNORE_INDEX = -100


def bind(module, args, kwargs):
    """All of a forward call's arguments as keywords (positional ones named from the signature)."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise ValueError(f"{type(module).__name__}.forward got {len(args)} positional arguments; pass them by name")
    out = dict(zip(names, args))
    clash = set(out) & set(kwargs)
    if clash:
        raise ValueError(f"{type(module).__name__}.forward got multiple values for {sorted(clash)}")
    out.update(kwargs)
    return out


def _prepend(x, m, value):
    """``[B, S, ...]`` -> ``[B, m+S, ...]`` with m slots of ``value`` in front."""
    head = torch.full((x.shape[0], m, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([head, x], dim=1)


def _shift_positions(position_ids, m):
    return position_ids + m


def _cache_length(past):
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    raise ValueError("fastprefix prompt methods need past_key_values as a transformers Cache "
                     "(legacy tuples are not supported)")


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


def model_inputs(state, kwargs):
    """The top-level forward's keyword arguments, rewritten for a prompt of m tokens."""
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

    past = _cache_length(kwargs.get("past_key_values"))
    if past == 0:
        ids = _embed(state, kwargs)
        if ids is None:
            return kwargs
        if mask is not None:
            kwargs["attention_mask"] = _prepend(mask, m, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], m, 0)
        pos = kwargs.get("position_ids")
        if pos is not None:
            front = torch.arange(m, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], m)
            kwargs["position_ids"] = torch.cat([front, _shift_positions(pos, m)], dim=-1)
        labels = kwargs.get("labels")
        if (isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == ids.shape):
            kwargs["labels"] = _prepend(labels, m, IGNORE_INDEX)
        return kwargs

    # a decoding step: the cache already holds the prompt; new tokens still get the method's offset
    ids = kwargs.get("input_ids")
    new = ids if ids is not None else kwargs.get("inputs_embeds")
    if new is None:
        return kwargs
    n = new.shape[1]
    unprompted = mask is None or mask.shape[1] == past + n - m
    if ids is not None and unprompted:
        full = mask if mask is not None else torch.ones(ids.shape[0], past + n - m, dtype=torch.long, device=ids.device)
        embeds = state.embed_continuation(ids, full)
        if embeds is not None:
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
    if mask is not None and unprompted:
        kwargs["attention_mask"] = _prepend(mask, m, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _shift_positions(kwargs["position_ids"], m)
    return kwargs
