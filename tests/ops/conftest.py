"""Fixtures of the op tests (tests/ops/); tests/conftest.py sets up the session for every test."""

import pytest

from fastprefix.kernels.attention import split


@pytest.fixture
def split_calls(monkeypatch):
    """Force the split path (``FASTPREFIX_ATTENTION=split``) and record the vendor op of each of its calls, so a
    silent fallback to the fused kernel cannot pass."""
    monkeypatch.setenv("FASTPREFIX_ATTENTION", "split")
    calls = []
    real = split.split_attention
    monkeypatch.setattr(split, "split_attention", lambda *a, **k: calls.append(k.get("op")) or real(*a, **k))
    return calls
