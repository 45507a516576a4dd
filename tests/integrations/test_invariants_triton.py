"""The invariants matrix (:mod:`helpers.invariants`) on the Triton kernels: a decoder (Llama), an encoder (BERT) and
the sliding-window layers and soft-capping of Gemma 2 and windowed Mistral.

Each cell's subject (the padded batch, ``generate``, the checkpointed run) takes the kernels, under the
interpreter on CPU, and its reference (each row alone, the uncached forward, the plain gradients) the PyTorch
path: one cell checks the property and the kernels' agreement with the reference path at once. A separate file
so that the suite's workers can run it beside the bulk.
"""

import pytest

from helpers.invariants import check

# the interpreter takes about a second per prefix-method forward, so the slice is chosen: the prompt kernels and
# APT's token gate under each property a decoder has, the ungated prefix, the causal and the full pooled gate
TRITON_SLICE = [
    *[("llama", method, prop) for method in ("dept", "adept", "apt")
      for prop in ("padded_eq_alone", "generate_eq_uncached", "checkpoint_eq_plain")],
    ("llama", "ptv2", "padded_eq_alone"), ("llama", "apt-pooled", "generate_eq_uncached"),
    *[("bert", method, prop) for method in ("dept", "adept", "apt-pooled")
      for prop in ("padded_eq_alone", "checkpoint_eq_plain")],
    # windows shorter than the inputs (a cropped KV cache while generating) and Gemma 2's soft-capping
    ("mistral_window", "ptv2", "padded_eq_alone"), ("mistral_window", "apt-pooled", "generate_eq_uncached"),
    ("gemma2", "apt", "padded_eq_alone"), ("gemma2", "ptv2", "generate_eq_uncached"),
]


def _count_kernel_launches(monkeypatch):
    """Count Triton kernel launches (interpreter), so that a silent fallback to PyTorch cannot pass a cell."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or run(self, *a, **k))
    return launches


@pytest.mark.parametrize("family, method, prop", [pytest.param(*cell, id="-".join(cell)) for cell in TRITON_SLICE])
def test_invariant_on_triton(family, method, prop, tmp_path, monkeypatch):
    launches = _count_kernel_launches(monkeypatch)
    check(family, method, prop, "triton", tmp_path)
    assert launches, "the Triton cell launched no kernel"
