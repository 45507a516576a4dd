"""Several named adapters on one model, with PEFT's names: :func:`add_adapter`, :func:`set_adapter`,
:func:`delete_adapter`, :func:`list_adapters`, :func:`active_adapter`, and :func:`activated`, the block the
per-adapter save, export and serving functions run in.

One method per model: every adapter is the same method (the same config class), and for the prefix methods the
same ``prefix_positions`` (it decides how the model is wired); lengths, ranks, projections and gate modes may
differ. The State keeps each adapter's ``(config, module)`` by name, in the order they came, and which one is
active. The active adapter's module is ``model.fastprefix`` (what a one-adapter model has always had); the others
are ``model.fastprefix_adapters[name]``, an ``nn.ModuleDict`` that exists while some adapter is inactive. So
``.to()``, ``state_dict()``, DDP and optimizers see every adapter's parameters, each once, and switching only
moves modules between the two attributes: the Parameter objects stay, and an optimizer built before a switch
keeps training the same tensors.

Base submodules kept trainable (``apply(..., trainable=...)``, a task head) belong to the base model: every adapter
on it shares them.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .positions import Shift
from .state import ATTR, INACTIVE, check_adapter_name, state_of, unwrap
from .transformers import build_module


def list_adapters(model):
    """The names of ``model``'s adapters, in the order they were added (the first is ``"default"`` unless named)."""
    return list(state_of(model).adapters)


def active_adapter(model):
    """The name of the adapter ``model``'s calls use (:func:`set_adapter` changes it)."""
    return state_of(model).active


def known(state, name):
    """ValueError unless ``state``'s model has an adapter named ``name`` (the message lists them)."""
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r} on this model; its adapters are {list(state.adapters)}")


def _not_merged(state, what):
    if state.folded is not None:
        raise ValueError(f"{what}: the active ADePT adapter {state.active!r} is merged (fastprefix.merge); call "
                         "fastprefix.unmerge(model) first")


def check_compatible(state, config, name):
    """ValueError unless an adapter of ``config`` can join ``state``'s model under ``name`` (a new name, the same
    method, the same prefix wiring)."""
    check_adapter_name(name)
    if name in state.adapters:
        raise ValueError(f"this model already has an adapter named {name!r}; its adapters are {list(state.adapters)}")
    if type(config) is not type(state.config):
        raise ValueError(f"one method per model: this model's adapters are {type(state.config).__name__} "
                         f"({state.config.method!r}), not {type(config).__name__} ({config.method!r}); apply it "
                         "to a model of its own")
    ours, theirs = (getattr(c, "prefix_positions", None) for c in (state.config, config))
    if ours != theirs:
        raise ValueError(f"one prefix wiring per model: this model's adapters have prefix_positions={ours!r}, "
                         f"the new one {theirs!r}")


def add_adapter(model, config, adapter_name, *, generator=None):
    """Add a new trainable adapter of ``config`` to ``model`` (which has fastprefix applied) under
    ``adapter_name``; the active adapter stays active. Returns ``model``.

    ``config``: the same config class as the model's adapters (one method per model) and, for the prefix
    methods, the same ``prefix_positions``; lengths, ranks and the rest may differ. The module is created on the
    device of the active one, in float32, in the model's training mode; ``generator`` seeds a vocabulary-initialised
    prompt (``prompt_init="vocab"``) as in ``apply``.
    """
    state = state_of(model)
    check_compatible(state, config, adapter_name)
    _not_merged(state, "add_adapter")
    inner = unwrap(model)
    device = next(state.module.parameters()).device
    module = build_module(config, state.shape).to(device).train(inner.training)
    if state.embedding is not None and getattr(config, "prompt_init", None) == "vocab":
        module.init_prompt_from_vocab(state.embedding.weight, generator=generator)
    _inactive(inner)[adapter_name] = module
    state.adapters[adapter_name] = (config, module)
    return model


def _inactive(inner):
    """``model.fastprefix_adapters``, created when first needed."""
    if INACTIVE not in inner._modules:
        inner.add_module(INACTIVE, nn.ModuleDict())
    return inner._modules[INACTIVE]


def _take(inner, name):
    """Take adapter ``name``'s module out of ``model.fastprefix_adapters`` (dropped when it empties)."""
    store = inner._modules[INACTIVE]
    module = store[name]
    del store[name]
    if not len(store):
        delattr(inner, INACTIVE)
    return module


def set_adapter(model, adapter_name):
    """Make ``adapter_name`` the adapter ``model``'s calls use. Returns ``model``."""
    state = state_of(model)
    known(state, adapter_name)
    if adapter_name == state.active:
        return model
    _not_merged(state, "set_adapter")
    inner = unwrap(model)
    outgoing = inner._modules[ATTR]
    inner._modules[ATTR] = _take(inner, adapter_name)
    _inactive(inner)[state.active] = outgoing
    config = state.adapters[adapter_name][0]
    if getattr(config, "prefix_positions", None) == "shift" and config.num_virtual_tokens != state.shift.L:
        state.shift = Shift(inner, config.num_virtual_tokens)
    state.active = adapter_name
    state.gate_stats = {}  # the probe's record was the previous adapter's
    return model


def delete_adapter(model, adapter_name):
    """Drop the inactive adapter ``adapter_name`` (its parameters leave the model). Returns ``model``.

    The active adapter can't be deleted (:func:`set_adapter` another first; ``fastprefix.remove`` takes them all).
    """
    state = state_of(model)
    known(state, adapter_name)
    if adapter_name == state.active:
        raise ValueError(f"{adapter_name!r} is the active adapter: set_adapter another one first "
                         "(fastprefix.remove(model) removes every adapter)")
    _take(unwrap(model), adapter_name)
    del state.adapters[adapter_name]
    return model


@contextlib.contextmanager
def activated(model, adapter_name):
    """Inside the block ``adapter_name`` is active (None: the active one stays); the active one is back after."""
    state = state_of(model)
    before = state.active
    if adapter_name is not None:
        set_adapter(model, adapter_name)
    try:
        yield state
    finally:
        if state.active != before:
            set_adapter(model, before)


def adapter_key(state, adapter_name):
    """The ``state_dict`` key prefix of an adapter's module: ``"fastprefix"`` for the active one, else
    ``"fastprefix_adapters.<name>"``."""
    return ATTR if adapter_name == state.active else f"{INACTIVE}.{adapter_name}"
