"""fastprefix: fast prefix and prompt tuning (P-Tuning v2, APT, PT, DePT, ADePT) with Triton kernels.

The functional ops validate their inputs and run either the Triton kernels (CUDA tensors) or the
pure-PyTorch reference path (everything else); the modules hold each method's trainable state.
"""

__version__ = "0.1.0"

from .config import (ADePTConfig, APTConfig, DePTConfig, PromptTuningConfig, PTuningV2Config, config_from_dict,
                     config_from_json)
from .modules import (AdaptiveDecomposedPrompt, AdaptivePrefix, DecomposedPrompt, PromptTuning, PTuningV2Prefix)
from .ops import adept_embedding, apt_gate, dept_embedding, gated_prefix_attention, prompt_tuning_embedding

__all__ = [
    "__version__",
    "gated_prefix_attention", "apt_gate", "adept_embedding", "dept_embedding", "prompt_tuning_embedding",
    "PromptTuningConfig", "PTuningV2Config", "APTConfig", "DePTConfig", "ADePTConfig",
    "config_from_dict", "config_from_json",
    "PromptTuning", "PTuningV2Prefix", "AdaptivePrefix", "DecomposedPrompt", "AdaptiveDecomposedPrompt",
]
