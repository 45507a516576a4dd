"""Per-row adapters in one call: ``model(..., adapter_names=[...])``, one adapter name per batch row.

``"__base__"`` names the base model alone. The names are checked before any work (a list of one name per row, each
an adapter of this model: the error lists them); the adapters a call names are kept in the order they first
appear, with each row's index into them and each one's batch rows (made once per call from the names, so no layer
syncs to find them).

Prefix methods (P-Tuning v2, APT): the prefix hook (``hooks.prefix_pre_hook``) builds a :class:`RowAdapters`.
Every layer's attention then gets the stacked prefixes of those adapters with the rows' index and the lengths
(``prefix_index``, ``prefix_lengths`` of ``fastprefix.gated_prefix_attention``): row b attends over its own adapter's
prefix, exactly as if it ran alone with that adapter active, and each adapter's parameters get the gradient of its
own rows.

Prompt methods (PT, DePT, ADePT): the prompt hook (``hooks.prompt_pre_hook``) builds a :class:`RowPrompts`, and the
input rewrite (``inputs``) asks it for the call's embeddings and per-token inputs. Each adapter embeds its own rows
at once (its prompt, and DePT's low-rank or ADePT's FFN offset on those rows: a grouped GEMM, as batched LoRA
serving does it), written back into the batch; a row whose prompt is shorter than the call's longest gets hidden
slots (attention mask 0) where they change nothing, and its tokens the positions they have alone (see
:class:`RowPrompts`).

``generate(..., adapter_names=[...])`` (:class:`RowGenerate`, the model's ``generate``) runs the generation with the
names set for its calls on this thread; a call inside it whose batch is k times longer (beam search, several
sequences per row: ``generate`` repeats each row k times in a row) gives each repeat its row's name.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from .state import BASE

ADAPTER_NAMES = "adapter_names"  # the call's keyword argument
_GENERATING = threading.local()  # .stack: (state, names) of the generate calls running on this thread


class RowAdapters:
    """The adapters one call names, per row.

    names: the table's adapters, in first-use order; modules: each one's method module (None for ``"__base__"``);
    index: int64 ``[B]``, row b's table row; members: per table row, the int64 batch rows that use it (made once
    from the names, so no layer syncs to find them); sizes: each adapter's prefix length (0 for ``"__base__"``), and
    lengths the same as int64 ``[A]`` (None when they are all the width); width: the table's L, the longest (at
    least 1).
    """

    def __init__(self, names, modules, index, members, sizes):
        self.names, self.modules, self.index, self.members, self.sizes = names, modules, index, members, sizes
        self.width = max(max(sizes), 1)
        # adapters of one length need no slot hidden: the attention then takes its unmasked formulations
        self.lengths = (None if all(n == self.width for n in sizes)
                        else torch.tensor(sizes, dtype=torch.int64, device=index.device))

    def prefixes(self, base):
        """Every layer's prefixes of every adapter: ``[A, 2N, Hkv, width, D]``, each adapter's zero-padded after its
        length (``base``: any method module of the model, whose shape the base model's zero-length row takes when
        the call names no adapter but ``"__base__"``)."""
        tables = [module() if module is not None else None for module in self.modules]
        ref = next((t for t in tables if t is not None), None)
        if ref is None:
            ref = base()
        padded = [ref.new_zeros(*ref.shape[:2], self.width, ref.shape[-1]) if t is None
                  else F.pad(t, (0, 0, 0, self.width - t.shape[2])) for t in tables]
        return torch.stack(padded)

    @staticmethod
    def layer(prefixes, i):
        """Layer ``i``'s ``(prefix_k, prefix_v)``, each ``[A, Hkv, width, D]``, from :meth:`prefixes`' output."""
        return prefixes[:, 2 * i], prefixes[:, 2 * i + 1]



def check_names(names):
    """ValueError unless ``names`` is a list (or tuple) of adapter names."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per batch row, got {names!r}")


def _table(state, names, batch_size):
    """``(table, rows)`` for a call's ``adapter_names`` (a list of ``batch_size`` adapter names): the adapters it
    names in first-use order, and each row's index into them; or a ValueError saying what is wrong, before any
    work."""
    check_names(names)
    if len(names) != batch_size:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch_size} rows")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown[0]!r} on this model; its adapters are "
                         f"{list(state.adapters)} (and {BASE!r}, the base model alone)")
    table = list(dict.fromkeys(names))
    return table, [table.index(n) for n in names]


def _members(rows, count, device):
    """Per table row, the int64 batch rows that use it."""
    return [torch.tensor([b for b, a in enumerate(rows) if a == t], dtype=torch.int64, device=device)
            for t in range(count)]


def row_adapters(state, names, batch_size, device):
    """The :class:`RowAdapters` of a prefix-method call's ``adapter_names`` (a list of ``batch_size`` adapter
    names), or a ValueError saying what is wrong, before any work."""
    table, rows = _table(state, names, batch_size)
    if state.shift is not None:
        raise ValueError("adapter_names: per-row adapters need prefix_positions='none' (with 'shift' each row's "
                         "positions would depend on its adapter's length, which is not supported yet)")
    modules = [None if n == BASE else state.adapters[n][1] for n in table]
    sizes = [0 if n == BASE else state.adapters[n][0].num_virtual_tokens for n in table]
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    return RowAdapters(table, modules, index, _members(rows, len(table), device), sizes)


def row_prompts(state, names, batch_size, device):
    """The :class:`RowPrompts` of a prompt-method call's ``adapter_names`` (a list of ``batch_size`` adapter
    names), or a ValueError saying what is wrong, before any work."""
    table, rows = _table(state, names, batch_size)
    return RowPrompts(state, [None if n == BASE else state.adapters[n][1] for n in table], rows, device)


class RowPrompts:
    """The prompt each row of one prompt-method call gets, and where the row's slots sit in the call.

    Row b alone is its own sequence: its adapter's ``m_b`` prompt slots, then its ``S`` tokens (``"__base__"``:
    the tokens only, embedded as the base model embeds them). The call is ``M + S`` slots wide, ``M``
    (:attr:`width`) the longest prompt it names, so a row with a shorter prompt has ``M - m_b`` hidden slots: zero
    embeddings, attention mask 0, placed where they change nothing the row computes:

    - decoders (:attr:`front`): in front, ``[hidden ; prompt ; tokens]``, as left padding. Every row's tokens sit
      at columns ``M ..``, so the KV cache and the tokens ``generate`` appends stay aligned; the row's slots get
      the positions they have alone as ``position_ids`` (a decoder that takes none is refused);
    - encoders, and the encoder of an encoder-decoder: after the row, ``[prompt ; tokens ; hidden]``, as right
      padding. Column 0 (the slot BERT's pooler and classifiers read) is the row's own first slot, and the model's
      own numbering of the slots is the row's alone.

    Every method here takes or gives tensors over the call's rows ``[B, ...]``. With one adapter for every row
    (:meth:`active`, a call without ``adapter_names``), or adapters of one prompt length, no slot is hidden
    (:attr:`aligned`) and each method is the one-adapter rewrite: the M prompt slots in front.

    modules: the call's adapters' method modules in first-use order (None: ``"__base__"``); sizes: their prompt
    lengths; members: per adapter, the int64 batch rows that use it (``[None]``: one adapter, all rows); lengths:
    int64 ``[B]``, each row's ``m_b``, and offset: int64 ``[B]``, the column where row b's own sequence starts
    (both None for :meth:`active`).
    """

    def __init__(self, state, modules, adapter_of=None, device=None):
        """``adapter_of``: each row's index into ``modules`` (a list of B ints; None: one module, every row)."""
        self.state, self.modules, self.adapter_of = state, modules, adapter_of
        self.sizes = [0 if m is None else m.num_virtual_tokens for m in modules]
        self.width = max(self.sizes)
        self.aligned = all(n == self.width for n in self.sizes)
        self.front = bool(getattr(state.inputs, "decoder_only", False))
        self.per_row = adapter_of is not None
        if adapter_of is None or len(modules) == 1:
            self.members = [None]
        else:
            self.members = _members(adapter_of, len(modules), device)
        self.lengths = self.offset = None
        if adapter_of is not None:
            self.lengths = torch.tensor([self.sizes[a] for a in adapter_of], dtype=torch.int64, device=device)
            self.offset = self.width - self.lengths if self.front else torch.zeros_like(self.lengths)

    @classmethod
    def active(cls, state):
        """Every row on the active adapter (a call without ``adapter_names``)."""
        return cls(state, [state.module])

    def repeated(self, k):
        """Each row ``k`` times in a row (a multiple-choice call's choices, flattened as the model does)."""
        if self.adapter_of is None or k == 1:
            return self
        return RowPrompts(self.state, self.modules, [a for a in self.adapter_of for _ in range(k)],
                          self.lengths.device)

    # ----------------------------------------------------------------------------------------- embeddings
    def embed(self, input_ids, mask=None):
        """``[B, M+S, d]``: each row's prompt and its tokens with its adapter's offset, for ``input_ids [B, S]``
        (``mask``: their ``[B, S]`` padding mask); hidden slots are zeros. Each adapter embeds its rows at once."""
        M = self.width

        def embedded(module, size, rows):
            ids, sub = self._rows(input_ids, rows), self._rows(mask, rows)
            x = self.state.token_embeddings(ids) if module is None else self.state.embed(ids, sub, module)
            before = M - size if self.front else 0
            return F.pad(x, (0, 0, before, M - size - before)) if size < M else x

        return self._batch(((rows, embedded(module, size, rows))
                            for module, size, rows in zip(self.modules, self.sizes, self.members)), input_ids.shape[0])

    def continuation(self, input_ids, mask):
        """``[B, n, d]``: tokens that continue the rows (decoding steps) with each row's offset, no prompt; ``mask``:
        the unprompted padding mask ``[B, past + n]`` covering them. None when the model's own embedding is right
        for every row (PT and ``"__base__"``)."""
        parts = [(rows, None if module is None else
                  self.state.embed_continuation(self._rows(input_ids, rows), self._rows(mask, rows), module))
                 for module, rows in zip(self.modules, self.members)]
        if all(x is None for _, x in parts):
            return None
        return self._batch(((rows, self.state.token_embeddings(self._rows(input_ids, rows)) if x is None else x)
                            for rows, x in parts), input_ids.shape[0])

    @staticmethod
    def _rows(x, rows):
        return x if x is None or rows is None else x.index_select(0, rows)

    @staticmethod
    def _batch(parts, B):
        """The call's ``[B, ...]`` from each adapter's ``(rows, x)``: ``x`` holds those batch rows (``rows`` None: one
        adapter, ``x`` is the whole batch). Every row belongs to one adapter, so all of it is written."""
        out = None
        for rows, x in parts:
            if rows is None:
                return x
            if out is None:
                out = x.new_empty(B, *x.shape[1:])
            out.index_copy_(0, rows, x)
        return out

    # ------------------------------------------------------------------------------- per-token inputs
    def grow(self, tokens, value, hidden=0):
        """A per-token input ``[B, S]`` -> ``[B, M+S]``: each row's prompt slots hold ``value`` (a number, or a
        ``[B, M+S]`` tensor read at those slots), its tokens ``tokens``, its hidden slots ``hidden``."""
        if self.aligned:
            if isinstance(value, torch.Tensor):
                return torch.cat([value[:, :self.width].to(tokens.dtype), tokens], dim=1)
            head = torch.full((tokens.shape[0], self.width, *tokens.shape[2:]), value, dtype=tokens.dtype,
                              device=tokens.device)
            return torch.cat([head, tokens], dim=1)
        B, S = tokens.shape
        own, hid = self._slots(S)
        m = self.lengths[:, None]
        padded = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # (a column to read when S is 0)
        out = padded.gather(1, (own - m).clamp(0, S))
        out = torch.where(own < m, self._like(value, tokens), out)
        return torch.where(hid, self._like(hidden, tokens), out)

    def _slots(self, S):
        """``own [B, M+S]``: each column's index in its row's own sequence; ``hidden [B, M+S]``: the row's hidden
        slots."""
        own = torch.arange(self.width + S, device=self.lengths.device) - self.offset[:, None]
        return own, (own < 0) | (own >= self.lengths[:, None] + S)

    @staticmethod
    def _like(value, tokens):
        if isinstance(value, torch.Tensor):
            return value.to(tokens.dtype)
        return torch.tensor(value, dtype=tokens.dtype, device=tokens.device)

    def mask(self, mask, S):
        """The call's attention mask ``[B, M+S]`` from the caller's ``[B, S]``: the prompt real, the hidden slots
        hidden. None (every token real) stays None where no slot is hidden."""
        if mask is None:
            if self.aligned:
                return None
            mask = torch.ones(self.lengths.shape[0], S, dtype=torch.long, device=self.lengths.device)
        return self.grow(mask, 1, 0)

    def positions(self, position_ids):
        """The caller's ``position_ids [B, S]`` (counted without the prompt) -> ``[B, M+S]``: each row's prompt
        slots ``0 .. m_b-1``, its tokens moved up by ``m_b``, its hidden slots 0."""
        S = position_ids.shape[-1]
        if self.aligned:
            own = torch.arange(self.width, dtype=position_ids.dtype, device=position_ids.device)
            return self.grow(position_ids + self.width, own.expand(position_ids.shape[0], -1))
        return self.grow(position_ids + self.lengths[:, None].to(position_ids.dtype), self._slots(S)[0], 0)

    def own_positions(self, S):
        """``[B, M+S]`` position ids for a model that numbers the slots itself (``0 ..``, none given): the numbers
        each row's slots get alone, hidden slots 0. None where the model's own numbering is already the rows'
        (no slot hidden, or hidden after the rows)."""
        if self.aligned or not self.front:
            return None
        own, hid = self._slots(S)
        return own.masked_fill(hid, 0)

    def pad_aware_positions(self, input_ids, pad):
        """The position ids a pad-aware embedding (RoBERTa, XLM-R) gives each row's own sequence (the prompt slots
        real, pads and hidden slots ``pad``): ``[B, M+S]``."""
        real = self.grow((input_ids != pad).long(), 1, 0)
        return real.cumsum(1) * real + pad

    def tokens_start(self):
        """The column of each row's first token: M (an int) when the rows are aligned or the hidden slots are in
        front, else int64 ``[B]``."""
        return self.width if self.aligned or self.front else self.offset + self.lengths

    # ------------------------------------------------------------------------ decoding steps (decoders)
    def prompt_mask(self, like):
        """``[B, M]`` in ``like``'s dtype: the attention mask of the M columns in front of a decoder's cached
        tokens (the prompt slots 1, the hidden slots 0)."""
        if self.aligned:
            return torch.ones(like.shape[0], self.width, dtype=like.dtype, device=like.device)
        cols = torch.arange(self.width, device=like.device)
        return (cols >= self.offset[:, None]).to(like.dtype)

    def past_alone(self, past):
        """The tokens each row's cache holds alone, for a cache of ``past`` slots: an int, or int64 ``[B, 1]``."""
        return past if self.aligned else (past - self.offset)[:, None]

    def shift(self):
        """What the caller's position ids move up by: M (an int) when aligned, else each row's ``m_b`` ``[B, 1]``."""
        return self.width if self.aligned else self.lengths[:, None]


@contextlib.contextmanager
def generating(state, names):
    """Inside the block, calls of ``state``'s model on this thread take ``names`` (see :func:`generation_names`)."""
    stack = _GENERATING.__dict__.setdefault("stack", [])
    stack.append((state, list(names)))
    try:
        yield
    finally:
        stack.pop()


def generation_names(state):
    """The names of the innermost ``generate(..., adapter_names=...)`` of ``state``'s model on this thread, or None."""
    return next((n for s, n in reversed(getattr(_GENERATING, "stack", [])) if s is state), None)


def repeated(names, batch_size):
    """``names`` with each repeated as ``generate`` repeats its rows (k times in a row) to fill ``batch_size``."""
    if not names or batch_size % len(names):
        raise ValueError(f"adapter_names: generate was given {len(names)} names, and one of its calls has "
                         f"{batch_size} rows, not a multiple of them")
    k = batch_size // len(names)
    return [n for n in names for _ in range(k)]


class RowGenerate:
    """A fastprefix model's ``generate`` that also takes ``adapter_names`` (one per input row): the generation
    runs with them set for its calls (:func:`generating`). Stored on the instance; ``remove`` takes it away."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __call__(self, *args, adapter_names=None, **kwargs):
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        check_names(adapter_names)
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and inputs.shape[0] != len(adapter_names):
            # checked here: inside, the calls' batches are the rows repeated (beam search), which hides a mismatch
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {inputs.shape[0]} rows")
        with generating(self.state, adapter_names):
            return generate(self.model, *args, **kwargs)
