"""The invariants matrix (:mod:`helpers.invariants`), its decoding cells: every decoder and encoder-decoder x every
method variant x ``generate_eq_uncached``, float64.

Greedy ``generate`` with the KV cache gives, at every step, the logits of the uncached forward over the same
tokens: a left-padded batch with ``attention_mask``, and an unpadded one without (T5: its decoder's cache). The
windowed families' windows are shorter than the inputs, so generating crops their sliding-window caches.
"""

import pytest

from helpers.invariants import cells, check


@pytest.mark.parametrize("family, method, prop", list(cells(("generate_eq_uncached",))))
def test_invariant(family, method, prop, tmp_path):
    check(family, method, prop, "torch", tmp_path)
