"""`freeze`: the train step with Conv_0 and Conv_1 frozen, against two others.

Three steps, interleaved: the trainer's with `config.freeze.patterns =
('Conv_0/.*', 'Conv_1/.*')`, the trainer's with nothing frozen, and a
hand-written step whose optimizer is `optax.multi_transform` with
`optax.set_to_zero()` on the two conv layers. Frozen gradients are never
used, so XLA drops the work that would compute them: the frozen step costs a
forward pass and the dense layers' backward pass.
"""

from __future__ import annotations

from typing import Any

import jax

from benchmarks import common
from benchmarks import fixtures

NAME = 'freeze'
FROZEN = ('Conv_0', 'Conv_1')
BATCHES = 4


def run(size: common.Size) -> dict[str, Any]:
  """Interleaves the three steps; returns the figures."""
  frozen_run = fixtures.trainer_run(fixtures.config(**{
      'freeze.patterns': tuple(f'{layer}/.*' for layer in FROZEN)}))
  full_run = fixtures.trainer_run(fixtures.config())
  batches = fixtures.device_batches(full_run, BATCHES)
  model = fixtures.SeedCNN()
  params = fixtures.hand_carry(model, fixtures.hand_sgd())[0]
  tx = fixtures.hand_frozen_sgd(params, FROZEN)
  hand = fixtures.hand_step(model, tx)
  carry = fixtures.hand_carry(model, tx)
  trainer_steps = {'frozen': fixtures.TrainerStep(frozen_run),
                   'full': fixtures.TrainerStep(full_run)}
  n = size.steps * (3 if not size.tiny else 1)  # Frozen steps are short.

  def hand_unit() -> float:
    nonlocal carry
    t = common.now()
    for i in range(n):
      b = batches[i % BATCHES]
      carry = hand(carry, b['image'], b['label'])
    jax.block_until_ready(carry)
    return common.now() - t

  units = {name: fixtures.timed_steps(step, batches, n)
           for name, step in trainer_steps.items()}
  units['hand_set_to_zero'] = hand_unit
  for unit in units.values():
    unit()
  seconds = common.interleaved(units, size.rounds)
  vs_full = common.median(common.round_ratios(seconds['frozen'],
                                              seconds['full']))
  vs_hand = common.median(common.round_ratios(seconds['frozen'],
                                              seconds['hand_set_to_zero']))
  per_step = {k: common.median(v) / n * 1e3 for k, v in seconds.items()}
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure('frozen / full step time', vs_full, 'x', '<= 0.25',
                        vs_full <= 0.25, cmd),
          common.figure('frozen / hand-written set_to_zero step time',
                        vs_hand, 'x', '<= 1.05', vs_hand <= 1.05, cmd),
          common.figure('frozen step', per_step['frozen'], 'ms', '-', None,
                        cmd),
          common.figure('full step', per_step['full'], 'ms', '-', None, cmd),
          common.figure('hand-written set_to_zero step',
                        per_step['hand_set_to_zero'], 'ms', '-', None, cmd),
      ],
      'details': {'steps_per_unit': n, 'rounds': size.rounds,
                  'seconds': seconds, 'frozen_layers': list(FROZEN)},
  }
