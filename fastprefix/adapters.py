"""Adapters on disk (``adapter.safetensors`` + ``adapter_config.json``) and ADePT's inference-time fold.

``save_adapter`` writes only the trainable state: the method module (``fastprefix.*`` tensors) and any
base submodules kept trainable by ``apply(..., trainable=...)`` (``base.*`` tensors). The JSON holds the
method config, every tensor's shape, the base model's name_or_path and shape fingerprint, and the
fastprefix version. ``load_adapter`` checks all of it before touching the model, so a bad adapter is a
ValueError and the model is left as it was.
"""

from __future__ import annotations

import json
import os

import torch

from .config import ADePTConfig, config_from_dict
from .integrations import _arch
from .integrations import transformers as integration

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "fastprefix-adapter"
_MODULE, _BASE = "fastprefix.", "base."
_FINGERPRINT = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _version():
    from . import __version__
    return __version__


def _trainable_tensors(model, state):
    """``{key: tensor}`` of everything an adapter holds."""
    out = {_MODULE + k: v for k, v in integration.method_module(model).state_dict().items()}
    named = dict(model.named_modules())
    for name in state.trainable:
        for k, v in named[name].state_dict().items():
            out[f"{_BASE}{name}.{k}"] = v
    return out


def save_adapter(model, directory):
    """Write ``model``'s fastprefix adapter to ``directory`` (created if needed). Returns the directory."""
    state = integration.state_of(model)
    model = integration.unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _trainable_tensors(model, state).items()}
    meta = {
        "format": FORMAT,
        "fastprefix_version": _version(),
        "method": state.config.method,
        "config": state.config.to_dict(),
        "trainable": list(state.trainable),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "base_model": {
            "name_or_path": getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""),
            "class": type(model).__name__,
            "shape": state.shape.to_dict(),
        },
    }
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "fastprefix": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return directory


def _read_meta(directory):
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}; not a fastprefix adapter")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{CONFIG_NAME} in {directory!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{CONFIG_NAME} in {directory!r} is not a fastprefix adapter config (format != {FORMAT!r})")
    for key, kind in (("config", dict), ("tensors", dict), ("base_model", dict), ("trainable", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{CONFIG_NAME} in {directory!r} lacks a valid {key!r} entry")
    if not isinstance(meta["base_model"].get("shape"), dict):
        raise ValueError(f"{CONFIG_NAME} in {directory!r} lacks the base model's shape fingerprint")
    config = config_from_dict(meta["config"])  # ValueError for unknown methods and bad fields
    if meta.get("method") != config.method:
        raise ValueError(f"{CONFIG_NAME}: method {meta.get('method')!r} does not match its config ({config.method!r})")
    return meta, config


def _read_tensors(directory):
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {WEIGHTS_NAME} in {directory!r}")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error type (and OSError) for truncated/corrupt files
        raise ValueError(f"{WEIGHTS_NAME} in {directory!r} is truncated or corrupted: {e}") from None


def _expected_tensors(model, state, config, trainable, shape):
    """``{key: shape}`` the adapter must hold for ``model`` (built without changing the model)."""
    if state is not None:
        module_sd = integration.method_module(model).state_dict()
    else:
        module_sd = integration.build_module(config, shape).state_dict()
    out = {_MODULE + k: tuple(v.shape) for k, v in module_sd.items()}
    named = dict(model.named_modules())
    for name in trainable:
        if not isinstance(name, str) or name not in named or name == "":
            raise ValueError(f"the adapter trains base submodule {name!r}, which this model does not have")
        for k, v in named[name].state_dict().items():
            out[f"{_BASE}{name}.{k}"] = tuple(v.shape)
    return out


def load_adapter(model, directory, *, backend=None):
    """Load an adapter written by :func:`save_adapter` into ``model``; apply the method first if needed.

    Raises ValueError (with the model unchanged) for bad JSON, a different method than the one applied,
    a model whose shape differs from the adapter's base model, a truncated/corrupted safetensors file,
    and missing, extra or mis-shaped tensors. Returns ``model``.
    """
    meta, config = _read_meta(directory)
    outer, model = model, integration.unwrap(model)
    shape = _arch.model_shape(model)
    saved = meta["base_model"]["shape"]
    # the sizes the method's tensors depend on (the vocabulary may grow: added tokens do not break an adapter)
    diff = {k: (saved.get(k), v) for k, v in shape.to_dict().items() if k in _FINGERPRINT and saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"the adapter was trained on a model of a different shape ({text})")
    state = integration.state_of(model, required=False)
    if state is not None:
        if state.config.method != config.method:
            raise ValueError(f"the model has {state.config.method!r} applied but the adapter is {config.method!r}; "
                             "call fastprefix.remove(model) first")
        if state.config != config:
            raise ValueError(f"the adapter's config {config} differs from the applied one {state.config}")
        if tuple(meta["trainable"]) != state.trainable:
            raise ValueError(f"the adapter trains base submodules {meta['trainable']} but the model was applied with "
                             f"trainable={list(state.trainable)}")
    expected = _expected_tensors(model, state, config, meta["trainable"], shape)
    tensors = _read_tensors(directory)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter tensors do not match the method: missing {missing}, unexpected {extra}")
    bad = {k: (tuple(tensors[k].shape), s) for k, s in expected.items() if tuple(tensors[k].shape) != s}
    if bad:
        raise ValueError("adapter tensors have the wrong shapes: "
                         + ", ".join(f"{k} {a} (expected {b})" for k, (a, b) in bad.items()))
    if any(not t.is_floating_point() for t in tensors.values()):
        raise ValueError("adapter tensors must be floating point")

    if state is None:
        integration.apply(model, config, backend=backend, trainable=tuple(meta["trainable"]))
        state = integration.state_of(model)
    module = integration.method_module(model)
    named = dict(model.named_modules())
    with torch.no_grad():
        for k, v in module.state_dict(keep_vars=True).items():
            v.copy_(tensors[_MODULE + k])
        for name in state.trainable:
            for k, v in named[name].state_dict(keep_vars=True).items():
                v.copy_(tensors[f"{_BASE}{name}.{k}"])
    unmerge(model)
    return outer


def merge(model):
    """ADePT: fold the FFN offsets into a copy of the embedding table, so inference runs plain PT on it.

    The model then gives the same outputs as the unmerged ADePT model (dropout off), at PT's cost. The
    fold is a snapshot: call :func:`unmerge` before training further. Returns ``model``.
    """
    state = integration.state_of(model)
    if not isinstance(state.config, ADePTConfig):
        raise ValueError(f"merge folds ADePT's token-wise FFN offsets into the embedding table; the applied method "
                         f"{state.config.method!r} has nothing to fold")
    from .fold import fold_adept_offsets

    mod, weight = state.module, state.embedding.weight
    p = mod._cast(weight)
    folded = fold_adept_offsets(weight, p["down_weight"], p["down_bias"], p["up_weight"], p["up_bias"])
    unmerge(model)
    mod.register_buffer(integration.FOLDED, folded, persistent=False)
    return model


def unmerge(model):
    """Drop the folded table of :func:`merge`: the ADePT FFN runs again. Returns ``model``."""
    module = integration.state_of(model).module
    if integration.FOLDED in module._buffers:
        delattr(module, integration.FOLDED)
    return model
