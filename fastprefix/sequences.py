"""Variable-length sequences: a packed row described by cumulative lengths, the bookkeeping that moves tensors
between it and a right-padded batch, and a memo that computes such bookkeeping once per forward.

What it holds (the floor below the attention paths and the integration, so there is one copy of each):

- :class:`Packing`: where the sequences of a ``[B, T]`` batch lie (from per-token sequence ids, or from
  FlashAttention's ``cu_seqlens``) and the gathers between the packed layout ``[B, T, ...]`` and the right-padded
  batch ``[n, S_max, ...]``. The fused kernel and the reference path serve a packed call by running its
  sequences re-padded (:func:`unpacked_call`, :func:`packed_output`); the integration computes APT's pooled gate
  per sequence on the re-padded hidden states. Gathers move the tensors, so gradients flow through them.
- :func:`check_cu_seqlens`: what a packed call's ``cu_seqlens`` must be (int32 ``[n + 1]``, 0 first, the row's T
  tokens last, nondecreasing), checked once per tensor.
- :func:`memoized`: a value computed once per (tensor, its in-place version, key): a forward computes the
  bookkeeping of its padding mask or ``cu_seqlens`` at its first layer and every later layer reuses it, since
  transformers hands every layer the same mask tensor. Entries hold a weak reference to their tensor, so they
  die with it, and a tensor changed in place (its version counter moves) is recomputed.

Based on FlashAttention's variable-length interface (``cu_seqlens``, ``max_seqlen``) and transformers'
padding-free collators (``DataCollatorWithFlattening``), whose packed rows restart ``position_ids`` per sequence.

Caveats. Building a Packing syncs with the host once (its longest sequence), and so does checking a
``cu_seqlens``; the memo keeps that to once per forward. Tensors without a version counter (made under
``torch.inference_mode``) are not memoised: their bookkeeping is rebuilt at every call. Zero-length sequences in
``cu_seqlens`` are allowed and vanish (they hold no token).
"""

from __future__ import annotations

import copy
import weakref

import torch

from .spec import effective_window, sequence_ids

_MEMO = {}  # id(tensor) -> (weak reference, version, {key: value})


def _version(tensor):
    """The tensor's in-place version counter, or None where it has none (inference tensors)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _forget(memo, key, ref):
    # memo comes bound in the callback: at interpreter exit this module's globals may already be gone
    entry = memo.get(key)
    if entry is not None and entry[0] is ref:
        del memo[key]


def memoized(tensor, key, build):
    """``build()``, computed once per (``tensor``, its version counter, ``key``) while ``tensor`` lives."""
    version = _version(tensor)
    if version is None:
        return build()
    entry = _MEMO.get(id(tensor))
    if entry is None or entry[0]() is not tensor or entry[1] != version:
        ref = weakref.ref(tensor, lambda r, i=id(tensor), memo=_MEMO: _forget(memo, i, r))
        entry = (ref, version, {})
        _MEMO[id(tensor)] = entry
    values = entry[2]
    if key not in values:
        values[key] = build()
    return values[key]


def all_real(key_padding_mask) -> bool:
    """Whether a ``[B, Sk]`` padding mask hides nothing: one host sync per mask tensor, so once per forward
    (every layer gets the same mask)."""
    return memoized(key_padding_mask, "all_real", lambda: bool(key_padding_mask.all()))


def check_cu_seqlens(cu_seqlens, T: int, device) -> None:
    """A ValueError unless ``cu_seqlens`` is an int32 ``[n + 1]`` tensor on ``device`` rising from 0 to ``T``
    (the values are checked once per tensor: one host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
            else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of cumulative lengths [n + 1] (n >= 1), got {got}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (FlashAttention's varlen API), got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the other inputs are on {device}")

    def values_ok():
        cu = cu_seqlens.tolist()
        return cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:]))

    if not memoized(cu_seqlens, ("values", T), values_ok):
        raise ValueError(f"cu_seqlens must rise from 0 to the row's {T} tokens without falling, "
                         f"got {cu_seqlens.tolist()}")


class Packing:
    """Where the packed sequences of a ``[B, T]`` batch lie, and how tensors move between the two layouts.

    count: n sequences (non-empty); longest: S_max (Python ints).
    starts: ``[n]`` flat index ``b * T + t`` of each sequence's first token, row-major; lengths: ``[n]``.
    index: ``[n, S_max]`` the flat token behind each slot of the unpacked batch (padding repeats the first).
    mask: ``[n, S_max]`` bool, True = real token: the unpacked batch's key padding mask.
    slot: ``[B * T]`` each token's slot ``s * S_max + j`` in the flattened unpacked batch.
    seq: ``[B * T]`` each token's sequence.
    cu_seqlens: int32 ``[n + 1]``, the sequences' cumulative lengths over the ``B * T`` tokens flattened row-major
    (what a packed call of the attention takes: the ``[B, T]`` batch as one row ``[1, B * T]``).
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
        self.cu_seqlens = torch.cat([starts, starts.new_full((1,), B * T)]).to(torch.int32)
        # what the attention op would work out from this cu_seqlens (a host sync each) is known here: its values
        # are good, and this is its Packing but for the shape (the row [1, B * T] flattened row-major)
        row = copy.copy(self)
        row.shape = (1, B * T)
        row.cu_seqlens = self.cu_seqlens.clone()  # the memo must not hold its own key: it would never be freed
        memoized(self.cu_seqlens, ("values", B * T), lambda: True)
        memoized(self.cu_seqlens, ("packing", B * T), lambda: row)

    @classmethod
    def of_cu_seqlens(cls, cu_seqlens, T: int) -> "Packing":
        """The Packing of one row of ``T`` tokens cut by ``cu_seqlens [n + 1]``, memoised on that tensor."""
        return memoized(cu_seqlens, ("packing", T), lambda: cls(sequence_ids(cu_seqlens, T)[None]))

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

    def per_token(self, x):
        """A per-sequence ``[n, 1, ...]`` tensor (APT's pooled gate) -> ``[B, T, ...]``, each token its sequence's."""
        B, T = self.shape
        return x[:, 0][self.seq].reshape(B, T, *x.shape[2:])

    def row_weights(self, w):
        """Attention maps of the batch as one packed row, ``[1, H, B*T, L + B*T]`` -> ``[B, H, T, L + T]``: each
        row's queries over the prefix and that row's own keys (other rows' keys hold probability 0)."""
        B, T = self.shape
        _, H, _, LT = w.shape
        L = LT - B * T
        rows = w.view(H, B, T, LT)
        keys = rows[..., L:].view(H, B, T, B, T).diagonal(dim1=1, dim2=3)  # [H, T, T, B]: row b's own keys
        return torch.cat([rows[..., :L].permute(1, 0, 2, 3), keys.permute(3, 0, 1, 2)], dim=-1)


# ------------------------------------------------------------------------- a packed attention call, re-padded


def unpacked_call(q, k, v, prefix_k, prefix_v, spec):
    """A packed attention call (``spec.cu_seqlens``, ``B == 1``) as the same call on its sequences right-padded.

    q ``[1, H, T, D]``, k, v ``[1, Hkv, T, D]``, prefix ``[Hkv, L, D]`` or ``[1, Hkv, L, D]``, ``spec`` an
    ``AttentionSpec`` with ``cu_seqlens`` (no bias: a packed call has none). Returns ``(q, k, v, prefix_k,
    prefix_v, spec, packing)``: q ``[n, H, S_max, D]``, k, v ``[n, Hkv, S_max, D]``, the prefix shared
    ``[Hkv, L, D]``, the gate (or APT's gate inputs) per sequence, the key padding mask ``[n, S_max]`` and no
    ``cu_seqlens``. Right padding keeps every real query at its own position t inside its sequence, so causality
    and the window (bottom-right, ``Sq == Sk``) are each sequence's own.
    """
    T = q.shape[2]
    packing = Packing.of_cu_seqlens(spec.cu_seqlens, T)
    prefix_k, prefix_v = (p[0] if p.dim() == 4 else p for p in (prefix_k, prefix_v))
    gate, inputs = spec.gate, spec.gate_inputs
    if gate is not None and gate.shape[1] == T:
        gate = packing.tokens(gate)
    if inputs is not None and inputs.hidden.shape[1] == T:
        inputs = inputs._replace(hidden=packing.tokens(inputs.hidden))
    S = packing.longest
    inner = spec.replace(cu_seqlens=None, key_padding_mask=packing.mask, gate=gate, gate_inputs=inputs,
                         window=effective_window(spec.window, spec.causal, S, S))
    return (packing.heads(q), packing.heads(k), packing.heads(v), prefix_k, prefix_v, inner, packing)


def packed_output(out, packing):
    """The re-padded call's output ``[n, H, S_max, D]`` back in the packed row: ``[1, H, T, D]`` in
    ``[1, T, H, D]`` memory."""
    return packing.pack(out.transpose(1, 2)).transpose(1, 2)
