"""The invariants matrix (:mod:`helpers.invariants`), its training and state cells: every family x every method
variant x ``checkpoint_eq_plain``, ``remove_bitexact`` and ``saveload_bitexact``, float64.

``checkpoint_eq_plain``: two forwards of different shapes, then one backward, under non-reentrant gradient
checkpointing give the plain gradients, the method's dropout on. ``remove_bitexact``: after ``apply``, a training
step and ``remove``, the model is bit for bit the base model. ``saveload_bitexact``: ``save_adapter`` then
``load_adapter`` into a fresh model reproduces the outputs bitwise.
"""

import pytest

from helpers.invariants import cells, check


@pytest.mark.parametrize("family, method, prop",
                         list(cells(("checkpoint_eq_plain", "remove_bitexact", "saveload_bitexact"))))
def test_invariant(family, method, prop, tmp_path):
    check(family, method, prop, "torch", tmp_path)
