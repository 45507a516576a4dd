"""Per-row adapters in one call of a prefix-method model: ``model(..., adapter_names=[...])``.

The prefix hook (``hooks.prefix_pre_hook``) takes ``adapter_names`` out of the call and builds a
:class:`RowAdapters`: the adapters the call names, in the order they first appear (``"__base__"``, the base model
alone, is a zero-length one), each row's index into them, and each one's prefix length. Every layer's attention then
gets the stacked prefixes of those adapters with the rows' index and the lengths (``prefix_index``,
``prefix_lengths`` of ``fastprefix.gated_prefix_attention``): row b attends over its own adapter's prefix, exactly
as if it ran alone with that adapter active, and each adapter's parameters get the gradient of its own rows.

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


def row_adapters(state, names, batch_size, device):
    """The :class:`RowAdapters` of a call's ``adapter_names`` (a list of ``batch_size`` adapter names), or a
    ValueError saying what is wrong, before any work."""
    check_names(names)
    if len(names) != batch_size:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch_size} rows")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown[0]!r} on this model; its adapters are "
                         f"{list(state.adapters)} (and {BASE!r}, the base model alone)")
    if state.shift is not None:
        raise ValueError("adapter_names: per-row adapters need prefix_positions='none' (with 'shift' each row's "
                         "positions would depend on its adapter's length, which is not supported yet)")
    table = list(dict.fromkeys(names))
    modules = [None if n == BASE else state.adapters[n][1] for n in table]
    sizes = [0 if n == BASE else state.adapters[n][0].num_virtual_tokens for n in table]
    rows = [table.index(n) for n in names]
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    members = [torch.tensor([b for b, a in enumerate(rows) if a == t], dtype=torch.int64, device=device)
               for t in range(len(table))]
    return RowAdapters(table, modules, index, members, sizes)


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
    """A prefix-method model's ``generate`` that also takes ``adapter_names`` (one per input row): the generation
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
