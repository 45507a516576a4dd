"""The model's own input embedding, as the prompt methods must reproduce it: ``X = get_input_embeddings()(ids)``.

Three kinds, decided once at ``apply`` by running the module on a few ids and comparing bit for bit:

- ``plain``: an ``nn.Embedding`` whose forward is the table lookup: the fused ops read the table.
- ``scaled``: a ``*ScaledWordEmbedding`` (Gemma 1/2/3, BART, BioGPT, XGLM, ...) that multiplies the looked-up
  rows by ``embed_scale`` (a float, or a 0-dim buffer cast to the table's dtype): the fused ops take the
  scale. The prompt is not scaled (it is trained in the space the layers see, as PEFT does).
- ``module``: anything else (a custom forward, ``max_norm``): the module runs, and the method's offset and
  the prompt are applied to its output ``[B, S, d]`` (the ops see it as a table of ``B*S`` rows).

Some models scale the module's output themselves, and only when they embed ``input_ids`` (the encoders of
Pegasus, Marian, BlenderbotSmall, MVP, FSMT with ``scale_embedding``): :func:`outer_scale` finds that by
running the model's stack both ways on a few ids, and the scale joins the module's.
"""

from __future__ import annotations

import torch
from torch import nn


def input_embedding(model):
    """The model's input-embedding module (an ``nn.Embedding``, possibly with its own forward: Gemma's scaled one).

    The prompt methods take X from this module as the model does (see :class:`InputEmbedding`); the prompt has its
    width.
    """
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input table (get_input_embeddings() "
                         f"returned {type(emb).__name__}); prompt methods need one")
    return emb


class InputEmbedding:
    """How to get ``X [B, S, d]`` for ``input_ids [B, S]`` from the model's input-embedding ``module``."""

    def __init__(self, module, outer=None):
        self.module = module
        self.outer = outer  # the module whose ``embed_scale`` the model applies to ids only (or None)
        self.kind = _classify(module)
        if outer is not None and self.kind == "plain":
            self.kind = "scaled"

    @property
    def weight(self):
        return self.module.weight

    def scale(self):
        """The scale the module multiplies the looked-up rows by, as the module applies it (None when plain)."""
        if self.kind != "scaled":
            return None
        own = _as_applied(getattr(self.module, "embed_scale", None), self.weight)  # read each time: a buffer is
        outer = None if self.outer is None else _as_applied(self.outer.embed_scale, self.weight)  # replaced by .to()
        if own is None or type(self.module).forward is nn.Embedding.forward:
            return outer
        return own if outer is None else own * outer

    def lookup(self, input_ids):
        """``(ids, table, embed_scale)`` such that ``scale * table[ids]`` is the module's output for ``input_ids``.

        For a module that must run as one, the table is its output flattened to ``[B*S, d]`` and the ids
        number its rows (the ops then add the offset to exactly what the model would have embedded).
        """
        if self.kind != "module":
            return input_ids, self.weight, self.scale()
        x = self.module(input_ids)
        if self.outer is not None:
            x = x * _as_applied(self.outer.embed_scale, self.weight)
        rows = torch.arange(x.shape[0] * x.shape[1], device=input_ids.device).view(input_ids.shape)
        return rows, x.reshape(-1, x.shape[-1]), None

    def table(self):
        """The effective table ``[V, d]`` (for folding ADePT's offsets); a module that runs as one has none."""
        if self.kind == "module":
            raise ValueError(f"the input embedding {type(self.module).__name__} is not a table lookup (fastprefix "
                             "runs it as a module), so ADePT's offsets cannot be folded into it")
        s = self.scale()
        return self.weight if s is None else self.weight * s


def _as_applied(scale, weight):
    """A scale as the models apply it: a tensor buffer in the table's dtype, a float as is (None: no scale)."""
    if isinstance(scale, torch.Tensor):
        return scale.to(weight.dtype)
    return scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


@torch.no_grad()
def outer_scale(model, embedding, encoder_decoder):
    """The module (a stack) whose ``embed_scale`` the model applies to ``input_ids`` but not to ``inputs_embeds``.

    Runs the stack that takes the prompted input (the encoder of an encoder-decoder, else the base model) on
    a few ids, once from ``input_ids`` and once from ``inputs_embeds = embedding(ids)``, in eval mode. Returns
    None when both agree (almost every model), the stack when its ``embed_scale`` makes them agree, and
    raises a ValueError when fastprefix cannot give the model the input it would have built. A stack that
    cannot run on ids alone is not probed.
    """
    stack = model.get_encoder() if encoder_decoder else model.base_model
    pad = getattr(model.config, "pad_token_id", None)
    ids = [i for i in range(min(embedding.weight.shape[0], 8)) if i != pad][:4]
    if len(ids) < 2 or embedding.weight.device.type == "meta" or embedding.max_norm is not None:
        return None  # (max_norm: a lookup renormalises the table in place, so apply must not run one)
    ids = torch.tensor([ids], device=embedding.weight.device)
    modes = {m: m.training for m in stack.modules()}
    stack.eval()
    try:
        want = stack(input_ids=ids)[0]
        x = embedding(ids)
        got = stack(inputs_embeds=x)[0]
        agree = _close(got, want)
        scale = _as_applied(getattr(stack, "embed_scale", None), embedding.weight)
        scaled = None if agree or scale is None else stack(inputs_embeds=x * scale)[0]
    except Exception:  # noqa: BLE001 - a stack that needs more than ids (images, audio) is not probed
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    if agree:
        return None
    if scaled is not None and _close(scaled, want):
        return stack
    raise ValueError(f"{type(model).__name__} embeds input_ids differently from inputs_embeds = "
                     f"get_input_embeddings()(input_ids) ({type(embedding).__name__}), so the prompt methods cannot "
                     "give it the input it would have built")


def _close(a, b):
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())))


def _probe_ids(module):
    V = module.weight.shape[0]
    return torch.arange(min(V, 8), device=module.weight.device)[None]


@torch.no_grad()
def _classify(module):
    """``"plain"``, ``"scaled"`` or ``"module"``: what the module's forward is, checked bit for bit on a few ids."""
    if module.max_norm is not None or module.weight.device.type == "meta":
        return "module"  # max_norm renormalises the table in place at every lookup: never probe it
    if type(module).forward is nn.Embedding.forward:
        return "plain"
    ids = _probe_ids(module)
    got = module(ids)
    rows = nn.functional.embedding(ids, module.weight)
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if torch.equal(got, rows * scale):
            return "scaled"
    elif isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.is_floating_point():
        if torch.equal(got, rows * scale.to(module.weight.dtype)):
            return "scaled"
    if torch.equal(got, rows):
        return "plain"
    return "module"
