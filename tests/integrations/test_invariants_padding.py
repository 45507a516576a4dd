"""The invariants matrix (:mod:`helpers.invariants`), its padding and causality cells: every family x every method
variant x ``padded_eq_alone`` and ``causal``, float64 against an explicit reference (and any ``refused_at_apply``).

``padded_eq_alone``: each row of a padded batch (right padding; also left for decoders and RoBERTa) equals that
row run alone, prompt rows included. ``causal``: replacing the later tokens leaves every earlier output unchanged
(decoders; T5's decoder). The decoding cells are in ``tests/integrations/test_invariants_decoding.py``, the
training and state cells in ``tests/integrations/test_invariants_training.py``.
"""

import pytest

from helpers.invariants import cells, check


@pytest.mark.parametrize("family, method, prop", list(cells(("padded_eq_alone", "causal", "refused_at_apply"))))
def test_invariant(family, method, prop, tmp_path):
    check(family, method, prop, "torch", tmp_path)
