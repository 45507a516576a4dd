"""What a model family tells fastprefix: the :class:`Family` interface every family module implements.

A family knows one kind of 🤗 transformers model from the inside: whether a model is one of its own
(:meth:`~Family.matches`), where its prefix sites are (:meth:`~Family.prefix_sites`,
:meth:`~Family.prefix_layers`), how the prefix methods reach them (:meth:`~Family.install`), and how an attention
module without a prefix site computes (:meth:`~Family.plain_attention`). ``families.family_of`` picks a model's
family; the State keeps it, so what runs during a forward asks the model's family, not a family module.
"""

from __future__ import annotations

from ..attention import register


class Family:
    """A model family. Every method only reads the model but :meth:`install`; instances hold no state."""

    name = "model"

    def matches(self, model):
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

    def prefix_sites(self, model):
        """The number of prefix sites where that is not ``num_hidden_layers`` (T5: encoder + decoder blocks),
        else None."""
        return None

    def prefix_layers(self, model, shape):
        """``[(layer, self_attention)]`` for every prefix site, in site order; a ValueError naming what is missing
        if the prefix methods cannot be served. ``shape``: the model's ``ModelShape``."""
        raise NotImplementedError

    def install(self, state, model, layers):
        """Route ``model``'s prefix sites ``layers`` (:meth:`prefix_layers`' answer) through the prefix: the hooks
        that start each call, the State and site index on every attention module (see ``hooks``). Everything is
        put on through ``state.hook`` / ``mark`` / ``override``, so ``fastprefix.remove`` takes it off."""
        raise NotImplementedError

    def plain_attention(self, module, query, key, value, attention_mask, scaling, dropout, position_bias,
                        output_attentions):
        """An attention module without a prefix site that runs the ``"fastprefix"`` attention, computed as the base
        model computes it: ``([B, Sq, H, D], weights or None)``."""
        raise RuntimeError(f"{type(module).__name__} runs the 'fastprefix' attention without a prefix site, which "
                           f"a {self.name} model does not have")

    @staticmethod
    def register():
        """Register the ``"fastprefix"`` attention with transformers (idempotent): at ``apply``, and when a model
        pickled whole is loaded in a fresh process."""
        register()
