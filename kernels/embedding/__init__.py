"""The DePT and ADePT prompt embeddings on the Triton backend: ``fused`` (gather + offset + prompt, one launch
each way) and its launch tables in ``configs``."""
