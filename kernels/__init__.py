"""Triton kernels of fastprefix, installed as ``fastprefix.kernels`` (never a top-level ``kernels``).

Importing this package does not touch the GPU driver: kernels compile on first launch.
"""
