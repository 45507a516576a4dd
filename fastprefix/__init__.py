"""fastprefix: fast prefix and prompt tuning (P-Tuning v2, APT, PT, DePT, ADePT) with Triton kernels.

The functional ops validate their inputs and run either the Triton kernels (CUDA tensors) or the
pure-PyTorch reference path (everything else); the modules hold each method's trainable state.
"""

from ._version import __version__
from .config import (ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config, config_from_dict,
                     config_from_json)
from .modules import (AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning, PTuningV2Prefix)
from .fold import fold_adept_offsets
from .ops import adept_embedding, apt_gate, dept_embedding, gated_prefix_attention, prompt_tuning_embedding
# the 🤗 transformers swap-in (transformers itself is imported lazily, on first use)
from .integrations.transformers import apply, remove, use_backend
from .integrations.named import active_adapter, add_adapter, delete_adapter, list_adapters, set_adapter
from .adapters import load_adapter, merge, save_adapter, unmerge
from .peft_io import from_peft, to_peft
from .probe import GateReport, gate_report
from .serving import prompt_embeds
from .conveniences import disabled, print_trainable_parameters, trainable_parameters

__all__ = [
    "__version__",
    "gated_prefix_attention", "apt_gate", "adept_embedding", "dept_embedding", "prompt_tuning_embedding",
    "fold_adept_offsets",
    "PromptTuningConfig", "PTuningV2Config", "APTConfig", "DePTConfig", "ADePTConfig",
    "config_from_dict", "config_from_json",
    "PromptTuning", "PTuningV2Prefix", "AdaptivePrefix", "DecomposedPrompt", "AdaptiveDecomposedPrompt",
    "apply", "remove", "use_backend", "add_adapter", "set_adapter", "delete_adapter", "list_adapters", "active_adapter",
    "save_adapter", "load_adapter", "merge", "unmerge", "gate_report", "GateReport",
    "from_peft", "to_peft",
    "prompt_embeds", "disabled", "print_trainable_parameters", "trainable_parameters",
]
