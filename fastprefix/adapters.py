"""Adapters on disk (``adapter.safetensors`` + ``adapter_config.json``) and ADePT's inference-time fold.

``save_adapter`` writes only the trainable state of one adapter (the active one, or ``adapter_name``'s): its method
module (``fastprefix.*`` tensors, whatever the adapter's name) and any base submodules kept trainable by
``apply(..., trainable=...)`` (``base.*`` tensors). ``load_adapter`` loads into the active adapter, into a named
one, or adds a new named one (``fastprefix.integrations.named``). The JSON holds the
method config, every tensor's shape, the base model's name_or_path, class, config class and fingerprint
(``model_type`` and the sizes the tensors depend on), the fastprefix version and a save id shared with the
tensor file. ``load_adapter`` checks all of it, and that every tensor is finite, before touching the model,
so a bad adapter is a ValueError and the model is left as it was.

Saves don't destroy the previous adapter: both files are written to temporary files in the target
directory and flushed to disk, then renamed over the old ones (tensors first, config last); an exception
at any point restores the old files. Only a process killed between the two renames can leave new tensors
under the old config, and the save id catches that at load (a ValueError, never a silent mix).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import torch
import safetensors
import safetensors.torch

from ._version import __version__
from .config import ADePTConfig, config_from_dict
from .fold import fold_adept_offsets
from .integrations import transformers as integration
from .integrations.families import model_shape
from .integrations.named import add_adapter, adapter_key, check_compatible, known
from .integrations.state import DEFAULT, check_adapter_name, hook, unhook

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "fastprefix-adapter"
_MODULE, _BASE = "fastprefix.", "base."
_FINGERPRINT = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
# prefix methods also fit the number of prefix sites (T5: encoder + decoder blocks; T5EncoderModel: encoder only)
_PREFIX_METHODS = ("p_tuning_v2", "apt")
_SAVE_ID = "fastprefix_save_id"  # safetensors metadata key (and JSON "save_id"): pairs the two files of one save


def _major(version):
    """The major number of a ``"X.Y.Z"`` version string, or None if it is not one."""
    head = version.split(".", 1)[0] if isinstance(version, str) else ""
    return int(head) if head.isdigit() else None


def _trainable_tensors(model, state, name, state_dict=None):
    """``{key: tensor}`` of everything adapter ``name`` holds, from the model or from its full ``state_dict``."""
    named = dict(model.named_modules())
    key = adapter_key(state, name)
    wanted = {_MODULE + k: f"{key}.{k}" for k in state.adapters[name][1].state_dict()}
    for name in state.trainable:
        wanted.update({f"{_BASE}{name}.{k}": f"{name}.{k}" for k in named[name].state_dict()})
    if state_dict is None:
        source = model.state_dict()
    else:
        missing = sorted(v for v in wanted.values() if v not in state_dict)
        if missing:
            raise ValueError(f"state_dict lacks the adapter's tensors {missing}; pass the model's full state dict")
        source = state_dict
    out = {k: source[v] for k, v in wanted.items()}
    sharded = sorted(k for k, v in out.items() if type(v).__name__ == "DTensor")
    if sharded:
        raise ValueError(
            f"the adapter's tensors {sharded} are shards (FSDP2): gather them on every rank with "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)) and pass the result as save_adapter(..., state_dict=...) "
            "on rank 0")
    return out


def _stage(path, data):
    """Write ``data`` (bytes) to a new temporary file next to ``path``, flushed to disk; return its path.

    Created with mode 0o666 less the umask, as ``open`` would create ``path``; removed again on failure.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def write_files(directory, files):
    """Write ``files`` (``(name, bytes)`` pairs, in order) into ``directory`` as one change; return ``directory``.

    Every file is staged first (:func:`_stage`); nothing is replaced unless all were staged, and then
    :func:`_commit` moves them into place in the given order, so a failed write leaves the previous set.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is an existing file, not a folder: an adapter is a folder of two files "
                         f"({WEIGHTS_NAME}, {CONFIG_NAME}); pass a folder path (it is created if needed)")
    os.makedirs(directory, exist_ok=True)
    staged = {}
    try:
        for name, data in files:
            final = os.path.join(directory, name)
            staged[final] = _stage(final, data)
    except BaseException:
        for tmp in staged.values():
            os.remove(tmp)
        raise
    _commit(directory, staged)
    return directory


def _commit(directory, files):
    """Move the staged ``{final path: temporary path}`` into place, in order, as one change.

    Each ``os.replace`` is atomic. If a later rename fails, the files already replaced are restored from
    hard links (or copies) of their previous versions, so the directory holds the old set or the new one.
    Temporary files and backups never outlive the call.
    """
    backups, done = {}, []
    try:
        for final, tmp in files.items():
            if os.path.exists(final):
                backups[final] = f"{tmp}.old"
                try:
                    os.link(final, backups[final])
                except OSError:  # a file system without hard links
                    shutil.copy2(final, backups[final])
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for final in reversed(done):
            if final in backups:
                os.replace(backups.pop(final), final)
            else:
                os.remove(final)
        raise
    finally:
        for leftover in [*files.values(), *backups.values()]:
            if os.path.exists(leftover):
                os.remove(leftover)
    if hasattr(os, "O_DIRECTORY"):  # make the renames themselves durable (POSIX); best effort, the save is done
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def save_adapter(model, directory, *, adapter_name=None, state_dict=None):
    """Write one of ``model``'s fastprefix adapters to ``directory`` (created if needed). Returns the directory.

    ``adapter_name``: which (None: the active one; see ``fastprefix.list_adapters``). The files are the same
    whatever the name: ``load_adapter`` can load them into any model, under any name.
    ``state_dict``: the model's full state dict to take the tensors from, for a sharded model (FSDP2), whose
    own tensors are shards: gathered on every rank, saved from one (see the README's FSDP2 recipe).
    A failed save leaves the previous adapter in ``directory`` as it was (see the module docstring).
    """
    state = integration.state_of(model)
    model = integration.unwrap(model)
    name = state.active if adapter_name is None else adapter_name
    known(state, name)
    config = state.adapters[name][0]
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in _trainable_tensors(model, state, name, state_dict).items()}
    save_id = uuid.uuid4().hex
    meta = {
        "format": FORMAT,
        "fastprefix_version": __version__,
        "save_id": save_id,
        "method": config.method,
        "config": config.to_dict(),
        "trainable": list(state.trainable),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "base_model": {
            "name_or_path": getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""),
            "class": type(model).__name__,
            "config_class": type(model.config).__name__,
            "shape": state.shape.to_dict(),
        },
    }
    weights = safetensors.torch.save(tensors, metadata={"format": "pt", "fastprefix": FORMAT, _SAVE_ID: save_id})
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    # the config, which names the save, last
    return write_files(directory, ((WEIGHTS_NAME, weights), (CONFIG_NAME, text)))


def read_adapter_json(directory, what):
    """The parsed ``adapter_config.json`` of ``directory`` (fastprefix's and PEFT's share the name); a missing
    file or invalid JSON is a ValueError, the missing file's saying the folder is not ``what``."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}; not {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{CONFIG_NAME} in {directory!r} is not valid JSON: {e}") from None


def _read_meta(directory):
    meta = read_adapter_json(directory, "a fastprefix adapter")
    if isinstance(meta, dict) and "peft_type" in meta and meta.get("format") != FORMAT:
        raise ValueError(f"{directory!r} holds a PEFT adapter ({meta.get('peft_type')}), not a fastprefix one: load it "
                         "with fastprefix.from_peft(model, directory)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{CONFIG_NAME} in {directory!r} is not a fastprefix adapter config (format != {FORMAT!r})")
    for key, kind in (("config", dict), ("tensors", dict), ("base_model", dict), ("trainable", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{CONFIG_NAME} in {directory!r} lacks a valid {key!r} entry")
    if not isinstance(meta["base_model"].get("shape"), dict):
        raise ValueError(f"{CONFIG_NAME} in {directory!r} lacks the base model's shape fingerprint")
    version, ours = meta.get("fastprefix_version"), __version__
    if _major(version) is None:
        raise ValueError(f"{CONFIG_NAME} in {directory!r} lacks a valid fastprefix_version (got {version!r})")
    if _major(version) > _major(ours):
        raise ValueError(f"the adapter in {directory!r} was written by fastprefix {version}, a newer major version "
                         f"than this fastprefix {ours}; upgrade fastprefix to load it")
    config = config_from_dict(meta["config"])  # ValueError for unknown methods and bad fields
    if meta.get("method") != config.method:
        raise ValueError(f"{CONFIG_NAME}: method {meta.get('method')!r} does not match its config ({config.method!r})")
    return meta, config


def _read_tensors(directory, save_id=None):
    """The tensor file's ``{key: tensor}``; with ``save_id`` (adapters since the id was added), check the
    file belongs to the same save as the JSON."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {WEIGHTS_NAME} in {directory!r}")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            stored = (f.metadata() or {}).get(_SAVE_ID)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type (and OSError) for truncated/corrupt files
        raise ValueError(f"{WEIGHTS_NAME} in {directory!r} is truncated or corrupted: {e}") from None
    if save_id is not None and stored != save_id:
        raise ValueError(f"{WEIGHTS_NAME} in {directory!r} is not the one {CONFIG_NAME} was saved with (save id "
                         f"{stored!r} vs {save_id!r}): a save was interrupted between its two files, or the files "
                         "were mixed; save the adapter again")
    return tensors


def _check_model(meta, model, shape):
    """ValueError unless ``model`` is the kind of model the adapter was trained on (family and sizes)."""
    base = meta["base_model"]
    saved = base["shape"]
    here = f"{shape.model_type!r} model ({type(model).__name__})"
    if saved.get("model_type") != shape.model_type:
        raise ValueError(f"the adapter was trained on a {saved.get('model_type')!r} model ({base.get('class')}), "
                         f"not on a {here}; an adapter only fits the model family it was trained on")
    config_class = base.get("config_class")  # absent from adapters saved before it was recorded
    if config_class is not None and config_class != type(model.config).__name__:
        raise ValueError(f"the adapter was trained on a model configured by {config_class}, this {here} is "
                         f"configured by {type(model.config).__name__}")
    # the sizes the method's tensors depend on (the vocabulary may grow: added tokens do not break an adapter)
    keys = _FINGERPRINT + (("prefix_sites",) if meta.get("method") in _PREFIX_METHODS else ())
    diff = {k: (saved.get(k), v) for k, v in shape.to_dict().items() if k in keys and saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"the adapter was trained on a model of a different shape ({text})")


def _expected_tensors(model, module, config, trainable, shape):
    """``{key: shape}`` the adapter must hold for ``model``: ``module``'s tensors (None: a module built for
    ``config``, without changing the model) and the base submodules ``trainable`` names."""
    module_sd = (module if module is not None else integration.build_module(config, shape)).state_dict()
    out = {_MODULE + k: tuple(v.shape) for k, v in module_sd.items()}
    named = dict(model.named_modules())
    for name in trainable:
        if not isinstance(name, str) or name not in named or name == "":
            raise ValueError(f"the adapter trains base submodule {name!r}, which this model does not have")
        for k, v in named[name].state_dict().items():
            out[f"{_BASE}{name}.{k}"] = tuple(v.shape)
    return out


def load_adapter(model, directory, *, adapter_name=None, backend=None):
    """Load an adapter written by :func:`save_adapter` into ``model``; apply the method first if needed.

    ``adapter_name``: None loads into the active adapter (or, on a model without fastprefix, applies it as
    ``"default"``); a name the model has loads into that adapter; a new name adds the adapter beside the others
    (``fastprefix.add_adapter``'s rules: the same method and prefix wiring; it brings no base submodules, which
    every adapter on the model shares), the active one staying active.

    Raises ValueError (with the model unchanged) for bad JSON, an adapter written by a newer major
    version of fastprefix, a different method than the one applied, a model of another family
    (``model_type``) or shape than the adapter's base model, a truncated/corrupted safetensors file or one
    from another save, and missing, extra, mis-shaped or non-finite tensors. Returns ``model``.
    """
    meta, config = _read_meta(directory)
    outer, model = model, integration.unwrap(model)
    shape = model_shape(model)
    _check_model(meta, model, shape)
    state = integration.state_of(model, required=False)
    name = adapter_name if adapter_name is not None else DEFAULT if state is None else state.active
    check_adapter_name(name)
    adding = state is not None and name not in state.adapters
    module = None
    if adding:
        check_compatible(state, config, name)
        if meta["trainable"]:
            raise ValueError(f"the adapter keeps base submodules {meta['trainable']} trainable: they belong to the base "
                             f"model, which every adapter on it shares, so a second adapter ({name!r}) can't bring "
                             "its own; load it into a model of its own")
    elif state is not None:
        have, module = state.adapters[name]
        if have.method != config.method:
            raise ValueError(f"the model has {have.method!r} applied but the adapter is {config.method!r}; "
                             "call fastprefix.remove(model) first")
        if have != config:
            raise ValueError(f"the adapter's config {config} differs from the applied one {have}"
                             + (f" (adapter {name!r}); load it under a new adapter_name to add it" if
                                len(state.adapters) > 1 or adapter_name is not None else ""))
        if tuple(meta["trainable"]) != state.trainable:
            raise ValueError(f"the adapter trains base submodules {meta['trainable']} but the model was applied with "
                             f"trainable={list(state.trainable)}")
    expected = _expected_tensors(model, module, config, meta["trainable"], shape)
    tensors = _read_tensors(directory, meta.get("save_id"))
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter tensors do not match the method: missing {missing}, unexpected {extra}")
    bad = {k: (tuple(tensors[k].shape), s) for k, s in expected.items() if tuple(tensors[k].shape) != s}
    if bad:
        raise ValueError("adapter tensors have the wrong shapes: "
                         + ", ".join(f"{k} {a} (expected {b})" for k, (a, b) in bad.items()))
    if any(not t.is_floating_point() for t in tensors.values()):
        raise ValueError("adapter tensors must be floating point")
    nonfinite = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise ValueError(f"adapter tensors hold NaN or infinite values: {nonfinite} (a diverged run?)")

    if state is None:
        integration.apply(model, config, backend=backend, trainable=tuple(meta["trainable"]), adapter_name=name)
        state = integration.state_of(model)
    elif adding:
        add_adapter(model, config, name)
    module = state.adapters[name][1]
    named = dict(model.named_modules())
    with torch.no_grad():
        for k, v in module.state_dict(keep_vars=True).items():
            v.copy_(tensors[_MODULE + k])
        for base in meta["trainable"]:
            for k, v in named[base].state_dict(keep_vars=True).items():
                v.copy_(tensors[f"{_BASE}{base}.{k}"])
    if name == state.active:
        unmerge(model)  # a fold of the old weights would be stale
    return outer


def _merged_guard(module, args, kwargs):
    """Forward pre-hook while merged: a training forward would train nothing in the FFN, so refuse it."""
    state = integration.state_of(module)
    if state.disabled:  # fastprefix.disabled: the base model runs, the folded table is not used
        return
    ffn = [p for n, p in state.module.named_parameters() if n != "prompt"]
    if module.training and torch.is_grad_enabled() and any(p.requires_grad for p in ffn):
        raise RuntimeError("fastprefix: this ADePT model is merged (fastprefix.merge): its embeddings come from a "
                           "folded snapshot of the FFN, which would get no gradient and go stale; call "
                           "fastprefix.unmerge(model) before training (inference: model.eval() or torch.no_grad())")


def merge(model):
    """ADePT: fold the FFN offsets into a copy of the embedding table, so inference runs plain PT on it.

    The model then gives the same outputs as the unmerged ADePT model (dropout off), at PT's cost. The
    fold is a snapshot: a forward in training mode with gradients enabled (while the FFN requires grad)
    raises until :func:`unmerge`. Returns ``model``.
    """
    state = integration.state_of(model)
    if not isinstance(state.config, ADePTConfig):
        raise ValueError(f"merge folds ADePT's token-wise FFN offsets into the embedding table; the applied method "
                         f"{state.config.method!r} has nothing to fold")
    mod, weight = state.module, state.input_embedding.table()  # the rows as the model embeds them (scale included)
    p = mod.cast_params(weight)
    folded = fold_adept_offsets(weight, p["down_weight"], p["down_bias"], p["up_weight"], p["up_bias"])
    unmerge(model)
    mod.register_buffer(integration.FOLDED, folded, persistent=False)
    hook(state, integration.unwrap(model), _merged_guard)  # recorded: fastprefix.remove takes it off too
    return model


def unmerge(model):
    """Drop the folded table of :func:`merge`: the ADePT FFN runs again. Returns ``model``."""
    state = integration.state_of(model)
    module = state.module
    if integration.FOLDED in module._buffers:
        delattr(module, integration.FOLDED)
    unhook(state, _merged_guard)
    return model
