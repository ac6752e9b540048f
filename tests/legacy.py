"""The legacy flax.optim fixture in ../shared, and its reference next step.

`checkpoint_20` is a flax.optim Adam checkpoint of the seed CNN at step 20;
`reference_next_step.msgpack` holds a batch and the params one more Adam step
(lr 1e-3, b1 0.9, b2 0.999, eps 1e-8) gives from it (see optimizer.json).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import numpy as np
import pytest

from hooks import flat as flat_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(REPO), 'shared', 'fixtures',
                       'legacy_flax_optim')
ADAM = os.path.join(FIXTURE, 'adam')
CHECKPOINT = os.path.join(ADAM, 'checkpoint_20')


def require() -> None:
  """Skips the calling test when ../shared does not hold the fixture."""
  if not os.path.isdir(FIXTURE):
    pytest.skip(f'the legacy flax.optim fixture is not at {FIXTURE}')


def read(path: str) -> Any:
  """A msgpack file of the fixture, decoded (no pickle)."""
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def reference() -> dict[str, Any]:
  """``{'batch': {'image', 'label'}, 'params_after_one_more_step': ...}``."""
  return read(os.path.join(ADAM, 'reference_next_step.msgpack'))


def assert_next_step(params: Mapping[str, Any]) -> None:
  """Asserts ``params`` (flat, paths without ``params/``) are the reference's
  params after one more step: the same keys, allclose (rtol 1e-5)."""
  expected = flat_lib.flatten(reference()['params_after_one_more_step'])
  assert sorted(params) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(params[key], value, rtol=1e-5, atol=1e-7,
                               err_msg=key)
