"""Tests for the hooks package as a whole: exports, imports, the usage docs."""

from __future__ import annotations

import ast
import textwrap
import pathlib

import jax
import numpy as np

import hooks
from tests.hooks import helpers

HOOKS_DIR = pathlib.Path(hooks.__file__).parent


def _imported_modules(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_hooks_never_import_the_trainer_or_touch_jax_config():
  files = sorted(HOOKS_DIR.glob('*.py'))
  assert len(files) >= 9
  for path in files:
    modules = _imported_modules(path)
    assert not any(m == 'trainer' or m.startswith('trainer.') for m in modules), path
    assert 'jax.config' not in path.read_text(), path


def test_public_api_is_exported():
  for name in hooks.__all__:
    assert hasattr(hooks, name), name
  assert callable(hooks.freeze) and hooks.optim.adam is not None
  assert {'reinit', 'reset_slots'} <= set(hooks.names())


def test_usage_example_in_the_package_docstring_runs():
  state = helpers.make_state()
  create_state = lambda rng: helpers.make_state(seed=1)  # pylint: disable=unnecessary-lambda-assignment
  rng = jax.random.key(0)
  example = textwrap.dedent(hooks.__doc__.split('::\n')[1])
  namespace = {'hooks': hooks, 'state': state, 'create_state': create_state, 'rng': rng,
               'print': lambda *a: None}
  exec(example, namespace)  # pylint: disable=exec-used
  new_state = namespace['state']
  assert type(new_state) is type(state)
  np.testing.assert_array_equal(
      new_state.params['Dense_1']['kernel'], helpers.init_params(1)['Dense_1']['kernel']
  )
  assert new_state.params['Dense_0']['kernel'] is state.params['Dense_0']['kernel']
  assert 'reinitialized' in namespace['report'].table()
