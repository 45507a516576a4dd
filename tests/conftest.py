"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, so it comes first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# kernel-written buffers start as NaN, so an element a kernel forgets to write fails its test
os.environ.setdefault("FASTPREFIX_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: two workers on two cores, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every test starts with kernel outputs NaN-poisoned, whatever the environment says (a test may turn it off)."""
    monkeypatch.setenv("FASTPREFIX_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def split_calls(monkeypatch):
    """Force the split path (``FASTPREFIX_ATTENTION=split``) and record the vendor op of each of its calls, so a
    silent fallback to the fused kernel cannot pass."""
    from fastprefix.kernels.attention import split  # here: only the tests that ask import the kernels

    monkeypatch.setenv("FASTPREFIX_ATTENTION", "split")
    calls = []
    real = split.split_attention
    monkeypatch.setattr(split, "split_attention", lambda *a, **k: calls.append(k.get("op")) or real(*a, **k))
    return calls


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: compiled kernels on a CUDA GPU (make gpu-test); skipped without one")


def pytest_collection_modifyitems(config, items):
    """Skip the ``cuda`` tests without a GPU, and under TRITON_INTERPRET=1 (they test compiled kernels).

    ``FASTPREFIX_GPU_TEST_DEVICE=cpu`` runs their logic on CPU under the interpreter (developing them).
    """
    if os.environ.get("FASTPREFIX_GPU_TEST_DEVICE") == "cpu":
        return
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (make gpu-test)"
    elif os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
        reason = "TRITON_INTERPRET is on: the cuda tests check compiled kernels (make gpu-test sets it to 0)"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
