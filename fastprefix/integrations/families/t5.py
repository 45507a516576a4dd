"""Prefix methods (P-Tuning v2, APT) on T5-family encoder-decoders: T5, mT5 and UMT5.

Placement. Every self-attention gets its own prefix: the encoder's (one per encoder block) and the decoder's
(one per decoder block). The cross-attention gets none: it attends to the encoder's output as the base model
does. PEFT's prefix tuning (``PeftModelForSeq2SeqLM``) puts its prefix in the decoder's self-attention only:
it builds cross-attention entries from the same table but replaces the cross-attention cache with an empty
one, so the cross-attention sees the encoder output alone, and it passes nothing to the encoder. fastprefix
matches that decoder placement and adds the encoder's self-attention (the encoder is where P-Tuning v2 puts
its prefix on encoder models). A model without a decoder (``T5EncoderModel``) has the encoder sites only.

Sites. The sites are numbered encoder blocks first, then decoder blocks: site ``s`` is slot ``2s`` (keys)
and ``2s + 1`` (values) of the prefix module, and APT's gate ``s``. The module has one "layer" per site
(``ModelShape.prefix_sites``: ``num_layers + num_decoder_layers`` on ``T5ForConditionalGeneration``), which
the adapter fingerprint records, so an adapter moves only between models with the same sites.

Position bias. T5 adds its relative position bias ``[1, H, Sq, Sk]`` (computed for the real keys) to the
logits of the real keys; the prefix gets no bias (``attn_bias`` of :func:`fastprefix.gated_prefix_attention`,
as the P-Tuning v2 code pads DeBERTa's relative scores with zeros for the prefix). T5 does not scale the
logits (``scaling = 1``), the prefix logits neither. (PEFT's prefix sits in the cache at positions before the
real tokens and gets the bias of those positions: a PEFT T5 prefix adapter gives other outputs here.)

Where the prefix is computed. ``generate`` runs the encoder on its own (``model.get_encoder()(...)``) and then
the model with ``encoder_outputs``, so each stack (``T5Stack``) gets the forward pre-hook that computes the
prefixes into its call's context; the context travels down the stack's keyword arguments to its blocks and
attention functions. Encoder and decoder calls have separate contexts (with ``prefix_dropout``, independent
dropout masks on their disjoint slots). The decoder's prefix is never put in the KV cache.

APT's gate at a site comes from that site's query-side hidden states: the hidden states entering the block
(the self-attention's input, before its layer norm). ``gate="pooled"``: the encoder pools its real tokens,
the decoder each position's real tokens up to it, with the running sums on the decoder's cache when decoding.

The cross-attention still runs through the ``"fastprefix"`` attention function (the model's attention
implementation is one name for all its attention modules): :meth:`T5Family.plain_attention` computes it exactly as
the base model does (its position bias, padding mask and attention dropout).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import mark_layers, prefix_pre_hook
from ..state import hook, mark
from .base import Family

# model_type -> the family's name in messages. LongT5 (local attention), SwitchTransformers (routed experts) and
# other encoder-decoders (BART, Pegasus, Marian, ...) are refused by the generic family.
TITLES = {"t5": "T5", "mt5": "mT5", "umt5": "UMT5"}


def title(model):
    """The family name if ``model`` is a T5-family model (T5, mT5, UMT5: any head, encoder-only included)."""
    return TITLES.get(str(getattr(getattr(model, "config", None), "model_type", "")))


def stacks(model):
    """``[stack]``: the model's ``T5Stack``-like modules, the encoder before the decoder (either may be absent)."""
    found = [m for _, m in model.named_modules() if isinstance(getattr(m, "block", None), nn.ModuleList)
             and type(m).__name__.endswith("Stack") and hasattr(m, "is_decoder")]
    return sorted(found, key=lambda m: bool(m.is_decoder))  # stable: encoder(s) first


@functools.lru_cache(maxsize=None)
def _routes_position_bias(cls):
    """Whether ``cls.forward`` calls transformers' attention function with the ``position_bias`` keyword."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source and "position_bias=position_bias" in source


def _attention_of(model, block, i, sub, attr):
    """``block.layer[sub].<attr>``, checked to route through the attention function with ``position_bias``."""
    name = type(model).__name__
    layers = getattr(block, "layer", None)
    attn = getattr(layers[sub], attr, None) if isinstance(layers, nn.ModuleList) and len(layers) > sub else None
    if attn is None or not hasattr(attn, "is_causal") or not _routes_position_bias(type(attn)):
        raise ValueError(f"prefix methods are not supported on {name}: block {i} ({type(block).__name__}) has no "
                         f"{attr} that calls transformers' attention function with its position_bias, as the "
                         f"{title(model)} layout fastprefix supports does (this transformers version may differ)")
    return attn


def cross_attentions(model):
    """The decoder's cross-attention modules (no prefix: :meth:`T5Family.plain_attention` runs them)."""
    return [block.layer[1].EncDecAttention for stack in stacks(model) if stack.is_decoder for block in stack.block]


class T5Family(Family):
    """T5, mT5 and UMT5 (see the module docstring)."""

    name = "T5"

    def matches(self, model):
        return title(model) is not None

    def prefix_sites(self, model):
        """The number of prefix sites (self-attentions): encoder and decoder blocks."""
        return sum(len(s.block) for s in stacks(model)) or None

    def prefix_layers(self, model, shape):
        """``[(block, self_attention)]`` for every prefix site, in site order (encoder blocks, then decoder blocks).

        ValueError (naming the model) if the layout is not the T5 one: one encoder and/or one decoder stack whose
        blocks hold ``layer[0].SelfAttention`` (and, in the decoder, ``layer[1].EncDecAttention``), each calling
        transformers' attention function with T5's ``position_bias``.
        """
        name = type(model).__name__
        found = stacks(model)
        kinds = [bool(s.is_decoder) for s in found]
        if not found or kinds.count(False) > 1 or kinds.count(True) > 1:
            raise ValueError(f"prefix methods are not supported on {name}: fastprefix expects one encoder and/or one "
                             f"decoder stack with a `block` list, found {len(found)} stacks")
        sites = []
        for stack in found:
            for i, block in enumerate(stack.block):
                sites.append((block, _attention_of(model, block, i, 0, "SelfAttention")))
                if stack.is_decoder:
                    _attention_of(model, block, i, 1, "EncDecAttention")
        return sites

    def install(self, state, model, layers):
        """Hook each stack (generate runs the encoder alone) with the prefix pre-hook, number the self-attentions
        (causal in the decoder), and give the cross-attentions the State without a site index: the "fastprefix" attention runs them as
        :meth:`plain_attention`."""
        for stack in stacks(model):
            hook(state, stack, prefix_pre_hook)
        # the decoder's self-attention is causal: said here, not read from the module (transformers 5.17's UMT5
        # builds it with is_causal=False and leaves causality to its mask)
        mark_layers(state, layers, causal=[bool(stack.is_decoder) for stack in stacks(model) for _ in stack.block])
        for attn in cross_attentions(model):
            mark(state, attn)

    def plain_attention(self, module, query, key, value, attention_mask, scaling, dropout, position_bias,
                        output_attentions):
        """An attention without a prefix (T5's cross-attention), as the base model computes it.

        ``softmax(scaling * q k^T + position_bias, padded keys hidden) v`` with the base model's attention dropout in
        training. query ``[B, H, Sq, D]``; key, value ``[B, H, Sk, D]``; attention_mask None or ``[B, Sk]`` bool
        (True = real key); position_bias None or broadcastable to ``[B, H, Sq, Sk]``. A hidden key gets the dtype's
        lowest value, as transformers' eager mask. Returns ``([B, Sq, H, D], weights [B, H, Sq, Sk] or None)``.
        """
        device = query.device.type
        if torch.is_autocast_enabled(device):  # as the prefix path: one dtype for every input
            dt = torch.get_autocast_dtype(device)
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        dt = query.dtype
        bias = None if position_bias is None else position_bias.to(dt)
        if attention_mask is not None:
            lowest = torch.tensor(torch.finfo(dt).min, dtype=dt, device=query.device)
            bias = torch.where(~attention_mask[:, None, None, :], lowest, 0.0 if bias is None else bias)
        p = dropout if module.training else 0.0
        if not output_attentions:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=p, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if bias is not None:
            scores = scores + bias
        half = dt in (torch.float16, torch.bfloat16)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32 if half else None).to(dt)
        out = torch.matmul(F.dropout(weights, p=p, training=p > 0), value)
        return out.transpose(1, 2).contiguous(), weights


FAMILY = T5Family()
