"""Packed sequences (padding-free batches): several sequences in one row, no padding.

LLM fine-tuning packs a batch into one row ``[1, T]`` (transformers' ``DataCollatorWithFlattening``, TRL's
``padding_free``). Two signals reach the model, and either or both may come (both must then agree):

- ``position_ids`` that restart for every sequence, with no ``attention_mask``: a new sequence starts wherever
  the position does not grow by exactly 1 (``masking_utils.find_packed_sequence_indices``, any batch size).
  transformers' mask functions isolate such sequences only without a KV cache (``use_cache=False``), its
  FlashAttention path always; fastprefix's attention always does (it reads the restarts itself when a cache
  kept the mask functions from seeing them). An ``attention_mask`` turns the detection off, as in transformers;
- FlashAttention's keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (cumulative lengths ``[n + 1]``)
  and ``max_length_q`` / ``max_length_k``, which every layer's attention receives with ``**kwargs`` (batch of
  one row, no padding). Without restarting ``position_ids`` the model numbers the whole row itself.

**Prefix methods** (P-Tuning v2, APT): every packed sequence attends to the prefix and to its own tokens only
(causally on decoders, both ways on encoders, within its sliding window if the layer has one), as if it ran
alone with the positions it has in the row. :func:`padding_free` wraps the attention function: the ``[B, T]``
batch becomes one packed row ``[1, B * T]`` (a view of the layer's ``[B, T, H, D]`` memory) and the undecorated
attention calls the op once on it with the sequences' ``cu_seqlens`` (``fastprefix.gated_prefix_attention``'s
packed call: the varlen vendor op on the split and concat paths, never re-padded; the fused kernel and the
reference re-pad it internally); its output is the batch's as it lies. APT's token gate reads each token's own
hidden state; the pooled gate pools each sequence's own tokens (the hidden states gathered per sequence, causally
on decoders) and is handed to every token of it (:data:`PACKED` tells the attention function; see
``gates.packed_gate``). :func:`packed_mask` wraps the mask function: for transformers' packed-sequence
overlay it returns the ``[B, T]`` integer sequence ids (the signal the attention reads) instead of refusing. The
segments are per-forward state: they come with the call (its mask and keyword arguments) and are computed once
per forward into its ForwardContext (a ``fastprefix.sequences.Packing``, shared with the ops below). Not
supported: a relative position bias over the row (T5), and decoding from a packed prefill.

**Prompt methods** (PT, DePT, ADePT): :func:`prompt_inputs` puts the prompt in front of *every* packed sequence:
``[P ; seq_1 ; P ; seq_2 ; ...]``, each sequence's positions ``0..m-1`` for its prompt and its own moved up by m,
labels ``-100`` on the prompt slots, ``cu_seq_lens_*`` and ``max_length_*`` grown by m per sequence; DePT's
offsets restart for every sequence. Each prompted sequence then equals that sequence prompted alone, provided
the model's own attention isolates the packed sequences (see above: sdpa/eager need ``use_cache=False``).
:func:`token_slots` says where the input tokens went. Refused: decoder ``*ForSequenceClassification`` (one
label per row) and rows holding different numbers of sequences (they would differ in length).
"""

from __future__ import annotations

import functools

import torch

from ..sequences import Packing, all_real
from ..spec import sequence_ids
from .context import KWARG, ForwardContext
from .masks import is_segment_ids, packed_overlay

VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # FlashAttention's packing kwargs
IGNORE_INDEX = -100  # the label a loss skips
PACKED = "fastprefix_packing"  # the keyword argument that hands the attention function its packed call's Packing

__all__ = ["Packing", "PACKED", "VARLEN", "IGNORE_INDEX", "of_call", "padding_free", "packed_mask", "prompt_packing",
           "prompt_inputs", "token_slots"]


# ---------------------------------------------------------------------------------------------------- signals
def _by_position(position_ids, B, T):
    """transformers' rule on ``position_ids [B|1, T]``: ``[B, T]`` sequence ids, or None (one sequence a row)."""
    from transformers.masking_utils import find_packed_sequence_indices

    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != T \
            or position_ids.shape[0] not in (1, B) or T < 2:
        return None
    return find_packed_sequence_indices(position_ids.expand(B, T))


def _by_varlen(kwargs, B, T, device):
    """``[1, T]`` sequence ids from ``cu_seq_lens_q/k``, or None when none of FlashAttention's kwargs came."""
    given = [k for k in VARLEN if kwargs.get(k) is not None]
    if not given:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError(f"packed sequences: cu_seq_lens_q and cu_seq_lens_k must come together, got only {given}")
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.is_floating_point() or cu.dtype == torch.bool:
            got = f"{cu.dtype} {list(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"packed sequences: {name} must be a 1-D integer tensor of cumulative lengths "
                             f"[n + 1], got {got}")
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError(f"packed sequences: cu_seq_lens_q and cu_seq_lens_k must be equal (a packed batch's "
                         f"queries are its keys), got {cu_q.tolist()} and {cu_k.tolist()}")
    if B != 1:
        raise ValueError(f"packed sequences: cu_seq_lens_q describes sequences packed into one row, so the batch "
                         f"must be [1, T], got batch size {B}")
    cu = cu_q.to(device=device, dtype=torch.long)
    lengths = cu.diff()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((lengths < 0).any()):
        raise ValueError(f"packed sequences: cu_seq_lens_q must rise from 0 to the row's {T} tokens, "
                         f"got {cu.tolist()}")
    return sequence_ids(cu, T)[None]


def _same_sequences(a, b):
    """Do two ``[B, T]`` id tensors cut the rows at the same places?"""
    return torch.equal(a[:, 1:] != a[:, :-1], b[:, 1:] != b[:, :-1])


def _segments(B, T, device, kwargs, padding_mask, segment_ids=None, position_ids=None):
    """The call's sequence ids ``[B, T]`` from whichever signals came (they must agree), or None (not packed).

    padding_mask: the call's padding mask (None, or 1/True = real token), which must hide nothing when
    ``cu_seq_lens`` come."""
    ids = segment_ids if segment_ids is not None else _by_position(position_ids, B, T)
    varlen = _by_varlen(kwargs, B, T, device)
    if varlen is not None:
        if padding_mask is not None and not all_real(padding_mask):
            raise ValueError("packed sequences: cu_seq_lens_q/k came with an attention_mask that hides tokens; a "
                             "padding-free batch has no padding: drop the mask or the cu_seq_lens")
        if ids is not None and not _same_sequences(ids.to(device), varlen):
            raise ValueError("packed sequences: position_ids and cu_seq_lens_q cut the row into different "
                             f"sequences (position_ids restart at {_cuts(ids)}, cu_seq_lens_q at {_cuts(varlen)})")
        ids = varlen
    return ids


def _cuts(ids):
    return (ids[0, 1:] != ids[0, :-1]).nonzero().squeeze(1).add(1).tolist()


def of_call(ctx, attention_mask, kwargs, query, key):
    """The Packing of one attention call (built once per forward, kept on its context), or None."""
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    segment_ids = attention_mask if is_segment_ids(attention_mask) else None
    varlen = any(kwargs.get(k) is not None for k in VARLEN)
    # a new sequence wherever positions restart (FlashAttention's and the mask functions' rule); not while
    # decoding (queries after cached keys) and not with a padding mask, as transformers decides
    position_ids = kwargs.get("position_ids") if attention_mask is None and Sq == Sk else None
    if segment_ids is None and not varlen and position_ids is None:
        return None
    signals = (segment_ids, kwargs.get("cu_seq_lens_q"), position_ids)
    memo = ctx.packing
    if memo is not None and all(a is b for a, b in zip(memo[0], signals)):
        return memo[1]
    if (segment_ids is not None or varlen) and Sq != Sk:
        raise ValueError(f"packed sequences: a packed call's queries are its keys, got {Sq} queries over {Sk} "
                         "keys (a KV cache). Decode from unpacked inputs")
    padding_mask = attention_mask if segment_ids is None else None
    ids = _segments(B, Sq, query.device, kwargs, padding_mask, segment_ids, position_ids)
    packing = None if ids is None else Packing(ids.to(query.device))
    ctx.packing = (signals, packing)
    return packing


# -------------------------------------------------------------------------------------- prefix-method wrappers
def _one_row(x):
    """``[B, h, T, D]`` -> the packed row ``[1, h, B * T, D]`` (a view of ``[B, T, h, D]`` memory)."""
    B, h, T, D = x.shape
    return x.transpose(1, 2).reshape(1, B * T, h, D).transpose(1, 2)


def padding_free(attention):
    """Decorate the ``"fastprefix"`` attention function: a packed call runs as one packed row.

    ``attention(module, query [B, H, T, D], key, value, attention_mask, scaling, dropout, **kwargs)`` returns
    ``([B, T, H, D], weights)``; packed, it is called once on the row ``[1, H, B * T, D]`` with no mask and the
    call's Packing under :data:`PACKED` (whose ``cu_seqlens`` it hands the op), and its output (and attention
    map, each row's own keys) taken back to the batch's ``[B, T]`` shape.
    """

    @functools.wraps(attention)
    def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        ctx = kwargs.get(KWARG)
        packing = of_call(ctx, attention_mask, kwargs, query, key) if isinstance(ctx, ForwardContext) else None
        if packing is None:
            return attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if kwargs.get("position_bias") is not None:
            raise NotImplementedError(f"fastprefix: packed sequences on {type(module).__name__}, whose attention "
                                      "adds a relative position bias over the whole row, are not supported; pad "
                                      "the batch (one sequence a row)")
        inner = {k: v for k, v in kwargs.items() if k not in VARLEN and k != "position_ids"}
        inner[PACKED] = packing
        B, _, T, _ = query.shape
        out, weights = attention(module, _one_row(query), _one_row(key), _one_row(value), None, scaling, dropout,
                                 **inner)
        return out.reshape(B, T, *out.shape[2:]), None if weights is None else packing.row_weights(weights)

    return packed_attention


def packed_mask(mask_interface):
    """Decorate the ``"fastprefix"`` mask function: transformers' packed-sequence overlay gives the layers the
    integer sequence ids ``[B, T]`` (see :func:`padding_free`), once the undecorated function has accepted the
    pattern inside each sequence (plain causal or bidirectional)."""

    @functools.wraps(mask_interface)
    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
        overlay = packed_overlay(mask_function)
        if overlay is None:
            return mask_interface(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                  attention_mask, **kwargs)
        ids, base = overlay
        padding = mask_interface(batch_size, q_length, kv_length, q_offset, kv_offset, base, attention_mask,
                                 **kwargs)
        if padding is not None or int(q_offset) != 0 or q_length != kv_length or list(ids.shape) != [
                batch_size, q_length]:
            raise NotImplementedError(
                f"fastprefix: packed sequences need a batch without padding mask or cache (got sequence ids "
                f"{list(ids.shape)} for {q_length} queries over {kv_length} keys at offset {int(q_offset)})")
        return ids

    return mask


# ------------------------------------------------------------------------------------------- prompt methods
def prompt_packing(kwargs):
    """The Packing of a prompt-method call's ``input_ids [B, T]`` (None: not packed)."""
    ids = kwargs.get("input_ids")
    varlen = any(kwargs.get(k) is not None for k in VARLEN)
    position_ids = kwargs.get("position_ids") if kwargs.get("attention_mask") is None else None
    if not isinstance(ids, torch.Tensor) or (not varlen and position_ids is None):
        return None
    if ids.dim() != 2:
        if varlen:
            raise ValueError(f"packed sequences: input_ids must be [1, T] with cu_seq_lens, got {list(ids.shape)}")
        return None
    B, T = ids.shape
    segments = _segments(B, T, ids.device, kwargs, kwargs.get("attention_mask"), position_ids=position_ids)
    return None if segments is None else Packing(segments.to(ids.device))


def _per_row(packing):
    """The number of sequences in each row; prompted rows stay one length only if it is the same for all."""
    B, T = packing.shape
    counts = torch.bincount(packing.starts // T, minlength=B)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"prompt methods with packed sequences: every row must hold the same number of "
                         f"sequences (each gets the prompt, so rows would differ in length), got {counts.tolist()}")
    return int(counts[0])


def prompt_inputs(state, kwargs, packing):
    """Rewrite a packed prompt-method call: the prompt in front of every sequence (see the module docstring)."""
    rules, m = state.inputs, state.num_virtual_tokens
    if rules.pool_last:
        raise ValueError(f"{rules.model_name} classifies a row by its last token, so a packed row of several "
                         "sequences gets one label; pad the batch (one sequence a row) to classify sequences")
    for name in ("start_positions", "end_positions"):
        if kwargs.get(name) is not None:
            raise ValueError(f"prompt methods with packed sequences: {name} is not supported; pad the batch")
    ids = kwargs["input_ids"]
    (B, T), n, S, k = packing.shape, packing.count, packing.longest, _per_row(packing)
    keep = torch.cat([torch.ones(n, m, dtype=torch.bool, device=ids.device), packing.mask], dim=1).reshape(-1)
    order = keep.nonzero().squeeze(1)  # the prompted sequences' slots, row-major: [B * (T + k m)]

    def prompted(u):  # [n, m + S, ...] -> [B, T + k m, ...]
        return u.reshape(n * (m + S), *u.shape[2:])[order].reshape(B, T + k * m, *u.shape[2:])

    def grown(x, front):  # per-token [B|1, T] -> [B, T + k m], ``front [n, m]`` before every sequence
        return prompted(torch.cat([front.to(x.dtype), packing.tokens(x)], dim=1))

    embeds = state.embed(packing.tokens(ids), packing.mask.long())  # DePT: offsets restart every sequence
    kwargs["input_ids"], kwargs["inputs_embeds"] = None, prompted(embeds)
    arange = torch.arange(m, device=ids.device).expand(n, m)
    largest = None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = grown(kwargs["position_ids"] + m, arange)
        largest = int(kwargs["position_ids"].max()) if rules.position_rows is not None else None
    rules.check_length(T + k * m, m, largest)  # without position ids the model numbers the whole row
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == ids.shape:
        front = torch.full((n, m), IGNORE_INDEX, dtype=labels.dtype, device=ids.device)
        labels = torch.cat([front, packing.tokens(labels)], dim=1)  # [n, m + S]: each sequence after its prompt
        if rules.next_token_loss:  # every sequence's first token stays unscored, as alone (see inputs)
            labels[:, m:m + 1] = IGNORE_INDEX
        kwargs["labels"] = prompted(labels)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = grown(kwargs["token_type_ids"], torch.zeros(n, m, device=ids.device))
    if kwargs.get("seq_idx") is not None:  # the prompt belongs to its sequence
        kwargs["seq_idx"] = grown(kwargs["seq_idx"], packing.tokens(kwargs["seq_idx"])[:, :1].expand(n, m))
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = kwargs.get(name)
        if cu is not None:
            grown_cu = torch.cat([packing.lengths.new_zeros(1), (packing.lengths + m).cumsum(0)])
            kwargs[name] = grown_cu.to(device=cu.device, dtype=cu.dtype)
    for name in ("max_length_q", "max_length_k"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + m
    return kwargs


def token_slots(packing, m):
    """Where each input token sits in the prompted packed row: ``[B, T]`` column indices (``m`` prompt slots
    precede every sequence), e.g. to pick the input tokens' logits out of a prompted packed output."""
    B, T = packing.shape
    flat = torch.arange(B * T, device=packing.starts.device)
    within_row = flat % T + m * (packing.seq - packing.seq[(flat // T) * T] + 1)
    return within_row.reshape(B, T)
