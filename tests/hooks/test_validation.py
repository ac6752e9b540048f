"""Tests for hooks.validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hooks import validation

SDS = jax.ShapeDtypeStruct


def test_expected_structure_of_arrays_scalars_and_structs():
  flat = {
      'a': jnp.ones((2, 3)),
      'b': np.zeros((4,), np.float32),
      'c': SDS((5,), jnp.int32),
      'step': 0,
      'lr': np.float32(0.1),
  }
  got = validation.expected_structure(flat)
  assert list(got) == list(flat)
  assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
      'a': ((2, 3), jnp.float32),
      'b': ((4,), jnp.float32),
      'c': ((5,), jnp.int32),
      'step': ((), jnp.int32),
      'lr': ((), jnp.float32),
  }


def test_check_structure_passes_on_equal_structures():
  flat = {'a': jnp.ones((2,)), 'step': 3}
  validation.check_structure(flat, {'a': SDS((2,), jnp.float32), 'step': SDS((), jnp.int32)})


def test_check_structure_lists_every_problem():
  flat = {
      'params/Dense_1/w': np.ones((256, 5), np.float32),
      'params/Dense_0/kernel': np.ones((3, 4), np.float32),
      'params/Dense_0/bias': np.ones((4,), np.float16),
      'extra': np.ones(()),
  }
  expected = {
      'params/Dense_1/kernel': SDS((256, 10), jnp.float32),
      'params/Dense_0/kernel': SDS((3, 5), jnp.float32),
      'params/Dense_0/bias': SDS((4,), jnp.float32),
  }
  with pytest.raises(validation.StructureError) as info:
    validation.check_structure(flat, expected)
  err = info.value
  assert isinstance(err, ValueError)
  assert err.missing == ['params/Dense_1/kernel']
  assert err.unexpected == ['extra', 'params/Dense_1/w']
  assert list(err.mismatched) == ['params/Dense_0/bias', 'params/Dense_0/kernel']
  msg = str(err)
  assert '(1 missing, 2 unexpected, 2 mismatched)' in msg
  assert "  params/Dense_1/kernel  (did you mean 'params/Dense_1/w'?)" in msg
  assert "  params/Dense_1/w  (did you mean 'params/Dense_1/kernel'?)" in msg
  assert '  extra\n' in msg  # No close match, no suggestion.
  assert 'params/Dense_0/kernel: got (3, 4) float32, expected (3, 5) float32' in msg
  assert 'params/Dense_0/bias: got (4,) float16, expected (4,) float32' in msg
  assert 'Fix:' in msg


def test_a_count_may_take_any_shape_that_fits_its_param():
  expected = {'params/head/kernel': SDS((256, 10), jnp.float32),
              'opt_state/0/count/head/kernel': SDS((1, 1), jnp.int32),
              'opt_state/0/mu/head/kernel': SDS((256, 10), jnp.float32)}
  state = dict(expected)
  for shape in ((1, 10), (256, 1), (256, 10)):  # Grown, or per element.
    state['opt_state/0/count/head/kernel'] = SDS(shape, jnp.int32)
    validation.check_structure(state, expected)
  bad = {'opt_state/0/count/head/kernel': SDS((2, 10), jnp.int32),  # Not 1.
         'opt_state/0/mu/head/kernel': SDS((1, 10), jnp.float32)}  # No count.
  with pytest.raises(validation.StructureError) as e:
    validation.check_structure({**expected, **bad}, expected)
  assert sorted(e.value.mismatched) == sorted(bad)
  with pytest.raises(validation.StructureError, match='got .1, 10. int8'):
    validation.check_structure({**expected, 'opt_state/0/count/head/kernel':
                                SDS((1, 10), jnp.int8)}, expected)


def test_match_keys_first_match_wins_in_key_order():
  keys = ['Conv_0/kernel', 'Conv_0/bias', 'Dense_0/kernel', 'Dense_1/kernel']
  got = validation.match_keys(['Conv_0/kernel', 'Conv_.*', '.*/kernel'], keys)
  assert got == {'Conv_0/kernel': 0, 'Conv_0/bias': 1, 'Dense_0/kernel': 2, 'Dense_1/kernel': 2}
  assert list(got) == ['Conv_0/kernel', 'Conv_0/bias', 'Dense_0/kernel', 'Dense_1/kernel']


def test_match_keys_a_pattern_shadowed_by_an_earlier_one_still_matches():
  keys = ['Conv_0/kernel', 'Dense_0/kernel']
  got = validation.match_keys(['.*', 'Conv_0/.*', '.*/kernel'], keys)
  assert got == {'Conv_0/kernel': 0, 'Dense_0/kernel': 0}
  with pytest.raises(ValueError, match=r"^Key pattern 'x' matches none"):
    validation.match_keys(['.*', 'Conv_0/.*', 'x', 'y'], keys)


def test_match_keys_is_a_full_match():
  keys = ['params/Conv_0/kernel', 'params/Conv_0/bias']
  with pytest.raises(ValueError) as info:
    validation.match_keys(['Conv_0/.*'], keys)
  msg = str(info.value)
  assert "Key pattern 'Conv_0/.*' matches none of the 2 keys." in msg
  assert 're.fullmatch' in msg
  assert 'params/Conv_0/kernel' in msg


def test_match_keys_unmatched_pattern_lists_close_keys():
  with pytest.raises(ValueError, match=r"'Dense_2/kernel' matches none.*'Dense_1/kernel'"):
    validation.match_keys(['Dense_2/kernel'], ['Dense_1/kernel', 'Conv_0/bias'])


def test_match_keys_allow_empty():
  assert validation.match_keys(['nope'], ['a'], allow_empty=True) == {}
  assert validation.match_keys([], ['a']) == {}


def test_match_keys_bad_regex_is_named():
  with pytest.raises(ValueError, match=r"Key pattern 'Conv_\(0' is not a valid regex"):
    validation.match_keys(['Conv_(0'], ['Conv_0'])


def test_match_keys_rejects_a_bare_string():
  with pytest.raises(ValueError, match=r"write \['Conv_.\*'\]"):
    validation.match_keys('Conv_.*', ['Conv_0'])
