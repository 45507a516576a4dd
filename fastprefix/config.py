"""One validated, JSON-serialisable config per method.

Every config knows its ``method`` name, checks its values on construction (a bad value is a
ValueError naming the field; every number must be finite), and round-trips through ``to_dict`` /
``from_dict`` / JSON. Configs are values (frozen dataclasses): ``apply`` and the module keep the
object they were given, so a later ``config.gate = "pooled"`` would change a live model and the
adapter it saves; it raises instead. Derive a changed config with ``dataclasses.replace(config, ...)``,
which validates again.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import dataclass
from typing import ClassVar


class ConfigFieldError(TypeError, ValueError):
    """A config given a field it does not have (a TypeError, as for any unknown keyword, and a ValueError, as for
    every other bad config input)."""


# what a field name from PEFT or from habit means here
_ALIASES = {
    "r": "rank", "num_tokens": "num_virtual_tokens", "num_prefix_tokens": "num_virtual_tokens",
    "prefix_length": "num_virtual_tokens", "prompt_length": "num_virtual_tokens",
    "encoder_hidden_size": "projection_hidden", "prompt_tuning_init": "prompt_init", "alpha": "lora_alpha",
    "lora_dropout": "dropout",
}
# field names from PEFT with no setting here, and why
_NO_SUCH = {"task_type": "fastprefix finds the task head from the model itself (apply(..., trainable=...) overrides)"}


def _check_fields(cls, given):
    """ConfigFieldError for every name in ``given`` that is not a field of ``cls``, naming the valid fields and the
    closest one."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [n for n in given if n not in names]
    if not unknown:
        return
    hints = []
    for name in unknown:
        alias = _ALIASES.get(name, "")
        if name in _NO_SUCH:
            hints.append(f"{name!r}: {_NO_SUCH[name]}")
            continue
        guess = alias if alias in names else max(names, key=lambda n: difflib.SequenceMatcher(None, name, n).ratio())
        hints.append(f"{name!r}: did you mean {guess!r}?")
    raise ConfigFieldError(f"unknown {cls.__name__} fields {unknown} ({'; '.join(hints)}); its fields are "
                           f"{', '.join(names)}")


def _positive_int(cfg, name):
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _number(value):
    """A real number that is not a bool (``True`` is an int to Python, never a rate or a scale here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _probability(cfg, name):
    value = getattr(cfg, name)
    if not _number(value) or not 0.0 <= value < 1.0:  # NaN fails the comparison too
        raise ValueError(f"{type(cfg).__name__}.{name} must be a probability in [0, 1), got {value!r}")


def _finite(cfg, name, *, minimum=None, positive=False):
    """A finite real number, ``>= minimum`` or ``> 0`` when asked."""
    value = getattr(cfg, name)
    bound = " > 0" if positive else f" >= {minimum}" if minimum is not None else ""
    if (not _number(value) or not math.isfinite(value) or (positive and value <= 0)
            or (minimum is not None and value < minimum)):
        raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number{bound}, got {value!r}")


def _choice(cfg, name, choices):
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


def _value(cls):
    """``@dataclass(frozen=True)`` whose assignment error says why and what to do instead, and whose unknown
    keyword arguments name the valid fields and the closest one."""
    cls = dataclass(frozen=True)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        _check_fields(type(self), kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = checked_init

    def refuse(self, name, *value):
        raise dataclasses.FrozenInstanceError(
            f"{type(self).__name__} is a value: it cannot change after construction (an applied model and its "
            f"saved adapter keep the config they were built with); make a new one with "
            f"dataclasses.replace(config, {name}=...)")

    cls.__setattr__, cls.__delattr__ = refuse, refuse
    return cls


PREFIX_POSITIONS = ("none", "shift")  # PTuningV2Config / APTConfig.prefix_positions


@_value
class _Config:
    method: ClassVar[str] = ""

    def __post_init__(self):
        # every float field, including ones a subclass adds without its own check: NaN/inf never train anything
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{field.name} must be finite, got {value!r}")

    def to_dict(self):
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data):
        """Rebuild the config of whichever method ``data["method"]`` names."""
        data = dict(data)
        method = data.pop("method", None)
        if method not in CONFIGS:
            raise ValueError(f"unknown method {method!r}; expected one of {sorted(CONFIGS)}")
        return CONFIGS[method](**data)

    @staticmethod
    def from_json(text):
        return _Config.from_dict(json.loads(text))


@_value
class PromptTuningConfig(_Config):
    """Prompt tuning: ``m`` trainable prompt vectors prepended to the input embeddings.

    ``prompt_init``: ``"vocab"`` (copies of random vocabulary rows, as DePT/ADePT do) or ``"normal"``.
    """

    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = 100
    prompt_init: str = "vocab"

    def __post_init__(self):
        super().__post_init__()
        _positive_int(self, "num_virtual_tokens")
        _choice(self, "prompt_init", ("vocab", "normal"))


@_value
class PTuningV2Config(_Config):
    """P-Tuning v2: ``L`` learned prefix keys/values in every layer.

    ``prefix_projection`` reparameterises the prefix through
    ``Embedding(L, d) -> Linear(d, projection_hidden) -> tanh -> Linear(projection_hidden, 2*N*Hkv*D)``;
    ``prefix_dropout`` is the original code's dropout on the prefix (PEFT: none).

    ``prefix_positions``: ``"none"`` (the prefix takes no positions: real tokens keep the positions they have
    without it) or ``"shift"`` (the real tokens' positions move up by ``L``, as when the prefix sits in the KV
    cache: what PEFT's prefix tuning and the original P-Tuning v2 code give on models with absolute or rotary
    positions; needed to match adapters trained there, see :func:`fastprefix.from_peft`).
    """

    method: ClassVar[str] = "p_tuning_v2"
    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    projection_hidden: int = 512
    prefix_dropout: float = 0.0
    prefix_positions: str = "none"

    def __post_init__(self):
        super().__post_init__()
        _positive_int(self, "num_virtual_tokens")
        _positive_int(self, "projection_hidden")
        _probability(self, "prefix_dropout")
        _choice(self, "prefix_positions", PREFIX_POSITIONS)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"{type(self).__name__}.prefix_projection must be a bool, got {self.prefix_projection!r}")


@_value
class APTConfig(PTuningV2Config):
    """APT: P-Tuning v2 plus a token-level gate ``sigmoid(h W + b)`` and a layer-level scale ``lambda``.

    ``gate``: ``"token"`` (one gate per query token, from its own hidden state) or ``"pooled"`` (from the mean
    hidden state of the real tokens: all of them on encoders; on causal attention, position t pools the real
    tokens at positions <= t, as the running mean of their gate logits ``h W``, which equals the logit of their
    mean, so no position sees later tokens; decoding keeps the running sum and count with the KV cache).
    ``layer_scale_init``: initial ``lambda`` (stored raw). ``gate_init_std``: std of W.
    """

    method: ClassVar[str] = "apt"
    gate: str = "token"
    layer_scale_init: float = 1.0
    gate_init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        _choice(self, "gate", ("token", "pooled"))
        _finite(self, "gate_init_std", minimum=0)
        _finite(self, "layer_scale_init")


@_value
class DePTConfig(PromptTuningConfig):
    """DePT: a short prompt plus a position-based low-rank offset ``scaling * A[:S] @ B`` on the embeddings.

    ``max_length`` is the number of offset rows ``s`` (longer inputs are an error); ``scaling`` defaults
    to the reference ``lora_alpha / sqrt(rank)`` with ``lora_alpha = 8``.
    """

    method: ClassVar[str] = "dept"
    num_virtual_tokens: int = 60
    rank: int = 8
    max_length: int = 256
    lora_alpha: float = 8.0

    def __post_init__(self):
        super().__post_init__()
        _positive_int(self, "rank")
        _positive_int(self, "max_length")
        # 0 would zero the offset and its gradients: a method that silently trains only its prompt
        _finite(self, "lora_alpha", positive=True)

    @property
    def scaling(self):
        return self.lora_alpha / math.sqrt(self.rank)


@_value
class ADePTConfig(PromptTuningConfig):
    """ADePT: a short prompt plus a token-shared FFN offset ``ReLU(X A + a) B + b`` on every embedding.

    ``rank`` is the FFN's hidden width ``r``; ``dropout`` applies to ``X A + a`` in training.
    """

    method: ClassVar[str] = "adept"
    num_virtual_tokens: int = 60
    rank: int = 19
    dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        _positive_int(self, "rank")
        _probability(self, "dropout")


CONFIGS = {cls.method: cls for cls in (PromptTuningConfig, PTuningV2Config, APTConfig, DePTConfig, ADePTConfig)}
config_from_dict = _Config.from_dict
config_from_json = _Config.from_json
