"""🤗 PEFT adapters in and out: :func:`from_peft` and :func:`to_peft`.

PEFT writes a prompt-learning adapter as ``adapter_config.json`` plus ``adapter_model.safetensors`` holding one
tensor, ``prompt_embeddings``, and the weights of the base model's ``modules_to_save`` (a classifier head):

- ``PREFIX_TUNING``: ``[L, 2*N*Hkv*D]``, every layer's prefix keys/values: viewed as ``[L, 2N, Hkv, D]``, layer
  i's key is slot ``2i`` and its value slot ``2i+1`` (PEFT sizes the heads ``Hkv`` and ``D`` after the key/value
  heads: GQA). That is fastprefix's P-Tuning v2 table, in the same order. With ``prefix_projection`` PEFT saves
  the MLP's *output* (the same ``[L, 2*N*Hkv*D]`` table), never the MLP, so the loaded adapter holds the table.
  PEFT passes the prefix as ``L`` cached tokens, which moves the real tokens' positions up by ``L``: the
  adapter loads as P-Tuning v2 with ``prefix_positions="shift"``.
- ``PROMPT_TUNING``: ``[m, d]``, the prompt prepended to the input embeddings: fastprefix's prompt tuning.

Only decoder-only and encoder-only adapters (``num_transformer_submodules=1``) are read or written.
"""

from __future__ import annotations

import json
import os

import torch
import safetensors
import safetensors.torch

from .adapters import CONFIG_NAME, FORMAT, read_adapter_json, write_files  # PEFT's file has fastprefix's name
from .config import ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config
from .integrations import transformers as integration
from .integrations.families import model_shape
from .integrations.named import known

WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
PREFIX, PROMPT = "PREFIX_TUNING", "PROMPT_TUNING"
# the PEFT task type of a transformers head class (name suffix); a bare base model is FEATURE_EXTRACTION
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


# ---------------------------------------------------------------------------------------------------- reading
def _read_config(path):
    cfg = read_adapter_json(path, "a PEFT adapter directory (as save_pretrained writes it)")
    if not isinstance(cfg, dict):
        raise ValueError(f"{CONFIG_NAME} in {path!r} is not a JSON object")
    kind = cfg.get("peft_type")
    if kind is None and cfg.get("format") == FORMAT:
        raise ValueError(f"{path!r} holds a fastprefix adapter, not a PEFT one: load it with "
                         "fastprefix.load_adapter(model, directory)")
    if kind == "P_TUNING":
        raise ValueError(f"the PEFT adapter in {path!r} is P_TUNING (a prompt encoder MLP/LSTM over the virtual "
                         f"tokens), which is no fastprefix method; from_peft loads {PREFIX} and {PROMPT} adapters")
    if kind not in (PREFIX, PROMPT):
        raise ValueError(f"the PEFT adapter in {path!r} is {kind!r}; from_peft loads {PREFIX} and {PROMPT} adapters "
                         "(LoRA and the other PEFT methods change the base model's weights, not its input or "
                         "attention)")
    if cfg.get("num_transformer_submodules", 1) not in (1, None) or cfg.get("task_type") == "SEQ_2_SEQ_LM":
        raise ValueError(f"the PEFT adapter in {path!r} is for an encoder-decoder (task_type "
                         f"{cfg.get('task_type')!r}, num_transformer_submodules="
                         f"{cfg.get('num_transformer_submodules')}); from_peft loads decoder-only and encoder-only "
                         "adapters")
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{CONFIG_NAME} in {path!r}: {key} must be a positive int, got {value!r}")
    return cfg


def _read_tensors(path):
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        other = " (only a pickled adapter_model.bin: save with safe_serialization=True)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise ValueError(f"no {WEIGHTS_NAME} in {path!r}{other}")
    try:
        with safetensors.safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type (and OSError) for truncated/corrupt files
        raise ValueError(f"{WEIGHTS_NAME} in {path!r} is truncated or corrupted: {e}") from None


def _expected(cfg, shape, model):
    """``(fastprefix config, prompt_embeddings shape)`` for the PEFT config on ``model``, or ValueError."""
    name = f"{type(model).__name__} ({shape.model_type})"
    L = cfg["num_virtual_tokens"]
    if cfg["peft_type"] == PREFIX:
        want = dict(num_layers=shape.num_layers, num_attention_heads=shape.num_kv_heads,
                    token_dim=shape.num_kv_heads * shape.head_dim)
        what = "layers, key/value heads and key/value width (num_key_value_heads x head_dim)"
        config = PTuningV2Config(num_virtual_tokens=L, prefix_positions="shift")
        rows = (L, 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim)
    else:
        width = shape.embedding_size or shape.hidden_size
        want = dict(token_dim=width)
        what = "input-embedding width"
        config = PromptTuningConfig(num_virtual_tokens=L, prompt_init="normal")
        rows = (L, width)
    diff = {k: (cfg[k], v) for k, v in want.items() if cfg[k] != v}
    if diff:
        text = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"the PEFT {cfg['peft_type']} adapter was trained on another model than this {name}: its "
                         f"{what} differ ({text})")
    return config, rows


def _heads(cfg, tensors, model, path):
    """``{submodule name: {param: tensor}}`` of the adapter's ``modules_to_save`` weights (classifier heads)."""
    named = dict(model.named_modules())
    out = {}
    for key, tensor in tensors.items():
        if key == PROMPT_KEY:
            continue
        name, _, param = key.rpartition(".")
        for prefix in ("base_model.model.", "base_model."):
            if name.startswith(prefix) and name[len(prefix):] in named:
                name = name[len(prefix):]
        module = named.get(name)
        wanted = cfg.get("modules_to_save") or ()
        if module is None or not any(name == m or name.endswith("." + m) for m in wanted):
            raise ValueError(f"{WEIGHTS_NAME} in {path!r} holds {key!r}, which is neither {PROMPT_KEY!r} nor a weight "
                             f"of a module this {type(model).__name__} has in the adapter's modules_to_save "
                             f"{list(wanted)}")
        out.setdefault(name, {})[param] = tensor
    for name, params in out.items():
        own = named[name].state_dict()
        if set(params) != set(own):
            raise ValueError(f"the adapter's {name!r} weights {sorted(params)} do not match the model's {sorted(own)}")
        bad = {k: (tuple(t.shape), tuple(own[k].shape)) for k, t in params.items() if t.shape != own[k].shape}
        if bad:
            raise ValueError(f"the adapter's {name!r} weights have other shapes than the model's: "
                             + ", ".join(f"{k} {a} (model {b})" for k, (a, b) in bad.items()))
    return out


def from_peft(model, path, *, backend=None):
    """Load the PEFT adapter directory ``path`` (``save_pretrained``'s output) into ``model``; returns ``model``.

    ``PREFIX_TUNING`` (with or without ``prefix_projection``) becomes P-Tuning v2 with
    ``prefix_positions="shift"`` holding PEFT's prefix table (``[L, 2*N*Hkv*D]``); ``PROMPT_TUNING`` becomes
    prompt tuning with PEFT's prompt ``[m, d]``. The base model's ``modules_to_save`` (a classifier head) are
    loaded too and stay trainable (``apply(..., trainable=...)``). The model then gives the outputs of
    ``PeftModel.from_pretrained(model, path)`` on the same inputs.

    Raises ValueError, leaving ``model`` untouched, for any other PEFT method (LoRA, P_TUNING, ...), an
    encoder-decoder adapter, sizes that do not fit ``model`` (layers, key/value heads and width, embedding
    width), a missing, truncated or corrupted file, unexpected, mis-shaped, non-float or non-finite tensors, and
    a model with fastprefix already applied. PEFT records no fingerprint of the base model beyond these sizes
    (only its name): an adapter of another model with the same sizes cannot be told apart.
    """
    path, inner = os.fspath(path), integration.unwrap(model)
    if integration.state_of(inner, required=False) is not None:
        raise ValueError(f"fastprefix is already applied to this {type(inner).__name__}; call fastprefix.remove(model) "
                         "first")
    cfg = _read_config(path)
    shape = model_shape(inner)
    config, rows = _expected(cfg, shape, inner)
    tensors = _read_tensors(path)
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{WEIGHTS_NAME} in {path!r} has no {PROMPT_KEY!r} tensor (has {sorted(tensors)})")
    table = tensors[PROMPT_KEY]
    if tuple(table.shape) != rows:
        raise ValueError(f"{PROMPT_KEY} in {path!r} is {list(table.shape)}, expected {list(rows)} for "
                         f"{cfg['peft_type']} with num_virtual_tokens={cfg['num_virtual_tokens']} on this "
                         f"{type(inner).__name__}")
    heads = _heads(cfg, tensors, inner, path)
    floats = [table, *(t for p in heads.values() for t in p.values())]
    if any(not t.is_floating_point() for t in floats):
        raise ValueError(f"the tensors in {WEIGHTS_NAME} must be floating point")
    nonfinite = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise ValueError(f"{WEIGHTS_NAME} in {path!r} holds NaN or infinite values in {nonfinite}")

    integration.apply(inner, config, backend=backend, trainable=tuple(heads))
    try:
        named = dict(inner.named_modules())
        with torch.no_grad():
            module = integration.method_module(inner)
            target = module.prompt if isinstance(config, PromptTuningConfig) else module.embedding
            target.copy_(table)
            for name, params in heads.items():
                for k, v in named[name].state_dict(keep_vars=True).items():
                    v.copy_(params[k])
    except BaseException:
        integration.remove(inner)
        raise
    return model


# ---------------------------------------------------------------------------------------------------- writing
def _task_type(model):
    name = type(model).__name__
    for suffix, task in _TASKS:
        if name.endswith(suffix):
            return task
    if model.base_model is model:
        return "FEATURE_EXTRACTION"
    if model.can_generate() and not getattr(model.config, "is_encoder_decoder", False):
        return "CAUSAL_LM"  # GPT2LMHeadModel and other decoder heads named otherwise
    raise ValueError(f"to_peft: PEFT has no task type for a {name} (it knows causal LMs, sequence and token "
                     "classifiers, question answering and bare base models)")


def _exportable(config, module):
    """``(peft_type, table [rows, width])`` of an adapter, or ValueError saying what can be exported."""
    can = ("P-Tuning v2 with prefix_positions='shift' (as PREFIX_TUNING) and prompt tuning (as PROMPT_TUNING)")
    if type(config) is PTuningV2Config:
        if config.prefix_positions != "shift":
            raise ValueError(
                "to_peft: this P-Tuning v2 adapter was trained with prefix_positions='none' (the prefix takes no "
                "positions), but PEFT puts the prefix in the KV cache, which moves the real tokens' positions up by "
                f"L={config.num_virtual_tokens}: under PEFT it would give other outputs. Train with "
                f"PTuningV2Config(prefix_positions='shift') to export; to_peft writes {can}")
        with torch.no_grad():
            table = module.embedding if module.projection is None else module.projection(module.embedding)
        return PREFIX, table
    if type(config) is PromptTuningConfig:
        return PROMPT, module.prompt
    if isinstance(config, APTConfig):
        why = "APT's token and layer gates have no PEFT counterpart"
    elif isinstance(config, ADePTConfig):
        why = ("ADePT's FFN offsets on the token embeddings have no PEFT counterpart (after fastprefix.merge they "
               "live in a folded copy of the embedding table, which a PEFT prompt-tuning adapter cannot carry)")
    elif isinstance(config, DePTConfig):
        why = "DePT's position-wise low-rank offsets on the token embeddings have no PEFT counterpart"
    else:
        why = f"{type(config).__name__} has no PEFT counterpart"
    raise ValueError(f"to_peft cannot export the applied {config.method!r} adapter: {why}; to_peft writes {can}")


def to_peft(model, path, *, adapter_name=None):
    """Write one of ``model``'s fastprefix adapters (``adapter_name``; None: the active one) to the directory
    ``path`` in PEFT's format; returns ``path``.

    P-Tuning v2 with ``prefix_positions="shift"`` becomes ``PREFIX_TUNING`` (with ``prefix_projection``, the
    MLP's output table, as PEFT itself saves it), prompt tuning becomes ``PROMPT_TUNING``; base submodules kept
    trainable (``apply(..., trainable=...)``) become ``modules_to_save``. ``PeftModel.from_pretrained(base, path)``
    then gives this model's outputs. Anything else (APT, DePT, ADePT, P-Tuning v2 with
    ``prefix_positions="none"``) is a ValueError saying what can be exported. A failed write leaves a previous
    adapter in ``path`` as it was.
    """
    path, state, inner = os.fspath(path), integration.state_of(model), integration.unwrap(model)
    name = state.active if adapter_name is None else adapter_name
    known(state, name)
    config, module = state.adapters[name]
    kind, table = _exportable(config, module)
    shape = state.shape
    task = _task_type(inner)
    tensors = {PROMPT_KEY: table.detach().to("cpu", torch.float32).contiguous()}
    named = dict(inner.named_modules())
    for name in state.trainable:
        for k, v in named[name].state_dict().items():
            tensors[f"base_model.{name}.{k}"] = v.detach().to("cpu").contiguous()  # as PEFT names them
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ValueError("to_peft: the adapter holds NaN or infinite values (a diverged run?)")
    L = config.num_virtual_tokens
    meta = {
        "peft_type": kind,
        "task_type": task,
        "inference_mode": True,
        "base_model_name_or_path": getattr(inner.config, "_name_or_path", "") or None,
        "revision": None,
        "num_virtual_tokens": L,
        "num_transformer_submodules": 1,
        "num_layers": shape.num_layers,
        "modules_to_save": list(state.trainable) or None,
    }
    if kind == PREFIX:
        token_dim = shape.num_kv_heads * shape.head_dim
        meta.update(token_dim=token_dim, num_attention_heads=shape.num_kv_heads, init_weights=None,
                    prefix_projection=bool(config.prefix_projection),
                    encoder_hidden_size=config.projection_hidden if config.prefix_projection else token_dim)
    else:
        meta.update(token_dim=tensors[PROMPT_KEY].shape[1], num_attention_heads=shape.num_heads,
                    prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                    tokenizer_kwargs=None)
    return write_files(path, ((WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt"})),
                              (CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())))

