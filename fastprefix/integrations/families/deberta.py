"""DeBERTa (v2/v3 and v1) with the prefix methods: the prefix inside DeBERTa's own disentangled attention.

DeBERTa's ``DisentangledSelfAttention`` does not go through transformers' ``AttentionInterface``: its logits
are the content score plus the relative-position terms, all at DeBERTa's scale ``s = sqrt(D * f)`` (``f`` = 1 +
one per c2p/p2c term)::

    logit[t, u] = (q_t . k_u) / s + c2p[t, u] + p2c[t, u]

With the prefix, as the original P-Tuning v2 DeBERTa code does (it pads the relative scores with zeros for the
prefix columns), prefix row j gets the content score only, gated by APT::

    logit[t, j] = g[t, j] * (q_t . Pk_j) / s

fastprefix gives each ``DisentangledSelfAttention`` its own ``forward`` (an instance attribute, removed by
``fastprefix.remove``) that projects q, k, v with the module's weights, computes ``c2p + p2c`` for the real keys
with the module's own ``disentangled_attention_bias`` (v1: ``disentangled_att_bias``) and calls
:func:`fastprefix.gated_prefix_attention` with them as ``attn_bias``, so the Triton path runs it too. ``s`` is
computed as DeBERTa computes it (a float32 square root, rounded to the attention's dtype). The key padding mask
is the model's 2D input ``attention_mask``.

The per-forward context (``context.ForwardContext``) cannot travel in keyword arguments here: DeBERTa's base
model swallows ``**kwargs`` and its encoder calls the layers with fixed arguments. It travels like this:

1. ``hooks.prefix_pre_hook`` puts the call's context into the base model's keyword arguments;
2. :func:`_enter` (the next pre-hook on the base model) gives it the 2D padding mask and makes it the current
   call of this thread (``context.enter``) for the duration of the base model's forward; :func:`_exit` (a
   forward hook that runs on errors too) takes it off again;
3. the encoder's ``get_rel_pos`` (:class:`RelativePositions`, an instance attribute) wraps the relative positions
   it computes for every layer with the current call (a :class:`_Carry`), so the call is in each layer's
   arguments before any gradient checkpoint (transformers 5.17 checkpoints a layer's ``__call__``, later
   versions its ``forward``); a non-reentrant checkpoint keeps those arguments, so the recompute during the
   backward pass reads the prefix and gate inputs of *its* forward;
4. :func:`_layer_pre_hook` (APT) records each layer's input for its call; the attention's forward unwraps the
   carry.

Nothing of a forward is left on the model. Not supported (refused clearly): DeBERTa v1's talking heads, 3D/4D
attention masks, the enhanced-mask-decoder steps (``z_steps > 1``: ``query_states``). Attention-probability
dropout is not applied on the prefix path (as everywhere in fastprefix).
"""

from __future__ import annotations

import functools

import torch

from ... import ops
from ...modules import PTuningV2Prefix
from ...reference.attention import attention_probs, gate_of
from ...spec import AttentionSpec
from ..context import KWARG, ForwardContext, current, enter, leave
from ..gates import layer_gate
from ..hooks import prefix_pre_hook
from ..state import LAYER, STATE, hook, mark, override
from .base import Family

MODEL_TYPES = ("deberta-v2", "deberta")


class _Carry:
    """A layer call's ``relative_pos`` argument with that call's ForwardContext (see the module docstring, step 3)."""

    def __init__(self, relative_pos, ctx):
        self.relative_pos, self.ctx = relative_pos, ctx


def _attention_classes():
    """``{model_type: (base model class, its DisentangledSelfAttention class)}`` (imported on first use)."""
    from transformers.models.deberta import modeling_deberta as v1
    from transformers.models.deberta_v2 import modeling_deberta_v2 as v2

    return {"deberta-v2": (v2.DebertaV2Model, v2.DisentangledSelfAttention),
            "deberta": (v1.DebertaModel, v1.DisentangledSelfAttention)}


# hooks: module-level functions that find their state on the module, so deepcopy/pickling stay consistent
def _enter(base, args, kwargs):
    """Make this forward the thread's current DeBERTa call, with the 2D key padding mask of its input."""
    if getattr(getattr(base, STATE), "disabled", 0):  # fastprefix.disabled: the base model runs as it is
        return None
    ctx = kwargs.get(KWARG)
    if not isinstance(ctx, ForwardContext):
        raise RuntimeError(f"{type(base).__name__} got no fastprefix context from its forward pre-hook")
    mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask: {type(base).__name__} with a fastprefix prefix method takes the 2D "
                             f"padding mask [batch, seq_len], got {got}; a 3D/4D attention pattern cannot be "
                             "applied to attention over [prefix ; keys]")
        mask = mask.to(torch.bool)
    ctx.key_padding_mask = mask
    enter(ctx)


def _exit(base, args, kwargs, output):
    """Take this forward's call off the thread's calls (also when the forward raised)."""
    leave(kwargs.get(KWARG))


class RelativePositions:
    """The encoder's ``get_rel_pos`` under a prefix method (stored on the instance): the relative positions it hands
    every layer, with the current call (see the module docstring, step 3)."""

    def __init__(self, encoder, base):
        self.encoder, self.base = encoder, base

    def __call__(self, hidden_states, query_states=None, relative_pos=None):
        relative_pos = type(self.encoder).get_rel_pos(self.encoder, hidden_states, query_states, relative_pos)
        state = getattr(self.base, STATE)
        ctx = None if getattr(state, "disabled", 0) else current(state)
        return relative_pos if ctx is None else _Carry(relative_pos, ctx)


def _layer_pre_hook(layer, args, kwargs):
    """Check that the layer's call carries its model's call (the encoder's relative positions); APT: record the
    layer's input for that call."""
    state = getattr(layer, STATE)
    if getattr(state, "disabled", 0):
        return None
    # (hidden_states, attention_mask, query_states, relative_pos, ...)
    carry = args[3] if len(args) > 3 else kwargs.get("relative_pos")
    if not isinstance(carry, _Carry):
        raise RuntimeError(f"{type(layer).__name__} with a fastprefix prefix method was called outside its model's "
                           "forward; call the model, not its layers")
    if state.gated:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(f"APT: {type(layer).__name__} was called without hidden_states")
        carry.ctx.hidden[getattr(layer, LAYER)] = hidden
    return None


class AttentionForward:
    """The forward of a DeBERTa ``DisentangledSelfAttention`` under a prefix method (stored on the instance)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                 rel_embeddings=None):
        if not isinstance(relative_pos, _Carry) and getattr(getattr(self.module, STATE, None), "disabled", 0):
            # fastprefix.disabled: DeBERTa's own attention (a recompute keeps the path its forward took: the carry)
            return type(self.module).forward(self.module, hidden_states, attention_mask, output_attentions,
                                             query_states, relative_pos, rel_embeddings)
        return attention(self.module, hidden_states, output_attentions, query_states, relative_pos, rel_embeddings)


@functools.lru_cache(maxsize=None)
def _root(head_dim, factor, dtype):
    """DeBERTa's ``s = sqrt(D * factor)`` as it computes it: a float32 square root, rounded to ``dtype``."""
    return float(torch.sqrt(torch.tensor(head_dim, dtype=torch.float32) * factor).to(dtype))


def _projections_v2(module, hidden, relative_pos, rel_embeddings, dtype):
    """DeBERTa v2/v3: ``(q, k, v [B, H, S, D], attn_bias [B, H, S, S] or None, scale)``."""
    B, S, H = hidden.shape[0], hidden.shape[1], module.num_attention_heads
    q, k, v = (module.transpose_for_scores(proj(hidden), H).to(dtype)  # [B*H, S, D], the layout of the bias code
               for proj in (module.query_proj, module.key_proj, module.value_proj))
    factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    bias = None
    if module.relative_attention:
        bias = module.disentangled_attention_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings), factor)
    bias = bias.view(B, H, S, S).to(dtype) if isinstance(bias, torch.Tensor) else None  # no c2p/p2c: 0
    D = q.shape[-1]
    return (*(x.view(B, H, S, D) for x in (q, k, v)), bias, 1.0 / _root(D, factor, dtype))


def _projections_v1(module, hidden, relative_pos, rel_embeddings, dtype):
    """DeBERTa v1: the same, from the fused ``in_proj`` and its q/v biases; q comes pre-scaled (scale 1), as in v1."""
    q, k, v = module.transpose_for_scores(module.in_proj(hidden)).chunk(3, dim=-1)  # [B, H, S, D] each
    q = (q + module.transpose_for_scores(module.q_bias[None, None, :])).to(dtype)
    k = k.to(dtype)
    v = (v + module.transpose_for_scores(module.v_bias[None, None, :])).to(dtype)
    factor = 1 + len(module.pos_att_type)
    q = q / _root(q.shape[-1], factor, dtype)
    bias = None
    if module.relative_attention and rel_embeddings is not None and relative_pos is not None:
        bias = module.disentangled_att_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings), factor)
    bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else None
    return q, k, v, bias, 1.0


def attention(module, hidden_states, output_attentions, query_states, relative_pos, rel_embeddings):
    """DeBERTa's disentangled attention over ``[prefix ; keys]``: ``([B, S, H * D], weights or None)``.

    hidden_states: ``[B, S, d]``; relative_pos: the :class:`_Carry` of :class:`RelativePositions`. ``weights``:
    with ``output_attentions``, each query's probabilities over ``[prefix ; keys]``, ``[B, H, S, L + S]``.
    """
    if not isinstance(relative_pos, _Carry):
        raise RuntimeError(f"{type(module).__name__} with a fastprefix prefix method got no fastprefix context; call "
                           "the model, not its layers or attention modules")
    if query_states is not None:
        raise NotImplementedError(
            f"{type(module).__name__} was called with query_states (DeBERTa's enhanced-mask-decoder steps, "
            "z_steps > 1), which fastprefix's prefix path does not support; set the base model's z_steps to 0")
    ctx, relative_pos = relative_pos.ctx, relative_pos.relative_pos
    mask = ctx.key_padding_mask
    i = getattr(module, LAYER)
    B, S = hidden_states.shape[:2]
    if mask is not None and tuple(mask.shape) != (B, S):
        raise ValueError(f"attention_mask: expected [{B}, {S}] for the layer's input, got {list(mask.shape)}")
    device = hidden_states.device.type
    # the fused ops want one dtype: under autocast the autocast dtype (float32 q/v biases would promote, as in v1)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
    project = _projections_v1 if hasattr(module, "in_proj") else _projections_v2
    q, k, v, bias, scale = project(module, hidden_states, relative_pos, rel_embeddings, dtype)
    if ctx.rows is not None:
        raise ValueError("adapter_names: per-row adapters do not reach DeBERTa's own attention yet; run one adapter "
                         "per call (fastprefix.set_adapter)")
    prefix_k, prefix_v = (x.to(dtype) for x in PTuningV2Prefix.layer(ctx.prefixes, i))
    gate = layer_gate(ctx, module, i, mask, False, k) if ctx.state.gated else {}
    out = ops.gated_prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, scale=scale,
                                     attn_bias=bias, backend=ctx.backend, **gate)
    context = out.permute(0, 2, 1, 3).reshape(B, S, -1)
    weights = None
    if output_attentions:
        spec = AttentionSpec.build(q, k, key_padding_mask=mask, scale=scale, attn_bias=bias, **gate)
        weights = attention_probs(q, k, prefix_k, spec, gate_of(spec))
    return context, weights


class DeBERTaFamily(Family):
    """DeBERTa v1, v2 and v3 (see the module docstring)."""

    name = "DeBERTa"

    def matches(self, model):
        return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPES

    def prefix_layers(self, model, shape):
        """``[(layer, DisentangledSelfAttention)]`` for every layer of a DeBERTa model; a ValueError if it can't be
        served."""
        name, cfg = type(model).__name__, model.config
        base_cls, attn_cls = _attention_classes()[cfg.model_type]
        base = model.base_model
        if not isinstance(base, base_cls):
            raise ValueError(f"prefix methods on {name}: its base model is {type(base).__name__}, not the "
                             f"{base_cls.__name__} whose attention fastprefix knows")
        if getattr(cfg, "talking_head", False):
            raise ValueError(f"prefix methods are not supported on {name} with talking heads "
                             "(config.talking_head=True): they mix the heads' logits and probabilities, which "
                             "attention over [prefix ; keys] per head cannot express; use a prompt method "
                             "(PromptTuningConfig, DePTConfig, ADePTConfig)")
        layers = base.encoder.layer
        if len(layers) != shape.num_layers:
            raise ValueError(f"{name} has {len(layers)} encoder layers, its config says num_hidden_layers="
                             f"{shape.num_layers}")
        found = []
        for i, layer in enumerate(layers):
            attn = getattr(getattr(layer, "attention", None), "self", None)
            if type(attn) is not attn_cls:
                raise ValueError(f"layer {i} of {name}: expected the {attn_cls.__name__} at layer.attention.self, "
                                 f"got {type(attn).__name__}")
            if attn.attention_head_size != shape.head_dim or attn.num_attention_heads != shape.num_heads:
                raise ValueError(f"layer {i} of {name}: {attn.num_attention_heads} heads of width "
                                 f"{attn.attention_head_size}, but the prefix would be sized for {shape.num_heads} of "
                                 f"width {shape.head_dim} (config.attention_head_size is not supported)")
            found.append((layer, attn))
        return found

    def install(self, state, model, layers):
        """The prefix pre-hook and the call stack on the base model, the encoder's ``get_rel_pos`` that hands the
        call down, and on every layer the hook that checks it and the attention ``forward`` that adds the prefix
        (see the module docstring)."""
        base = model.base_model
        hook(state, base, prefix_pre_hook)
        hook(state, base, _enter)
        hook(state, base, _exit, after=True, always=True)
        override(state, base.encoder, "get_rel_pos", RelativePositions(base.encoder, base))
        state.layers = [layer for layer, _ in layers]
        for i, (layer, attn) in enumerate(layers):  # no kwargs reach its layers: its own hooks, not mark_layers'
            mark(state, attn, i)
            hook(state, layer, _layer_pre_hook, layer=i)
            override(state, attn, "forward", AttentionForward(attn))


FAMILY = DeBERTaFamily()
