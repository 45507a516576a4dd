"""APT's gate at one prefix site, from what the call's context recorded: :func:`layer_gate`.

The gate's input is the hidden states entering the site's layer, recorded in the call's
``context.ForwardContext`` by a pre-hook (``hooks.apt_layer_pre_hook``, DeBERTa's own layer hook). With
``gate="pooled"`` on causal attention each position pools the real tokens up to it; while decoding with a KV cache
the earlier tokens' running sums ride on the cache (:class:`Running`, under the attribute :data:`RUNNING`), checked
against the cache at every step. Each site's mean gate is recorded for the probe (``fastprefix.gate_report``).
"""

from __future__ import annotations

import torch

from .. import ops
from ..reference.attention import token_alpha

RUNNING = "_fastprefix_pooled_gate"  # attribute on a KV cache: site -> Running (APT's causal pooled gate)


class Running:
    """APT's causal pooled gate while decoding: the earlier tokens' gate-logit sum and count, kept on the cache.

    seen: the number of cache positions covered; total ``[B, L]``: sum of ``h W`` over the real ones (no
    bias); count ``[B]``: how many were real; last_key ``[B, Hkv, D]``: the layer's key at position
    ``seen - 1``, which tells a reordered or rewritten cache (beam search, assisted decoding) apart.
    """

    def __init__(self, seen, total, count, last_key):
        self.seen, self.total, self.count, self.last_key = seen, total, count, last_key


def _recorded(ctx, module, i):
    """The hidden states ``[B, S, d]`` the call's context recorded for site ``i`` (kept while training, for a
    checkpoint recompute)."""
    hidden = ctx.hidden.get(i) if module.training else ctx.hidden.pop(i, None)
    if hidden is None:
        raise RuntimeError(f"APT: no hidden states were recorded for layer {i}; the layer's forward pre-hook "
                           "did not run (call the model, not its attention modules)")
    return hidden


def layer_gate(ctx, module, i, query_mask, causal, key):
    """The gate keyword arguments of site ``i``'s attention module ``module`` (APT), in the dtype of ``key``.

    From the hidden states the call's context recorded for the site (``ctx.hidden``); ``query_mask``: the queries'
    padding mask ``[B, Sq]`` (None: all real). Records the site's mean gate (:meth:`ForwardContext.record_gate`)
    and, for the causal pooled gate on a KV cache, the running statistics on the cache (:class:`Running`).
    """
    hidden = _recorded(ctx, module, i).to(key.dtype)
    if ctx.rows is not None:
        return _row_gate(ctx, module, i, hidden, query_mask, causal, key)
    apt = ctx.state.module
    pooled_causal = apt.config.gate == "pooled" and causal
    cache = ctx.caches.get(i)
    seen = tokens_seen(cache, module, key) if pooled_causal else None
    past = past_totals(cache, i, key, seen, hidden.shape[1]) if pooled_causal else None
    gate = apt.gate_kwargs(i, hidden, query_mask, causal=causal, past=past)
    alpha = None
    if "gate_hidden" in gate and ops.attention_backend(ctx.backend, key.device, key.dtype) == "torch":
        # the reference path builds the token gate with torch ops anyway: build it here, once, for the attention
        # and the probe (the ops the reference would run, so the same bits)
        built, alpha = _built(gate)
        gate = dict(gate=built)
    if pooled_causal and cache is not None:
        total, count = apt.pooled_totals(i, hidden, query_mask, past=past)
        cache.__dict__.setdefault(RUNNING, {})[i] = Running(seen, total, count, key[:, :, -1].clone())
    if ctx.state.record_gates and i not in ctx.gate_stats:  # a checkpoint recompute does not record again
        ctx.record_gate(i, mean_gate(apt, i, hidden, query_mask, causal, past) if alpha is None
                        else _mean_over_real(alpha.detach(), query_mask))
    return gate


def _built(gate):
    """``(gate tensor, alpha)`` of :meth:`AdaptivePrefix.gate_kwargs`' token-gate inputs: ``layer_scale * alpha``,
    ``alpha = sigmoid(h W + b)``, with the ops the reference path would run on them."""
    alpha = token_alpha(gate["gate_hidden"], gate["gate_weight"], gate["gate_bias"])
    return gate["layer_scale"] * alpha, alpha


def _row_gate(ctx, module, i, hidden, query_mask, causal, key):
    """Per-row adapters: each row's gate from its own adapter's gate weights, ``[B, Sq, width]`` (the table's
    width; zero after an adapter's length, where its prefix slots are hidden anyway). Not recorded for the probe
    (it reads one adapter's gates)."""
    rows = ctx.rows
    B, S, _ = hidden.shape
    if causal and tokens_seen(ctx.caches.get(i), module, key) > S and any(
            m is not None and m.config.gate == "pooled" for m in rows.modules):
        raise ValueError("adapter_names: APT's causal pooled gate keeps running statistics per adapter while decoding, "
                         "which per-row adapters do not support yet; decode such rows with one adapter per call")
    gate = hidden.new_zeros(B, S, rows.width)
    for a, (apt, n) in enumerate(zip(rows.modules, rows.sizes)):
        if apt is None:  # the base model alone: no prefix slot to gate
            continue
        sel = rows.members[a]
        mask = None if query_mask is None else query_mask.index_select(0, sel)
        kw = apt.gate_kwargs(i, hidden.index_select(0, sel), mask, causal=causal)
        g = kw["gate"] if "gate" in kw else _built(kw)[0]
        gate[sel, :, :n] = g.expand(sel.shape[0], S, n)
    return dict(gate=gate)


def packed_gate(ctx, module, i, packing, causal, key):
    """The gate keyword arguments of site ``i`` for a packed call: the ``[B, T]`` batch run as one row
    ``[1, B * T]`` (``packing``: its ``fastprefix.sequences.Packing``), in the dtype of ``key``.

    APT's token gate reads each token's own hidden state (the gate inputs of the row, no gather). The pooled gate
    pools each packed sequence's own tokens (its hidden states gathered per sequence; on causal attention each
    position the sequence's tokens up to it) and gives every token its sequence's row: ``gate [1, B * T, L]``. No
    running statistics are kept (decode from an unpacked prompt). Records the site's mean gate over the real
    tokens, as :func:`layer_gate` does.
    """
    hidden = _recorded(ctx, module, i).to(key.dtype)
    apt = ctx.state.module
    B, T, d = hidden.shape
    tokens = None  # the hidden states gathered per sequence [n, S_max, d], where the gate needs them
    if apt.config.gate == "token":
        gate = apt.gate_kwargs(i, hidden.reshape(1, B * T, d))
    else:
        tokens = packing.tokens(hidden)
        per_sequence = apt.gate_kwargs(i, tokens, packing.mask, causal=causal)["gate"]
        rows = packing.pack(per_sequence) if causal else packing.per_token(per_sequence)  # [B, T, L]
        gate = dict(gate=rows.reshape(1, B * T, rows.shape[-1]))
    if ctx.state.record_gates and i not in ctx.gate_stats:
        # detached: the probe's gather must save nothing for autograd (a checkpoint recompute does not record)
        probe = packing.tokens(hidden.detach()) if tokens is None else tokens.detach()
        ctx.record_gate(i, mean_gate(apt, i, probe, packing.mask, causal, None))
    return gate


def tokens_seen(cache, module, key):
    """How many tokens the layer's KV cache has taken, this call's included: its keys, or more where a
    sliding-window cache (``DynamicSlidingWindowLayer``) dropped the oldest (its ``get_seq_length`` counts them)."""
    idx = getattr(module, "layer_idx", None)
    if cache is not None and isinstance(idx, int) and callable(getattr(cache, "get_seq_length", None)):
        n = int(cache.get_seq_length(idx))
        if n >= key.shape[2]:
            return n
    return key.shape[2]


def past_totals(cache, i, key, seen, Sq):
    """``(total [B, L], count [B])`` of the ``seen - Sq`` tokens before this call's ``Sq`` (None at position 0)."""
    past = seen - Sq
    if past == 0:
        return None
    run = getattr(cache, RUNNING, {}).get(i) if cache is not None else None
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
def mean_gate(apt, i, hidden, query_mask, causal, past):
    """APT probe: the mean gate alpha (before lambda) per prefix token over the real query tokens, ``[L]`` float32."""
    dt = hidden.dtype
    alpha = ops.apt_gate(hidden.detach(), apt.gate_weight[i].detach().to(dt), apt.gate_bias[i].detach().to(dt),
                         torch.ones((), dtype=dt, device=hidden.device), mode=apt.config.gate,
                         key_padding_mask=query_mask, causal=causal, past=past)
    return _mean_over_real(alpha, query_mask)


def _mean_over_real(alpha, query_mask):
    """The mean of ``alpha [B, S|1, L]`` over the real query tokens: ``[L]`` float32."""
    if alpha.shape[1] > 1 and query_mask is not None:
        w = query_mask.to(alpha.dtype).unsqueeze(-1)
        return ((alpha * w).sum(dim=(0, 1)) / w.sum().clamp_min(1)).float()
    return alpha.mean(dim=(0, 1)).float()
