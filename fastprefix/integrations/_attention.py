"""The ``"fastprefix"`` attention and mask functions registered with 🤗 transformers, and the per-forward context.

transformers builds a mask only for implementations registered with ``AttentionMaskInterface``: an
attention function registered alone silently receives ``attention_mask=None`` and padded batches go
wrong. So both are registered under one name. The mask function hands the layers the 2D key padding
mask ``[B, Sk]`` (True = real key) after checking that the pattern transformers asks for is one the fused
attention expresses: causal or bidirectional, with or without a sliding window (recognised structurally,
see :func:`mask_pattern`); chunked attention, custom overlays and static caches are rejected. The attention
function calls :func:`fastprefix.gated_prefix_attention`, where causality and windows are bottom-right
aligned as in decoding and the prefix is visible to every query. A sliding-window layer's window comes from
the ``sliding_window`` keyword argument the layer hands its attention function (as transformers' flash
attention reads it), its soft-capping from ``softcap`` (Gemma 2's ``attn_logit_softcapping``).

State travels with the forward: the base model's forward pre-hook computes the prefix (after dropout)
into a :class:`ForwardContext` and adds it to the call's keyword arguments as ``fastprefix_context``;
transformers hands ``**kwargs`` down to every layer and to the attention function (Llama, Qwen2, GPT-2,
BERT, RoBERTa, ...). A gradient-checkpointed layer is recomputed from the same keyword arguments, so it
reads the prefix and gate inputs of *its* forward, however many forwards ran before the backward. Nothing
of a forward is left on the model.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .. import ops
from ..modules import PTuningV2Prefix
from . import _packing

NAME = "fastprefix"
KWARG = "fastprefix_context"  # the keyword argument that carries a ForwardContext down the call
_RUNNING = "_fastprefix_pooled_gate"  # attribute on a KV cache: layer -> _Running (APT's causal pooled gate)


class ForwardContext:
    """What one forward of a prefix-method model hands its layers (lives as long as that call and its graph).

    prefixes: ``[2N, Hkv, L, D]``, every layer's prefix keys/values after dropout, computed once per call.
    hidden: APT, layer -> ``[B, S, d]`` hidden states entering the layer (the gate's input).
    caches: APT pooled gate, layer -> the KV cache the layer was called with (None without one).
    gate_stats: APT probe, layer -> mean token gate ``[L]`` of this call (what ``gate_report`` reads).
    backend, output_attentions: as they were when the call started (a recompute in the backward pass
    runs outside ``use_backend`` blocks).
    """

    def __init__(self, state, prefixes, output_attentions):
        self.state = state
        self.backend = state.backend
        self.prefixes = prefixes
        self.output_attentions = bool(output_attentions)
        self.hidden = {}
        self.caches = {}
        self.gate_stats = {}


class _Running:
    """APT's causal pooled gate while decoding: the earlier tokens' gate-logit sum and count, kept on the cache.

    seen: the number of cache positions covered; total ``[B, L]``: sum of ``h W`` over the real ones (no
    bias); count ``[B]``: how many were real; last_key ``[B, Hkv, D]``: the layer's key at position
    ``seen - 1``, which tells a reordered or rewritten cache (beam search, assisted decoding) apart.
    """

    def __init__(self, seen, total, count, last_key):
        self.seen, self.total, self.count, self.last_key = seen, total, count, last_key


def _closure_value(fn, name):
    """The value of the free variable ``name`` of closure ``fn``."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _is_closure_of(fn, factory, *args):
    """``fn`` is a closure made by ``factory`` (the code object of ``factory(*args)``'s), not a look-alike."""
    return getattr(fn, "__code__", None) is factory(*args).__code__ and fn.__closure__ is not None


def _positive_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def mask_pattern(mask_function):
    """``(causal, window)`` of a transformers mask function that fastprefix's attention expresses, else None.

    Recognised by structure, never by name: transformers builds a sliding-window mask function as
    ``and_masks(sliding_window_overlay(W), causal_mask_function)`` (visible iff ``q - W < kv <= q``) or
    ``and_masks(sliding_window_bidirectional_overlay(W), bidirectional_mask_function)`` (``|q - kv| <= W``);
    the closures are matched by their code objects and W is read from the overlay's closure. ``window`` is
    ``(left, right)`` as :func:`fastprefix.gated_prefix_attention` takes it, or None. Anything else (chunked
    attention, other overlays) gives None.
    """
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.bidirectional_mask_function:
        return False, None
    if mask_function is mu.causal_mask_function:
        return True, None
    if not _is_closure_of(mask_function, mu.and_masks, mu.causal_mask_function):
        return None
    parts = _closure_value(mask_function, "mask_functions")
    if len(parts) != 2:
        return None
    overlay, base = parts
    if base is mu.causal_mask_function and _is_closure_of(overlay, mu.sliding_window_overlay, 1):
        w = _closure_value(overlay, "sliding_window")
        return (True, (w - 1, 0)) if _positive_int(w) else None
    if base is mu.bidirectional_mask_function and _is_closure_of(overlay, mu.sliding_window_bidirectional_overlay, 1):
        w = _closure_value(overlay, "sliding_window")
        return (False, (w, w)) if _positive_int(w) else None
    return None


@_packing.packed_mask  # packed sequences: transformers' overlay becomes the [B, T] sequence ids (see _packing)
def fastprefix_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):
    """Mask interface: return the key padding mask ``[B, kv_length]`` (bool, True = real key) or None.

    Causality and the window are not in the returned mask: the attention function applies them from the layer's
    ``is_causal`` and ``sliding_window``. This only checks that the pattern asked for is one of those
    (:func:`mask_pattern`) and that the queries are the last ``q_length`` of the keys, which a sliding-window
    cache that dropped its oldest keys (``DynamicSlidingWindowLayer``) keeps: its keys start at ``kv_offset``
    and the window is measured between slots of that same key tensor.
    """
    from transformers.masking_utils import prepare_padding_mask

    pattern = mask_pattern(mask_function)
    if pattern is None:
        raise NotImplementedError(
            "fastprefix's attention supports causal or bidirectional masks, with or without a sliding window, with "
            f"padding; this model asked for {getattr(mask_function, '__qualname__', mask_function)!r} (chunked "
            "attention or a custom overlay, e.g. bidirectional image tokens); use a prompt method "
            "(PromptTuningConfig, DePTConfig, ADePTConfig)")
    causal, window = pattern
    if (causal or window is not None) and int(q_offset) + q_length != int(kv_offset) + kv_length:
        raise NotImplementedError(
            f"fastprefix aligns causal and windowed masks bottom-right (queries are the last {q_length} of "
            f"{kv_length} keys); this cache gives queries at offset {int(q_offset)} of keys {int(kv_offset)} to "
            f"{int(kv_offset) + kv_length}. Use the default DynamicCache, not a static cache")
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:
        return None
    return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def layer_window(sliding_window, causal):
    """The ``window=(left, right)`` of a layer whose attention got ``sliding_window=W`` (None: no window).

    transformers' convention, what its flash-attention path hands FlashAttention (``(W - 1, W - 1)``): a causal
    layer sees its own key and the ``W - 1`` before it (Mistral, Qwen2, Phi-3, Gemma 2/3: visible iff
    ``q - kv < W``, as their masks say), a bidirectional one ``|q - kv| <= W - 1`` (ModernBERT passes its half
    window + 1, its mask ``|q - kv| <= half window``).
    """
    if sliding_window is None:
        return None
    if not _positive_int(sliding_window):
        raise ValueError(f"the attention got sliding_window={sliding_window!r}; expected None or an int >= 1")
    return (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)


@_packing.padding_free  # packed sequences run unpacked, one row each, and are packed back (see _packing)
def fastprefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface: ``[B, H, Sq, D]`` queries over ``[prefix ; keys]`` -> ``([B, Sq, H, D], weights)``.

    ``weights`` is None, or with ``output_attentions`` each query's probabilities over ``[prefix ; keys]``,
    ``[B, H, Sq, L + Sk]``. Everything is computed in the query's dtype (under ``torch.autocast`` the autocast
    dtype; the float32 parameters are cast, their gradients stay float32). Attention-probability dropout is
    not applied (the fused kernel has none; PEFT-style prefix tuning of a frozen model is normally run with it off).
    """
    state = getattr(module, "_fastprefix_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs the 'fastprefix' attention but was not set up by "
                           "fastprefix.apply; apply the method to the whole model")
    ctx = kwargs.get(KWARG)
    if not isinstance(ctx, ForwardContext):
        raise RuntimeError(f"{type(module).__name__} got no fastprefix context: call the model, not its layers or "
                           f"attention modules (the base model's forward pre-hook passes it down as {KWARG!r})")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"the 'fastprefix' attention expects the 2D boolean key padding mask its mask function "
                         f"builds, got {attention_mask.dtype} {list(attention_mask.shape)}; do not pass 4D masks")
    i = getattr(module, "_fastprefix_layer", None)
    if i is None:  # an attention without a prefix (T5's cross-attention): as the base model computes it
        from ._seq2seq import plain_attention

        return plain_attention(module, query, key, value, attention_mask, scaling, dropout,
                               kwargs.get("position_bias"), ctx.output_attentions)
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # attention is an autocast op (SDPA runs in the autocast dtype); rotary embeddings can hand over float32
        # queries and keys (Llama), and the fused ops want every input in one dtype
        dt = torch.get_autocast_dtype(device)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    dt = query.dtype
    prefix_k, prefix_v = (x.to(dt) for x in PTuningV2Prefix.layer(ctx.prefixes, i))
    causal = bool(kwargs.get("is_causal", module.is_causal))
    window = layer_window(kwargs.get("sliding_window"), causal)
    softcap = kwargs.get("softcap")  # Gemma 2's attn_logit_softcapping: caps the prefix logits too
    query_mask = None if attention_mask is None else attention_mask[:, -query.shape[2]:]
    gate = _gate(ctx, module, i, query_mask, causal, key) if state.gated else {}
    bias = kwargs.get("position_bias")  # T5's relative position bias [1, H, Sq, Sk]: the real keys' only
    if bias is not None and bias.dtype not in (dt, torch.float32):
        bias = bias.to(dt)
    out = ops.gated_prefix_attention(query, key, value, prefix_k, prefix_v, key_padding_mask=attention_mask,
                                     causal=causal, scale=scaling, attn_bias=bias, window=window, softcap=softcap,
                                     backend=ctx.backend, **gate)
    weights = None
    if ctx.output_attentions:
        weights = attention_map(query, key, prefix_k, _gate_tensor(gate), attention_mask, causal, scaling, bias,
                                window=window, softcap=softcap)
    return out.transpose(1, 2).contiguous(), weights


def _gate(ctx, module, i, query_mask, causal, key):
    """The gate keyword arguments of layer ``i``'s attention (APT), in the query's dtype."""
    hidden = ctx.hidden.get(i) if module.training else ctx.hidden.pop(i, None)  # kept for a checkpoint recompute
    if hidden is None:
        raise RuntimeError(f"APT: no hidden states were recorded for layer {i}; the layer's forward pre-hook "
                           "did not run (call the model, not its attention modules)")
    hidden = hidden.to(key.dtype)
    apt = ctx.state.module
    pooled_causal = apt.config.gate == "pooled" and causal
    cache = ctx.caches.get(i)
    seen = _tokens_seen(cache, module, key) if pooled_causal else None
    past = _past_totals(cache, i, key, seen, hidden.shape[1]) if pooled_causal else None
    gate = apt.gate_kwargs(i, hidden, query_mask, causal=causal, past=past)
    if pooled_causal and cache is not None:
        total, count = apt.pooled_totals(i, hidden, query_mask, past=past)
        cache.__dict__.setdefault(_RUNNING, {})[i] = _Running(seen, total, count, key[:, :, -1].clone())
    if ctx.state.record_gates and i not in ctx.gate_stats:  # a checkpoint recompute does not record again
        ctx.gate_stats[i] = _mean_gate(apt, i, hidden, query_mask, causal, past)
    return gate


def _tokens_seen(cache, module, key):
    """How many tokens the layer's KV cache has taken, this call's included: its keys, or more where a
    sliding-window cache (``DynamicSlidingWindowLayer``) dropped the oldest (its ``get_seq_length`` counts them)."""
    idx = getattr(module, "layer_idx", None)
    if cache is not None and isinstance(idx, int) and callable(getattr(cache, "get_seq_length", None)):
        n = int(cache.get_seq_length(idx))
        if n >= key.shape[2]:
            return n
    return key.shape[2]


def _past_totals(cache, i, key, seen, Sq):
    """``(total [B, L], count [B])`` of the ``seen - Sq`` tokens before this call's ``Sq`` (None at position 0)."""
    past = seen - Sq
    if past == 0:
        return None
    run = getattr(cache, _RUNNING, {}).get(i) if cache is not None else None
    if run is None:
        raise ValueError(
            f"APT's causal pooled gate at layer {i}: the KV cache holds {past} earlier tokens but not their running "
            "gate statistics, which fastprefix keeps on the cache this model filled from position 0. Continue "
            "with the cache this fastprefix model returned (as generate does)")
    # the newest earlier key (a sliding-window cache keeps it: it keeps the W - 1 latest)
    newest = key[:, :, key.shape[2] - Sq - 1] if key.shape[2] > Sq else run.last_key
    if run.seen != past or run.total.shape[0] != key.shape[0] or not torch.equal(newest, run.last_key):
        raise ValueError(
            f"APT's causal pooled gate at layer {i}: the KV cache was reordered, cropped or rewritten since the last "
            f"call (it covered {run.seen} tokens of batch {run.total.shape[0]}, now {past} tokens of batch "
            f"{key.shape[0]}), so the running mean of the gate no longer matches it. Beam search and assisted "
            "decoding are not supported with gate='pooled'; use greedy or sampled decoding, or gate='token'")
    return run.total, run.count


@torch.no_grad()
def _mean_gate(apt, i, hidden, query_mask, causal, past):
    """APT probe: the mean gate alpha (before lambda) per prefix token over the real query tokens, ``[L]`` float32."""
    dt = hidden.dtype
    alpha = ops.apt_gate(hidden.detach(), apt.gate_weight[i].detach().to(dt), apt.gate_bias[i].detach().to(dt),
                         torch.ones((), dtype=dt, device=hidden.device), mode=apt.config.gate,
                         key_padding_mask=query_mask, causal=causal, past=past)
    if alpha.shape[1] > 1 and query_mask is not None:
        w = query_mask.to(alpha.dtype).unsqueeze(-1)
        return ((alpha * w).sum(dim=(0, 1)) / w.sum().clamp_min(1)).float()
    return alpha.mean(dim=(0, 1)).float()


def _gate_tensor(gate):
    """The gate as a tensor broadcastable to ``[B, Sq, L]`` from :func:`_gate`'s keyword arguments (None: no gate)."""
    if "gate_hidden" in gate:
        return ops.apt_gate(gate["gate_hidden"], gate["gate_weight"], gate["gate_bias"], gate["layer_scale"])
    return gate.get("gate")


def visible_keys(Sq, Sk, causal, window, device):
    """``[Sq, Sk]`` bool: real key u visible to query t, bottom-right aligned (``t' = t + Sk - Sq``).

    ``causal``: ``u <= t'``; ``window=(left, right)``: ``t' - left <= u <= t' + right`` (-1: unbounded).
    """
    t = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    u = torch.arange(Sk, device=device)[None, :]
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        visible = visible & (u <= t)
    if window is not None:
        left, right = window
        if left >= 0:
            visible = visible & (u >= t - left)
        if right >= 0:
            visible = visible & (u <= t + right)
    return visible


def attention_map(q, k, prefix_k, gate, key_padding_mask, causal, scale, attn_bias=None, *, window=None,
                  softcap=None):
    """Each query's attention probabilities over ``[prefix ; keys]``: ``[B, H, Sq, L + Sk]`` (``output_attentions``).

    The scores of the reference path built explicitly and softmaxed together: ``cap(g * scale * q.Pk)`` for the
    prefix, ``cap(scale * q.k) + attn_bias`` for the real keys, -inf where a key is hidden (padding, causality,
    the window), with ``cap(x) = softcap * tanh(x / softcap)`` when ``softcap`` is set. Half precision
    softmaxes in float32 as eager transformers does.
    q: ``[B, H, Sq, D]``; k: ``[B, Hkv, Sk, D]``; prefix_k: ``[Hkv, L, D]``; gate: None or ``[B|1, Sq|1, L]``;
    attn_bias: None or broadcastable to ``[B, H, Sq, Sk]``; window: None or ``(left, right)``.
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    pk = prefix_k.repeat_interleave(H // Hkv, dim=-3)
    s_prefix = torch.matmul(q, pk.transpose(-1, -2)) * scale
    if gate is not None:
        s_prefix = s_prefix * gate.reshape((1,) * (3 - gate.dim()) + tuple(gate.shape)).unsqueeze(1)
    s_keys = torch.matmul(q, k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)) * scale
    if softcap is not None:
        s_prefix = torch.tanh(s_prefix / softcap) * softcap
        s_keys = torch.tanh(s_keys / softcap) * softcap
    if attn_bias is not None:
        s_keys = s_keys + attn_bias.to(s_keys.dtype)
    visible = visible_keys(Sq, Sk, causal, window, q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    s_keys = s_keys.masked_fill(~visible, float("-inf"))
    half = q.dtype in (torch.float16, torch.bfloat16)
    return torch.softmax(torch.cat([s_prefix, s_keys], dim=-1), dim=-1,
                         dtype=torch.float32 if half else None).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _layer_signature(cls):
    return inspect.signature(cls.forward)


def layer_cache(layer, args, kwargs):
    """The KV cache a transformer layer was called with (``past_key_values``, by keyword or position), or None."""
    for name in ("past_key_values", "layer_past", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    try:
        bound = _layer_signature(type(layer)).bind_partial(layer, *args, **kwargs).arguments
    except TypeError:
        return None
    return next((bound[n] for n in ("past_key_values", "layer_past", "past_key_value") if bound.get(n) is not None),
                None)


def register():
    """Register the pair under ``"fastprefix"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastprefix_attention)
    AttentionMaskInterface.register(NAME, fastprefix_mask)
