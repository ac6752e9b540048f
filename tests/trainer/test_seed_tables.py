"""The seed document's printed flat-key tables, reproduced with today's APIs.

The seed (shared/seeds/model_surgery.rst) used flax.optim, since removed. Its
flat param table comes from our model through hooks.flatten; its flat
optimizer table is exactly the layout of the legacy flax.optim checkpoint in
shared/fixtures, read through hooks.open_donor.
"""

import ast
import os
import re

import jax
import pytest

import hooks
from tests import legacy as legacy_lib
from tests.trainer import runs
from trainer import models

SHARED = os.path.join(os.path.dirname(runs.REPO), 'shared')
SEED = os.path.join(SHARED, 'seeds', 'model_surgery.rst')
LEGACY = legacy_lib.CHECKPOINT


def _printed_flat_tables():
  """The testoutput blocks that print flat dicts, as Python dicts."""
  if not os.path.exists(SEED):
    pytest.skip(f'the seed document is not at {SEED}')
  text = open(SEED).read()
  blocks = re.findall(r'\.\. testoutput::\n(?:  :options:[^\n]*\n)?\s*\n'
                      r'((?:  [^\n]*\n|\s*\n)+)', text)
  tables = []
  for block in blocks:
    body = block.strip()
    if body.startswith("{'") and '/' in body.split(':')[0]:
      tables.append(ast.literal_eval(body))
  return tables


def test_flat_param_table():
  flat_params, _ = _printed_flat_tables()
  params = models.init_params(models.create('cnn', 10), jax.random.key(0))
  ours = {k: tuple(v.shape) for k, v in hooks.flatten(params).items()}
  assert ours == flat_params
  assert list(ours) == sorted(flat_params)


def test_flat_optimizer_table_is_the_legacy_layout():
  _, flat_opt_state = _printed_flat_tables()
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  structure = hooks.open_donor(LEGACY).structure()
  assert {k: tuple(v.shape) for k, v in structure.items()} == flat_opt_state
