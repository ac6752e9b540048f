"""`adam_state`: the bytes of Adam's state over the params', and its step.

The default CNN under `config.optimizer.name='adam'` (`hooks.optim`: `mu` and
`nu` shaped like the params, one int32 count per tensor, `hooks.counts`); the
bytes are counted on the trainer's abstract state, so the figure is exact.
For reference, the same state with a count per element: what `hooks.optim`
kept before, and what checkpoints of older runs hold (they still load). The
trainer's step is timed on both layouts, interleaved, on the same batches.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks import fixtures
import hooks

NAME = 'adam_state'
BATCHES = 4


def _nbytes(tree: Any) -> int:
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


def _per_element(state: Any) -> Any:
  """`state` with every Adam count broadcast to its param's shape."""
  flat = hooks.flatten(state)
  for param, slots in hooks.slot_index(flat).items():
    shape = flat[param].shape
    for slot in slots:
      leaf = flat[slot]
      if leaf.shape == shape:
        continue
      if isinstance(leaf, jax.ShapeDtypeStruct):
        flat[slot] = jax.ShapeDtypeStruct(shape, leaf.dtype)
      else:
        flat[slot] = jax.device_put(
            np.broadcast_to(np.asarray(leaf), shape), leaf.sharding)
  return hooks.unflatten(flat, state)


def run(size: common.Size) -> dict[str, Any]:
  """Counts the state's bytes and interleaves the two steps."""
  adam = fixtures.trainer_run(fixtures.config(**{'optimizer.name': 'adam'}))
  abstract = adam.abstract_state()
  params = _nbytes(abstract.params)
  lean = _nbytes(abstract.opt_state)
  per_element = _nbytes(_per_element(abstract).opt_state)
  batches = fixtures.device_batches(adam, BATCHES)
  sides = {'per_tensor': fixtures.TrainerStep(adam),
           'per_element': fixtures.TrainerStep(adam)}
  sides['per_element'].state = _per_element(sides['per_element'].state)
  n = size.steps
  units = {name: fixtures.timed_steps(side, batches, n)
           for name, side in sides.items()}
  for fn in units.values():  # Compile and warm up.
    fn()
  seconds = common.interleaved(units, size.rounds)
  ratios = common.round_ratios(seconds['per_tensor'], seconds['per_element'])
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure('Adam state / params bytes, seed CNN', lean / params,
                        'x', '<= 2.05', lean / params <= 2.05, cmd),
          common.figure('the same with a count per element (before)',
                        per_element / params, 'x', '-', None, cmd),
          common.figure('step, one count per tensor / per element',
                        common.median(ratios), 'x', '-', None, cmd),
      ],
      'details': {'params_bytes': params, 'adam_state_bytes': lean,
                  'per_element_state_bytes': per_element,
                  'batch_size': adam.setup.schedule.batch_size,
                  'steps_per_unit': n, 'rounds': size.rounds,
                  'load_average': os.getloadavg(),
                  'seconds': seconds, 'ratio_per_round': ratios},
  }
