"""The trainable state of each method, as ``nn.Module``s with the reference inits of docs/methods.md.

Prompt methods (PT, DePT, ADePT) map ``input_ids [B, S]`` and the frozen embedding table ``[V, d]``
to the model's input ``[B, m+S, d]``. Prefix methods (P-Tuning v2, APT) produce every layer's prefix
keys/values ``[Hkv, L, D]``; APT adds the per-layer gate parameters. These modules know nothing of
transformers: :mod:`fastprefix.integrations` wires them into a model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .config import ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config


def _kaiming_uniform(shape, fan_in):
    """``kaiming_uniform_(a=sqrt(5))`` as nn.Linear / LoRA use it: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def _expect(config, cls):
    if not isinstance(config, cls):
        raise ValueError(f"expected a {cls.__name__}, got {type(config).__name__}")


class _Float32State(nn.Module):
    """A method's trainable state keeps its precision when the model is cast down: ``model.half()`` or
    ``model.to(torch.bfloat16)`` after ``fastprefix.apply`` casts the frozen base model and leaves these parameters
    float32, as they were created, so their gradients and optimizer updates stay float32 (small updates are not
    rounded away; under ``torch.autocast`` the same holds). Every forward casts them to the dtype it computes in
    (:meth:`cast_params`, the prefix's ``.to``). Device moves and casts up (``double()``) apply as usual; buffers
    (ADePT's folded table) follow the model."""

    def _apply(self, fn, recurse=True):
        kept = {name: p.dtype for name, p in self.named_parameters() if p.is_floating_point()}
        super()._apply(fn, recurse)
        for name, p in self.named_parameters():
            was = kept.get(name)
            if was is not None and p.dtype != was and p.dtype.is_floating_point \
                    and torch.finfo(p.dtype).bits < torch.finfo(was).bits:
                p.data = p.data.to(was)
                if p.grad is not None:
                    p.grad.data = p.grad.data.to(was)
        return self


class _Prompt(_Float32State):
    """A prompt ``[m, d]`` prepended to the input embeddings."""

    def __init__(self, config, hidden_size):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.config = config
        self.hidden_size = hidden_size
        self.prompt = nn.Parameter(torch.randn(config.num_virtual_tokens, hidden_size) * 0.02)

    @property
    def num_virtual_tokens(self):
        return self.prompt.shape[0]

    @torch.no_grad()
    def init_prompt_from_vocab(self, weight, generator=None):
        """Copy ``m`` random rows of the embedding table ``weight [V, d]`` into the prompt (DePT/ADePT init)."""
        rows = torch.randint(0, weight.shape[0], (self.num_virtual_tokens,), generator=generator)
        self.prompt.copy_(weight.detach()[rows.to(weight.device)].to(self.prompt))

    def cast_params(self, weight):
        """The trainable parameters in the table's dtype (the frozen model may run in half precision)."""
        return {name: p.to(weight.dtype) for name, p in self.named_parameters(recurse=False)}


class PromptTuning(_Prompt):
    """PT: ``[P ; E[ids]]``. Parameters: prompt ``[m, d]``."""

    def __init__(self, config: PromptTuningConfig, hidden_size: int):
        _expect(config, PromptTuningConfig)
        super().__init__(config, hidden_size)

    def forward(self, input_ids, weight, *, embed_scale=None):
        """input_ids ``[B, S]``, weight ``[V, d]`` -> ``[B, m+S, d]``; ``embed_scale`` multiplies the looked-up rows
        (a model whose embedding module scales them, e.g. Gemma), not the prompt."""
        return ops.prompt_tuning_embedding(input_ids, weight, self.prompt.to(weight.dtype), embed_scale=embed_scale)


class DecomposedPrompt(_Prompt):
    """DePT: ``[P ; E[ids] + scaling * A[:S] @ B]``. Parameters: prompt ``[m, d]``, lora_a ``[s, r]``, lora_b ``[r, d]``.

    Init: A ~ kaiming_uniform(a=sqrt(5)) (fan_in = r, as the reference's ``[s, r]`` parameter), B = 0,
    so the offset starts at exactly zero.
    """

    def __init__(self, config: DePTConfig, hidden_size: int):
        _expect(config, DePTConfig)
        super().__init__(config, hidden_size)
        self.lora_a = nn.Parameter(_kaiming_uniform((config.max_length, config.rank), fan_in=config.rank))
        self.lora_b = nn.Parameter(torch.zeros(config.rank, hidden_size))

    def forward(self, input_ids, weight, *, embed_scale=None, backend=None):
        """input_ids ``[B, S]`` with ``S <= max_length``, weight ``[V, d]`` -> ``[B, m+S, d]``; ``embed_scale``
        multiplies the looked-up rows, not the prompt."""
        p = self.cast_params(weight)
        return ops.dept_embedding(input_ids, weight, p["prompt"], p["lora_a"], p["lora_b"],
                                  scaling=self.config.scaling, embed_scale=embed_scale, backend=backend)


class AdaptiveDecomposedPrompt(_Prompt):
    """ADePT: ``[P ; X + ReLU(X A + a) B + b]`` with ``X = E[ids]``.

    Parameters: prompt ``[m, d]``, down_weight A ``[d, r]``, down_bias a ``[r]``, up_weight B ``[r, d]``,
    up_bias b ``[d]``; ``m*d + 2*r*d + r + d`` in all. Init: A as ``nn.Linear(d, r)`` (fan_in = d),
    a = b = 0, B = 0, so the FFN starts as the identity. Dropout ``p`` on ``X A + a`` in training.
    """

    def __init__(self, config: ADePTConfig, hidden_size: int):
        _expect(config, ADePTConfig)
        super().__init__(config, hidden_size)
        r = config.rank
        self.down_weight = nn.Parameter(_kaiming_uniform((r, hidden_size), fan_in=hidden_size).t().contiguous())
        self.down_bias = nn.Parameter(torch.zeros(r))
        self.up_weight = nn.Parameter(torch.zeros(r, hidden_size))
        self.up_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, input_ids, weight, *, embed_scale=None, backend=None):
        """input_ids ``[B, S]``, weight ``[V, d]`` -> ``[B, m+S, d]``; ``embed_scale`` multiplies the looked-up rows
        (X = embed_scale * E[ids]), not the prompt."""
        p = self.cast_params(weight)
        mask = None
        if self.training and self.config.dropout > 0:
            keep = 1.0 - self.config.dropout
            shape = (*input_ids.shape, self.config.rank)
            mask = torch.empty(shape, device=weight.device, dtype=weight.dtype).bernoulli_(keep) / keep
        return ops.adept_embedding(input_ids, weight, p["prompt"], p["down_weight"], p["down_bias"],
                                   p["up_weight"], p["up_bias"], dropout_mask=mask, embed_scale=embed_scale,
                                   backend=backend)


class PTuningV2Prefix(_Float32State):
    """P-Tuning v2: learned prefix keys/values for every layer.

    The prefix of all layers is one ``[L, 2*N*Hkv*D]`` table (or the output of the projection MLP when
    ``prefix_projection``), in the reference slot order: layer i's key is slot ``2i`` and its value
    slot ``2i+1``. :meth:`forward` returns ``[2N, Hkv, L, D]``; :meth:`layer` picks one layer's pair.
    Init as the references' ``nn.Embedding``: N(0, 1).
    """

    def __init__(self, config: PTuningV2Config, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int):
        _expect(config, PTuningV2Config)
        super().__init__()
        for name, value in dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                hidden_size=hidden_size).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.config = config
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        L, width = config.num_virtual_tokens, 2 * num_layers * num_kv_heads * head_dim
        if config.prefix_projection:
            self.embedding = nn.Parameter(torch.randn(L, hidden_size))
            self.projection = nn.Sequential(nn.Linear(hidden_size, config.projection_hidden), nn.Tanh(),
                                            nn.Linear(config.projection_hidden, width))
        else:
            self.embedding = nn.Parameter(torch.randn(L, width))
            self.projection = None
        self.dropout = nn.Dropout(config.prefix_dropout)

    @property
    def num_virtual_tokens(self):
        return self.config.num_virtual_tokens

    def forward(self):
        """All layers' prefixes: ``[2N, Hkv, L, D]`` (keys at even slots, values at odd slots)."""
        table = self.embedding if self.projection is None else self.projection(self.embedding)
        table = self.dropout(table)
        L = table.shape[0]
        return table.view(L, 2 * self.num_layers, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)

    @staticmethod
    def layer(prefixes, i):
        """Layer ``i``'s ``(prefix_k, prefix_v)``, each ``[Hkv, L, D]``, from :meth:`forward`'s output."""
        return prefixes[2 * i], prefixes[2 * i + 1]


class AdaptivePrefix(PTuningV2Prefix):
    """APT: the P-Tuning v2 prefix plus, per layer i, a token gate ``sigmoid(h W_i + b_i)`` and a scale ``lambda_i``.

    Parameters beyond P-Tuning v2: gate_weight ``[N, d, L]`` ~ N(0, gate_init_std), gate_bias ``[N, L]`` = 0,
    layer_scale ``[N]`` = layer_scale_init (stored raw).
    """

    def __init__(self, config: APTConfig, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int):
        _expect(config, APTConfig)
        super().__init__(config, num_layers, num_kv_heads, head_dim, hidden_size)
        L = config.num_virtual_tokens
        self.gate_weight = nn.Parameter(torch.randn(num_layers, hidden_size, L) * config.gate_init_std)
        self.gate_bias = nn.Parameter(torch.zeros(num_layers, L))
        self.layer_scale = nn.Parameter(torch.full((num_layers,), float(config.layer_scale_init)))

    def gate_kwargs(self, i, hidden, key_padding_mask=None, *, causal=False, past=None):
        """Keyword arguments of :func:`fastprefix.gated_prefix_attention` that gate layer ``i``.

        hidden: ``[B, S, d]`` entering layer ``i`` (its dtype is the gate's: the parameters are cast to it);
        key_padding_mask: ``[B, S]`` bool, True = real token (pooled mode). Token mode hands the gate inputs to
        the op; pooled mode computes the gate here: ``[B, 1, L]`` from the mean over all real tokens, or with
        ``causal`` the ``[B, S, L]`` running mean up to each position (``past``: :meth:`pooled_totals` of the
        tokens before ``hidden``, when decoding with a cache). See :func:`fastprefix.apt_gate`.
        """
        dt = hidden.dtype
        w, b, lam = self.gate_weight[i].to(dt), self.gate_bias[i].to(dt), self.layer_scale[i].to(dt)
        if self.config.gate == "token":
            return dict(gate_hidden=hidden, gate_weight=w, gate_bias=b, layer_scale=lam)
        return dict(gate=ops.apt_gate(hidden, w, b, lam, mode="pooled", key_padding_mask=key_padding_mask,
                                      causal=causal, past=past))

    def pooled_totals(self, i, hidden, key_padding_mask=None, past=None):
        """Running state of the causal pooled gate after ``hidden [B, S, d]``: ``(total [B, L], count [B])``.

        total: the sum of the real tokens' gate logits ``h W_i`` (no bias; the logit is linear in ``h``, so it is
        the sum of ``h`` times ``W_i``); count: the number of real tokens. ``past`` is added when given.
        """
        keep = (torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if key_padding_mask is None
                else key_padding_mask)
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        pooled = (hidden.to(acc) * keep.unsqueeze(-1)).sum(dim=1)
        total, count = pooled @ self.gate_weight[i].to(acc), keep.sum(dim=1).to(acc)
        if past is not None:
            total, count = total + past[0], count + past[1]
        return total, count
