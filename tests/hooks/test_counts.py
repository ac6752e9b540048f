"""Tests for hooks.counts: the shapes Adam's counts take as their params move."""

from __future__ import annotations

import numpy as np
import pytest

from hooks import counts
from hooks import transfer

HEAD = transfer.plan((4, 5), (4, 3), labelled={-1: ((0, 2, 4), (2, 0, 1))})
PERMUTED = transfer.plan((4, 3), (4, 3), labelled={-1: ((0, 1, 2), (2, 0, 1))})


def _apply(moves, base, source):
  return moves.apply(base, np.asarray(source, np.int32), np.int32)


def test_fits_and_owner():
  assert counts.fits((1, 1), (256, 10)) and counts.fits((1, 10), (256, 10))
  assert counts.fits((256, 10), (256, 10)) and counts.fits((), ())
  assert not counts.fits((2, 10), (256, 10)) and not counts.fits((1,), (4, 5))
  paths = {'Dense_1/kernel', 'kernel'}
  assert counts.owner('opt_state/0/count/Dense_1/kernel', paths) == (
      'Dense_1/kernel')
  assert counts.owner('0/count/kernel', paths) == 'kernel'
  assert counts.owner('opt_state/0/mu/Dense_1/kernel', paths) is None
  assert counts.owner('opt_state/0/count', paths) is None


def test_new_entries_grow_the_edited_axis_only():
  moves = counts.plan(HEAD, (1, 1))
  assert moves.target_shape == (1, 5)
  np.testing.assert_array_equal(_apply(moves, 0, [[7]]), [[7, 0, 7, 0, 7]])


def test_a_permutation_or_a_drop_keeps_one_count():
  assert counts.plan(PERMUTED, (1, 1)).target_shape == (1, 1)
  dropped = transfer.plan((4, 2), (4, 3), labelled={-1: ((0, 1), (2, 0))})
  assert counts.plan(dropped, (1, 1)).target_shape == (1, 1)


def test_grown_and_per_element_sources_move_entry_by_entry():
  moves = counts.plan(PERMUTED, (1, 3))
  assert moves.target_shape == (1, 3)
  np.testing.assert_array_equal(_apply(moves, 0, [[1, 2, 3]]), [[3, 1, 2]])
  moves = counts.plan(HEAD, (4, 3))  # An older checkpoint's count.
  assert moves.target_shape == (4, 5)
  source = np.arange(12).reshape(4, 3)
  np.testing.assert_array_equal(_apply(moves, 0, source)[:, [0, 2, 4]],
                                source[:, [2, 0, 1]])


def test_a_grown_base_keeps_its_axis():
  # A warm start's uncopied entries keep the target's own (grown) count.
  copy_rows = transfer.plan((4, 5), (2, 5), labelled={0: ((1, 3), (0, 1))})
  moves = counts.plan(copy_rows, (1, 1), base_shape=(1, 5))
  assert moves.target_shape == (4, 5)
  got = _apply(moves, [[1, 2, 3, 4, 5]], [[9]])
  np.testing.assert_array_equal(got[[1, 3]], 9)
  np.testing.assert_array_equal(got[[0, 2]], [[1, 2, 3, 4, 5]] * 2)
  # Every entry copied, the base unseen: one count again.
  whole = transfer.plan((4, 5), (4, 5))
  assert counts.plan(whole, (1, 1), base_shape=(1, 1)).target_shape == (1, 1)


def test_slot_transfer_moves_other_slots_like_their_param():
  assert counts.slot_transfer('opt_state/0/mu/', HEAD, np.zeros((4, 3))) is HEAD
  assert counts.slot_transfer('opt_state/0/count/', HEAD,
                              np.zeros((1, 1))).target_shape == (1, 5)


def test_shapes_that_are_no_counts_are_refused():
  with pytest.raises(ValueError, match=r'A count of \(2, 3\) .* does not fit'):
    counts.plan(HEAD, (2, 3))
  with pytest.raises(ValueError, match=r"Cannot carry optimizer leaf '0/mu/k': "
                     r'old shape \(1, 5\), new \(4, 5\)'):
    counts.check_carry('0/mu/k', (1, 5), (4, 5), {'k': (4, 5)})
  counts.check_carry('0/count/k', (1, 5), (1, 1), {'k': (4, 5)})
