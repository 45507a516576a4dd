"""Every row of the benchmark: the same frozen backbone, batch, sequence and prefix/prompt length.

Each contender exposes ``trainable()`` (its parameters), ``forward(input_ids, attention_mask)`` ->
the hidden states of the S real tokens ``[B, S, d]``, and ``train(mode)``. The "original" rows follow
the structure of the methods' public reference code, op by op, re-written here; what each mirrors:

- P-Tuning v2 (THUDM/P-tuning-v2): ``model/prefix_encoder.py`` (``PrefixEncoder``: ``Embedding(L,
  2*N*Hkv*D)``, or the projection MLP) and ``model/sequence_classification.py``
  (``BertPrefixForSequenceClassification.get_prompt`` / ``forward``): the encoder run on ``arange(L)``
  expanded to the batch, viewed ``[B, L, 2N, Hkv, D]``, permuted and split into per-layer key/value
  pairs, handed to the model as ``past_key_values`` with the attention mask extended by L.
- P-Tuning v2 as PEFT does it: the real ``peft.PrefixTuningConfig`` + ``get_peft_model``.
- DePT (ZhengxiangShi/DePT, a PEFT fork): ``peft/tuners/prompt_tuning_lora.py`` (the prompt embedding
  and ``lora_embedding_A [s, r]`` / ``lora_embedding_B [r, d]``) and the seq2seq / causal-LM branch of
  ``peft/peft_model.py``: word embeddings plus ``scaling * (A @ B)`` per position, prompt rows from an
  ``nn.Embedding`` on ``arange(m)`` expanded to the batch, concatenated. (Their sequence-classification
  branch never applies the offset, so it would time plain prompt tuning: we follow the branch that does.)
- ADePT (HungerPWAY/ADePT, the same PEFT fork layout): ``peft/tuners/prompt_tuning_lora.py`` and the
  seq2seq / causal-LM branch of ``peft/peft_model.py``: word embeddings ``X``,
  ``X + ReLU(dropout(X A + a)) B + b``, prompt, concat.
- fastprefix rows: ``fastprefix.apply(model, config)`` (reference path on CPU, Triton on CUDA).
- the floors, one per family (each row states its own): the prompt floor runs the frozen backbone on
  S+m tokens, the prefix floor on the S real tokens, gradients flowing to the input embeddings in both
  (what a prompt method costs at least; what a prefix method costs minus its L prefix columns).

Known costs that differ from the originals, on purpose or by the library: P-Tuning v2 (original) builds
a transformers 5 ``DynamicCache`` from the prefix (the original handed a tuple), which copies each
layer's prefix keys/values once per step (about 0.7% of a MiniLM training step), as PEFT's prefix
tuning does too; dropout is off in every backbone so that all rows do the same work per step.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

import fastprefix


@dataclass
class Setting:
    batch: int = 8
    seq_len: int = 128
    prefix_len: int = 32  # L for prefix methods, m for prompt methods
    adept_rank: int = 19
    dept_rank: int | None = None  # None: match ADePT's budget
    dept_max_length: int | None = None  # None: seq_len
    prefix_projection: bool = False

    def dept_rows(self):
        return self.dept_max_length or self.seq_len

    def resolved_dept_rank(self, d):
        """DePT's rank giving (about) ADePT's trainable budget: r*(s + d) ~ 2*r'*d + r' + d."""
        if self.dept_rank:
            return self.dept_rank
        return max(1, round((2 * self.adept_rank * d + self.adept_rank + d) / (self.dept_rows() + d)))


class Contender:
    name = ""
    family = ""  # "prefix" or "prompt"
    impl = ""  # "original", "peft", "fastprefix" or "floor"
    extra_tokens = 0  # tokens the backbone sees beyond the S real ones (floors)

    def __init__(self, backbone, shapes, setting):
        self.model = copy.deepcopy(backbone)
        self.shapes, self.setting = shapes, setting
        self.modules = nn.ModuleList()  # the trainable state

    def trainable(self):
        return [p for p in self.modules.parameters() if p.requires_grad]

    def train(self, mode=True):
        self.model.train(mode)
        self.modules.train(mode)

    def forward(self, input_ids, attention_mask):
        raise NotImplementedError


def _extend_mask(mask, n):
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


# ---------------------------------------------------------------- P-Tuning v2, as the original and PEFT


class PrefixEncoder(nn.Module):
    """P-Tuning v2's prefix encoder: ``[B, L]`` prefix ids -> ``[B, L, 2*N*Hkv*D]``."""

    def __init__(self, L, width, hidden_size, projection, projection_hidden=512):
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(L, hidden_size)
            self.trans = nn.Sequential(nn.Linear(hidden_size, projection_hidden), nn.Tanh(),
                                       nn.Linear(projection_hidden, width))
        else:
            self.embedding = nn.Embedding(L, width)

    def forward(self, prefix):
        return self.trans(self.embedding(prefix)) if self.projection else self.embedding(prefix)


class PTuningV2Original(Contender):
    name, family, impl = "P-Tuning v2 (original)", "prefix", "original"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        s = shapes
        self.L = setting.prefix_len
        width = 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"]
        self.encoder = PrefixEncoder(self.L, width, s["hidden_size"], setting.prefix_projection)
        self.dropout = nn.Dropout(0.0)
        self.modules.append(self.encoder)
        self.prefix_tokens = torch.arange(self.L)

    def get_prompt(self, batch_size):
        s = self.shapes
        tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1)
        pkv = self.encoder(tokens).view(batch_size, self.L, 2 * s["num_layers"], s["num_kv_heads"], s["head_dim"])
        pkv = pkv.to(self.model.dtype)  # as PEFT does for a half-precision backbone
        return self.dropout(pkv).permute([2, 0, 3, 1, 4]).split(2)

    def forward(self, input_ids, attention_mask):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, kv in enumerate(self.get_prompt(input_ids.shape[0])):
            cache.update(kv[0], kv[1], i)
        out = self.model(input_ids=input_ids, attention_mask=_extend_mask(attention_mask, self.L),
                         past_key_values=cache)
        return out.last_hidden_state


class PTuningV2PEFT(Contender):
    name, family, impl = "P-Tuning v2 (PEFT)", "prefix", "peft"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        cfg = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=setting.prefix_len,
                                 prefix_projection=setting.prefix_projection)
        self.model = get_peft_model(self.model, cfg)
        self.modules.append(self.model.prompt_encoder)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# ---------------------------------------------------------------- DePT / ADePT, as the originals


class _PromptOriginal(Contender):
    family, impl = "prompt", "original"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        self.m = setting.prefix_len
        self.prompt = nn.Embedding(self.m, shapes["hidden_size"])
        self.prompt_tokens = torch.arange(self.m)
        self.modules.append(self.prompt)

    def offset(self, x):
        raise NotImplementedError

    def forward(self, input_ids, attention_mask):
        x = self.model.get_input_embeddings()(input_ids)
        x = self.offset(x).to(x.dtype)
        prompts = self.prompt(self.prompt_tokens.unsqueeze(0).expand(input_ids.shape[0], -1))
        embeds = torch.cat([prompts.to(x.dtype), x], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=_extend_mask(attention_mask, self.m))
        return out.last_hidden_state[:, self.m:]


class DePTOriginal(_PromptOriginal):
    name = "DePT (original)"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        d, r = shapes["hidden_size"], setting.resolved_dept_rank(shapes["hidden_size"])
        self.lora_embedding_A = nn.Parameter(torch.empty(setting.dept_rows(), r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(r, d))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
        self.scaling = 8 / math.sqrt(r)
        self.modules.append(nn.ParameterList([self.lora_embedding_A, self.lora_embedding_B]))

    def offset(self, x):
        # the reference pads every input to max_length and adds the whole [s, d] product, in place:
        # ``inputs_embeds += scaling * (A @ B)`` sums in the parameters' dtype (fp32) and stores the result
        # in the embeddings' dtype (bf16 on a bf16 backbone): one rounding, as here
        delta = (self.lora_embedding_A @ self.lora_embedding_B) * self.scaling
        return (x + delta[: x.shape[1]]).to(x.dtype)


class ADePTOriginal(_PromptOriginal):
    name = "ADePT (original)"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        d, r = shapes["hidden_size"], setting.adept_rank
        self.A = nn.Parameter(torch.empty(d, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.a, self.b = nn.Parameter(torch.zeros(r)), nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.zeros(r, d))
        self.dropout = nn.Dropout(0.1)
        self.modules.append(nn.ParameterList([self.A, self.a, self.B, self.b]))
        self.modules.append(self.dropout)

    def offset(self, x):
        # The reference multiplies the embeddings by its fp32 parameters with no cast: it runs in fp32, or
        # under autocast, which casts each matmul's operands to the half dtype. On a half-precision backbone
        # we do what autocast would: the FFN runs in the embeddings' dtype (the casts are differentiable, so
        # the fp32 parameters still get their gradients) and the offset lands in that dtype.
        A, a, B, b = (p.to(x.dtype) for p in (self.A, self.a, self.B, self.b))
        t = self.dropout(torch.matmul(x, A) + a)
        return x + torch.matmul(torch.relu(t), B) + b


# ---------------------------------------------------------------- fastprefix


class _Fastprefix(Contender):
    impl = "fastprefix"

    def make_config(self):
        raise NotImplementedError

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        self.model = fastprefix.apply(self.model, self.make_config())
        self.modules.append(self.model.fastprefix)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, -input_ids.shape[1]:]


class PTuningV2Fast(_Fastprefix):
    name, family = "P-Tuning v2 (fastprefix)", "prefix"

    def make_config(self):
        s = self.setting
        return fastprefix.PTuningV2Config(num_virtual_tokens=s.prefix_len, prefix_projection=s.prefix_projection)


class APTPooledFast(_Fastprefix):
    name, family = "APT pooled gate (fastprefix)", "prefix"

    def make_config(self):
        s = self.setting
        return fastprefix.APTConfig(num_virtual_tokens=s.prefix_len, prefix_projection=s.prefix_projection,
                                    gate="pooled")


class APTTokenFast(_Fastprefix):
    name, family = "APT token gate (fastprefix)", "prefix"

    def make_config(self):
        s = self.setting
        return fastprefix.APTConfig(num_virtual_tokens=s.prefix_len, prefix_projection=s.prefix_projection,
                                    gate="token")


class PTFast(_Fastprefix):
    name, family = "PT (fastprefix)", "prompt"

    def make_config(self):
        return fastprefix.PromptTuningConfig(num_virtual_tokens=self.setting.prefix_len, prompt_init="normal")


class DePTFast(_Fastprefix):
    name, family = "DePT (fastprefix)", "prompt"

    def make_config(self):
        s, d = self.setting, self.shapes["hidden_size"]
        return fastprefix.DePTConfig(num_virtual_tokens=s.prefix_len, rank=s.resolved_dept_rank(d),
                                     max_length=s.dept_rows(), prompt_init="normal")


class ADePTFast(_Fastprefix):
    name, family = "ADePT (fastprefix)", "prompt"

    def make_config(self):
        s = self.setting
        return fastprefix.ADePTConfig(num_virtual_tokens=s.prefix_len, rank=s.adept_rank, prompt_init="normal")


# ---------------------------------------------------------------- floors


class Floor(Contender):
    """The prompt methods' floor: the frozen backbone on m + S tokens, the gradient flowing to its input embeddings.

    What any prompt method costs at least: the backbone over the m prompt rows and the S real tokens,
    with a backward through every layer down to the (trainable) prompt embeddings.
    """

    impl, family = "floor", "prompt"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        self.extra_tokens = setting.prefix_len
        self.name = floor_name(setting)
        self.extra_ids = torch.randint(1000, 2000, (1, self.extra_tokens))

    def forward(self, input_ids, attention_mask):
        ids = torch.cat([self.extra_ids.expand(input_ids.shape[0], -1), input_ids], dim=1)
        x = self.model.get_input_embeddings()(ids)
        if torch.is_grad_enabled():
            x.requires_grad_(True)  # a leaf: backward runs through every layer, as for a real prompt
        out = self.model(inputs_embeds=x, attention_mask=_extend_mask(attention_mask, self.extra_tokens))
        return out.last_hidden_state[:, self.extra_tokens:]


class PrefixFloor(Contender):
    """The prefix methods' floor: the frozen backbone on the S real tokens, the gradient flowing to its inputs.

    A prefix method does this plus its L prefix columns in every layer's attention (no MLP work on
    them), so this is the least it can cost; the S+L floor above is no bound for it (prefix rows beat it).
    """

    impl, family = "floor", "prefix"

    def __init__(self, backbone, shapes, setting):
        super().__init__(backbone, shapes, setting)
        self.name = prefix_floor_name(setting)

    def forward(self, input_ids, attention_mask):
        x = self.model.get_input_embeddings()(input_ids)
        if torch.is_grad_enabled():
            x.requires_grad_(True)  # backward through every layer, as a prefix's keys/values in layer 0 need
        return self.model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state


def floor_name(setting):
    """The prompt floor's row name (the m + S token floor)."""
    return f"floor: backbone on S+{setting.prefix_len} tokens"


def prefix_floor_name(setting):
    """The prefix floor's row name (the S token floor)."""
    return "floor: backbone on S tokens"


PREFIX_ROWS = (PTuningV2Original, PTuningV2PEFT, PTuningV2Fast, APTPooledFast, APTTokenFast)
PROMPT_ROWS = (DePTOriginal, ADePTOriginal, PTFast, DePTFast, ADePTFast)


# how --only reads its words (the CLI's --help quotes it)
ONLY_RULE = "a row is kept when its name contains one of the words, ignoring case"


def matches(name, only):
    """True when ``only`` is empty or ``name`` contains one of its words, ignoring case (:data:`ONLY_RULE`)."""
    return not only or any(k.lower() in name.lower() for k in only)


def curve_label(name):
    """The name a row has across a curve: the prompt floor's name carries L, so over L it reads "S+L"."""
    return re.sub(r"^floor: backbone on S\+\d+ tokens$", "floor: backbone on S+L tokens", name)


def row_names(setting):
    """Every row's name in table order, without building any (what ``--only`` is matched against)."""
    return [c.name for c in PREFIX_ROWS + PROMPT_ROWS] + [prefix_floor_name(setting), floor_name(setting)]


def build_all(backbone, shapes, setting, only=None, exact=False):
    """``(name, constructor)`` of every row in table order.

    ``only``: keep the names containing one of these, ignoring case (:func:`matches`); ``exact``: the names
    equal to one, ignoring case, the prompt floor by its :func:`curve_label` ("floor" names both floors).
    """
    rows = [(c.name, lambda c=c: c(backbone, shapes, setting)) for c in PREFIX_ROWS + PROMPT_ROWS]
    rows.append((prefix_floor_name(setting), lambda: PrefixFloor(backbone, shapes, setting)))
    rows.append((floor_name(setting), lambda: Floor(backbone, shapes, setting)))
    if only:
        keep = [s.lower() for s in only]
        if exact:
            rows = [r for r in rows if r[0].lower() in keep or curve_label(r[0]).lower() in keep
                    or ("floor" in keep and r[0].startswith("floor"))]
        else:
            rows = [r for r in rows if matches(r[0], only)]
    return rows


def move(contender, device):
    """Move a built contender (model, trainable state, index tensors) to ``device``."""
    contender.model.to(device)
    contender.modules.to(device)
    for attr in ("prefix_tokens", "prompt_tokens", "extra_ids"):
        if isinstance(getattr(contender, attr, None), torch.Tensor):
            setattr(contender, attr, getattr(contender, attr).to(device))
    return contender
