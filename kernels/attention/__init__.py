"""The gated-prefix attention (P-Tuning v2, APT) on the Triton backend.

``dispatch`` picks, per call, ``fused`` (one FlashAttention-2-style kernel over prefix and keys) or ``split``
(``vendor``: PyTorch's fused attention over the real keys, then a Triton log-sum-exp merge of the prefix);
``configs`` holds both paths' launch tables.
"""
