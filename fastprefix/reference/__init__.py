"""Pure-PyTorch reference paths for all five methods: the numerical contract and the CPU path."""

from .attention import apt_gate, gated_prefix_attention
from .embedding import adept_embedding, dept_embedding

__all__ = ["apt_gate", "gated_prefix_attention", "adept_embedding", "dept_embedding"]
