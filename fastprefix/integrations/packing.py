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
alone with the positions it has in the row. :func:`padding_free` wraps the attention function: the row is
unpacked into a right-padded batch ``[n, H, S_max, D]`` with a key padding mask, the undecorated attention runs
on it (one call of the fused op), and the output is packed back. Gathers move the tensors, so gradients flow
through them. APT's gate reads each sequence's own hidden states, unpacked the same way: the pooled gate pools
over that sequence's tokens only. :func:`packed_mask` wraps the mask function: for transformers' packed-sequence
overlay it returns the ``[B, T]`` integer sequence ids (the signal the attention reads) instead of refusing. The
segments are per-forward state: they come with the call (its mask and keyword arguments) and are computed once
per forward into its ForwardContext. Not supported: a relative position bias over the row (T5), and decoding
from a packed prefill.

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

from .context import KWARG, ForwardContext
from .masks import is_segment_ids, packed_overlay

VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # FlashAttention's packing kwargs
IGNORE_INDEX = -100  # the label a loss skips


class Packing:
    """Where the packed sequences of a ``[B, T]`` batch lie, and how tensors move between the two layouts.

    count: n sequences; longest: S_max (Python ints).
    starts: ``[n]`` flat index ``b * T + t`` of each sequence's first token, row-major; lengths: ``[n]``.
    index: ``[n, S_max]`` the flat token behind each slot of the unpacked batch (padding repeats the first).
    mask: ``[n, S_max]`` bool, True = real token: the unpacked batch's key padding mask.
    slot: ``[B * T]`` each token's slot ``s * S_max + j`` in the flattened unpacked batch.
    seq: ``[B * T]`` each token's sequence.
    """

    def __init__(self, segment_ids):
        """segment_ids: ``[B, T]`` integers, a sequence = a maximal run of equal ids in a row."""
        B, T = segment_ids.shape
        device = segment_ids.device
        first = torch.ones(B, T, dtype=torch.bool, device=device)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        first = first.reshape(-1)
        starts = first.nonzero().squeeze(1)
        ends = torch.cat([starts[1:], torch.tensor([B * T], device=device)])
        lengths = ends - starts
        longest = int(lengths.max())  # the one host sync of a forward (Packing is built once per forward)
        cols = torch.arange(longest, device=device)
        self.shape = (B, T)
        self.count, self.longest = starts.numel(), longest
        self.starts, self.lengths = starts, lengths
        self.mask = cols < lengths[:, None]
        self.index = torch.where(self.mask, starts[:, None] + cols, starts[:, None])
        self.seq = first.long().cumsum(0) - 1
        self.slot = self.seq * longest + (torch.arange(B * T, device=device) - starts[self.seq])

    def tokens(self, x):
        """``[B, T, ...]`` -> ``[n, S_max, ...]`` (a ``[1, T, ...]`` input is read for every row)."""
        B, T = self.shape
        if x.shape[1] != T or x.shape[0] not in (1, B):
            raise ValueError(f"packed sequences: expected a per-token tensor [B={B}, T={T}, ...], "
                             f"got {list(x.shape)}")
        return x.expand(B, *x.shape[1:]).reshape(B * T, *x.shape[2:])[self.index]

    def heads(self, x):
        """``[B, h, T, D]`` (queries, keys, values) -> ``[n, h, S_max, D]``."""
        return self.tokens(x.transpose(1, 2)).transpose(1, 2)

    def pack(self, x):
        """``[n, S_max, ...]`` -> ``[B, T, ...]``: the real slots back in their packed places."""
        B, T = self.shape
        return x.reshape(self.count * self.longest, *x.shape[2:])[self.slot].reshape(B, T, *x.shape[2:])

    def pack_weights(self, w):
        """Attention maps ``[n, H, S_max, L + S_max]`` -> ``[B, H, T, L + T]`` (0 on other sequences' keys)."""
        n, H, S, LS = w.shape
        L, (B, T) = LS - S, self.shape
        rows = w.transpose(1, 2).reshape(n * S, H, LS)[self.slot]  # [B*T, H, L + S_max]
        # key j of a token's sequence is column (sequence start within the row) + j; the slots past the
        # sequence's end hold probability exactly 0 (masked), so clamping them onto a real column adds nothing
        cols = ((self.starts % T)[self.seq][:, None] + torch.arange(S, device=w.device)).clamp_max(T - 1)
        keys = rows.new_zeros(B * T, H, T).scatter_add(2, cols[:, None, :].expand(-1, H, -1), rows[..., L:])
        return torch.cat([rows[..., :L], keys], dim=-1).reshape(B, T, H, L + T).transpose(1, 2)

    def context(self, ctx):
        """A view of the call's ForwardContext whose hidden states (APT's gate input) are unpacked.

        It shares everything else (prefixes, gate statistics); it holds no KV caches, so APT's causal pooled
        gate keeps no running statistics for decoding after a packed call (decode from an unpacked prompt).
        """
        view = object.__new__(type(ctx))
        view.__dict__.update(ctx.__dict__)
        view.hidden = _UnpackedHidden(ctx.hidden, self)
        view.caches = {}
        return view


class _UnpackedHidden:
    """``ForwardContext.hidden`` seen through a Packing: layer -> ``[n, S_max, d]`` (read or popped)."""

    def __init__(self, hidden, packing):
        self._hidden, self._packing = hidden, packing

    def get(self, i, default=None):
        h = self._hidden.get(i)
        return default if h is None else self._packing.tokens(h)

    def pop(self, i, default=None):
        h = self._hidden.pop(i, None)
        return default if h is None else self._packing.tokens(h)


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
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)[None]


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
        if padding_mask is not None and not bool(padding_mask.all()):
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
def padding_free(attention):
    """Decorate the ``"fastprefix"`` attention function: a packed call runs its sequences unpacked.

    ``attention(module, query [B, H, T, D], key, value, attention_mask, scaling, dropout, **kwargs)`` returns
    ``([B, T, H, D], weights)``; packed, it is called once on ``[n, H, S_max, D]`` with the ``[n, S_max]`` key
    padding mask and a context whose hidden states are unpacked, and its output (and attention map) packed back.
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
        inner[KWARG] = packing.context(ctx)
        out, weights = attention(module, packing.heads(query), packing.heads(key), packing.heads(value),
                                 packing.mask, scaling, dropout, **inner)
        return packing.pack(out), None if weights is None else packing.pack_weights(weights)

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
        labels = grown(labels, torch.full((n, m), IGNORE_INDEX, device=ids.device))
        if rules.next_token_loss:  # every sequence's first token stays unscored, as alone (see inputs)
            starts = (torch.arange(n, device=ids.device) * (m + S) + m)[packing.lengths > 0]
            flat = labels.reshape(-1)
            flat[keep.cumsum(0)[starts] - 1] = IGNORE_INDEX
        kwargs["labels"] = labels
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
