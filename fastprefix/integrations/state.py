"""A fastprefix model's :class:`State` (per model, never per call) and how it is attached to the model's modules.

``apply`` builds one State and puts it on the model and on every module it hooks (the plain attribute
:data:`STATE`; transformer layers and attention modules also get their index, :data:`LAYER`). The hooks are
module-level functions that find the State on their module, so ``copy.deepcopy`` and pickling keep a model
consistent. Everything fastprefix puts on a module goes through :func:`hook`, :func:`mark` and :func:`override`,
which record it on the State; :func:`release` (``remove``) and :func:`unhook` (``unmerge``) take it off again.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..modules import AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning

ATTR = "fastprefix"  # the submodule holding the active adapter's trainable state
INACTIVE = "fastprefix_adapters"  # nn.ModuleDict of the other named adapters (there while some adapter is inactive)
DEFAULT = "default"  # the name of the adapter apply creates
STATE = "_fastprefix_state"  # plain attribute: the State, on the model and on every hooked module
LAYER = "_fastprefix_layer"  # plain attribute: the layer index, on hooked layers and attention modules
# plain attribute: whether a prefix site's attention is causal, where its family knows it better than the module's
# own is_causal (transformers 5.17 builds UMT5's decoder self-attention with is_causal=False and masks it causally)
CAUSAL = "_fastprefix_causal"
FOLDED = "folded_embedding"  # ADePT merge(): buffer name on the method module


def folded_of(module):
    """ADePT after ``merge``: the embedding table with the FFN offsets folded in (a non-persistent buffer of the
    method ``module``, so ``.to()`` moves it and adapters never hold it), else None."""
    return getattr(module, FOLDED, None)


class State:
    """What a fastprefix-applied model needs at run time (never saved; rebuilt by apply).

    Nothing here belongs to one call (that is the call's ``context.ForwardContext``) but ``gate_stats``, the probe's
    output: each APT site's mean gate of the latest forward that ran it, written as it is recorded and read by
    ``gate_report`` only.
    """

    def __init__(self, config, module, shape, backend, encoder_decoder, family, adapter_name=DEFAULT):
        self.adapters = {adapter_name: (config, module)}  # every named adapter: name -> (config, module)
        self.active = adapter_name  # the adapter calls use: config and module below are its
        self.shape = shape
        self.backend = backend
        self.encoder_decoder = encoder_decoder
        self.family = family  # the model's family (families.family_of): its attention wiring
        self.gated = isinstance(module, AdaptivePrefix)
        self.record_gates = True
        self.gate_stats = {}  # APT probe: site -> mean token gate per prefix token [L] of its latest forward
        self.layers = []  # prefix methods: the transformer layers
        self.shift = None  # prefix_positions="shift": the positions.Shift that numbers the real tokens
        self.embedding = None  # prompt methods: the model's input nn.Embedding
        self.input_embedding = None  # prompt methods: how X is computed from it (embedding.InputEmbedding)
        self.inputs = None  # prompt methods: how the model numbers and pools the prompted input (inputs.Rules)
        # restored by remove()
        self.requires_grad = {}
        self.trainable = ()  # base submodules kept trainable (saved with the adapter)
        self.attn_implementation = None
        self.sub_implementations = []  # (sub-config, its attention implementation) pairs
        self.hooked = []  # (module, hook function or None) pairs: see hook() and mark()
        self.overrides = []  # (module, attribute, value): instance attributes set by override()
        self.disabled = 0  # depth of `fastprefix.disabled` blocks: while > 0 the hooks leave every call alone

    @property
    def config(self):
        """The active adapter's method config."""
        return self.adapters[self.active][0]

    @property
    def module(self):
        """The active adapter's method module (``model.fastprefix``)."""
        return self.adapters[self.active][1]

    @property
    def num_virtual_tokens(self):
        return self.config.num_virtual_tokens

    def __setstate__(self, d):
        # a model pickled whole (torch.save) and loaded in a fresh process: its config still names the
        # "fastprefix" attention, which transformers only finds registered
        d = dict(d)
        config, module = d.pop("config", None), d.pop("module", None)  # kept as such before named adapters
        self.__dict__.update(d)
        self.__dict__.setdefault("disabled", 0)
        self.__dict__.setdefault("adapters", {DEFAULT: (config, module)})
        self.__dict__.setdefault("active", DEFAULT)
        if self.attn_implementation is not None:
            self.family.register()

    @property
    def folded(self):
        """The active adapter's :func:`folded_of`."""
        return folded_of(self.module)

    # prompt methods: each takes the adapter's ``module`` (default: the active one; per-row calls pass each
    # adapter's, see rows.RowPrompts)
    def _method_embedding(self, input_ids, module, **kw):
        """``module`` on ``input_ids [B, S]`` with X from the model's own embedding module."""
        rows, table, scale = self.input_embedding.lookup(input_ids)
        if isinstance(module, PromptTuning):
            return module(rows, table, embed_scale=scale)
        return module(rows, table, embed_scale=scale, backend=self.backend, **kw)

    def token_embeddings(self, input_ids):
        """``X [B, S, d]``: what the base model embeds ``input_ids`` to (its input-embedding module, and the scale a
        stack applies to the ids it embeds itself): no prompt, no offset. A ``"__base__"`` row's input."""
        rows, table, scale = self.input_embedding.lookup(input_ids)
        x = torch.nn.functional.embedding(rows, table)
        return x if scale is None else x * scale

    def embed(self, input_ids, mask=None, module=None):
        """``[B, m+S, d]``: the prompt and the method's token embeddings. ``mask``: the ``[B, S]`` padding mask;
        ``module``: the adapter's method module (None: the active adapter's).

        X is what the model's input-embedding module gives (its scale included: Gemma's ``sqrt(d)``); the
        prompt is not scaled. DePT's offset row j belongs to the j-th real token, so a left-padded batch is
        embedded with its rows rolled to start at column 0 (the offset op takes rows by column) and rolled
        back: padding-exact.
        """
        module = self.module if module is None else module
        folded = folded_of(module)
        if folded is not None:
            return ops.prompt_tuning_embedding(input_ids, folded, module.prompt.to(folded.dtype))
        lead = None if mask is None or not isinstance(module, DecomposedPrompt) else (mask.cumsum(-1) == 0).sum(-1)
        if lead is None or not bool(lead.any()):
            return self._method_embedding(input_ids, module)
        S, m = input_ids.shape[1], module.num_virtual_tokens
        cols = torch.arange(S, device=input_ids.device)
        out = self._method_embedding(input_ids.gather(1, (cols + lead[:, None]) % S), module)
        back = ((cols - lead[:, None]) % S)[..., None].expand(-1, -1, out.shape[-1])
        return torch.cat([out[:, :m], out[:, m:].gather(1, back)], dim=1)

    def embed_continuation(self, input_ids, mask, module=None):
        """Embeddings of tokens that continue a prompted input (decoding steps): the method's offset, no prompt.

        ``mask``: the unprompted padding mask ``[B, past + n]`` covering them; DePT takes each row's offset
        from its count of earlier real tokens; ``module``: the adapter's method module (None: the active
        adapter's). Returns None when the model's own embedding is already right (PT). No dropout: decoding is
        inference.
        """
        mod = self.module if module is None else module
        folded = folded_of(mod)
        if folded is not None:
            return torch.nn.functional.embedding(input_ids, folded)
        if isinstance(mod, AdaptiveDecomposedPrompt):
            rows, table, scale = self.input_embedding.lookup(input_ids)
            p = mod.cast_params(table)
            return ops.adept_embedding(rows, table, None, p["down_weight"], p["down_bias"], p["up_weight"],
                                       p["up_bias"], embed_scale=scale, backend=self.backend)
        if isinstance(mod, DecomposedPrompt):
            n, s = input_ids.shape[1], mod.config.max_length
            starts = mask[:, :mask.shape[1] - n].sum(-1)
            if int(starts.max()) + n > s:
                raise ValueError(f"DePT: decoding reached token {int(starts.max()) + n} of the input, but "
                                 f"DePTConfig.max_length={s} gives offset rows for {s} tokens only (the input "
                                 f"and the generated tokens must fit: raise max_length or generate fewer tokens)")
            out = None
            for start in starts.unique().tolist():  # rows at the same position share one op call
                rows_b = (starts == start).nonzero().flatten()
                rows, table, scale = self.input_embedding.lookup(input_ids[rows_b])
                p = mod.cast_params(table)
                part = ops.dept_embedding(rows, table, None, p["lora_a"][start:], p["lora_b"],
                                          scaling=mod.config.scaling, embed_scale=scale, backend=self.backend)
                out = part.new_empty(*input_ids.shape, part.shape[-1]) if out is None else out
                out[rows_b] = part
            return out
        return None


# ------------------------------------------------------------------------ what fastprefix puts on modules
def mark(state, module, layer=None, causal=None):
    """Give ``module`` the State (and its layer index, and its family's word on its causality), without a hook: an
    attention module the ``"fastprefix"`` attention finds them on."""
    setattr(module, STATE, state)
    if layer is not None:
        setattr(module, LAYER, layer)
    if causal is not None:
        setattr(module, CAUSAL, bool(causal))
    state.hooked.append((module, None))


def hook(state, module, fn, layer=None, *, after=False, always=False):
    """Give ``module`` the State (and ``layer``), and register ``fn`` on it with the call's keyword arguments:
    a forward pre-hook, or with ``after`` a forward hook (``always``: it also runs when the forward raises)."""
    setattr(module, STATE, state)
    if layer is not None:
        setattr(module, LAYER, layer)
    if after:
        module.register_forward_hook(fn, with_kwargs=True, always_call=always)
    else:
        module.register_forward_pre_hook(fn, with_kwargs=True)
    state.hooked.append((module, fn))


def override(state, module, name, value):
    """Set the instance attribute ``name`` of ``module`` (in front of its class's: a ``forward``, a method)."""
    module.__dict__[name] = value
    state.overrides.append((module, name, value))


def remove_hook(module, fn):
    """Take every forward (pre-)hook ``fn`` off ``module``."""
    for hooks, with_kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                               (module._forward_hooks, module._forward_hooks_with_kwargs)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def unhook(state, fn):
    """Take the hook ``fn`` off every module :func:`hook` put it on, and forget those entries."""
    for entry in [h for h in state.hooked if h[1] is fn]:
        remove_hook(entry[0], fn)
        state.hooked.remove(entry)


def release(state):
    """Take off everything :func:`mark`, :func:`hook` and :func:`override` put on the model's modules."""
    for module, fn in state.hooked:
        if fn is not None:
            remove_hook(module, fn)
        for attr in (STATE, LAYER, CAUSAL):
            module.__dict__.pop(attr, None)
    for module, name, value in state.overrides:
        if module.__dict__.get(name) is value:
            del module.__dict__[name]
    state.hooked, state.overrides = [], []


BASE = "__base__"  # reserved: "no adapter, the base model alone"


def check_adapter_name(name):
    """ValueError unless ``name`` can name an adapter (a non-empty str without '.', not the reserved ``"__base__"``)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {name!r}")
    if name == BASE:
        raise ValueError(f"adapter_name {BASE!r} is reserved: it stands for the base model alone")


# ------------------------------------------------------------------------------------ finding the State
def unwrap(model):
    """The model inside DistributedDataParallel / ``torch.compile`` wrappers (``.module`` / ``._orig_mod``)."""
    while isinstance(model, nn.Module) and STATE not in model.__dict__:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def state_of(model, *, required=True):
    """The fastprefix State of ``model`` (None if not applied and not ``required``); wrappers are looked through."""
    model = unwrap(model)
    state = model.__dict__.get(STATE) if isinstance(model, nn.Module) else None
    if state is None and required:
        raise ValueError(f"fastprefix is not applied to this {type(model).__name__}; call fastprefix.apply first")
    return state


def method_module(model):
    """``model.fastprefix``: the active adapter's trainable module."""
    state_of(model)
    return getattr(unwrap(model), ATTR)
