"""The gated-prefix attention (P-Tuning v2, APT) on the Triton backend.

``dispatch`` picks, per call, ``fused`` (one FlashAttention-2-style kernel over prefix and keys), ``split``
(``vendor``: PyTorch's fused attention over the real keys, dense or variable-length (``varlen``: padded batches and
packed rows), then a Triton log-sum-exp merge of the prefix) or ``concat`` (PyTorch's fused attention over
``[gated prefix ; keys]`` where the gate folds into the prefix), by the measured table of the running GPU
(``table``) or the cost model (``costs``); ``configs`` holds the Triton kernels' launch tables.
"""
