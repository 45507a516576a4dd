"""Pure-PyTorch twins of every kernel: the numerical contract, and the path on CPU (no Triton needed).

Mirrors ``fastprefix.kernels``: ``attention`` (the explicit attention over ``[prefix ; keys]`` and the reference
path), ``split`` (the split algorithm, forward and backward), ``embedding`` (PT, DePT, ADePT inputs).
"""

from .attention import apt_gate, gated_prefix_attention
from .embedding import adept_embedding, dept_embedding, prompt_tuning_embedding

__all__ = ["apt_gate", "gated_prefix_attention", "adept_embedding", "dept_embedding", "prompt_tuning_embedding"]
