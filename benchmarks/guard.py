"""`guard`: the train step with the non-finite guard on against off.

Both sides are the trainer's loop step (`trainer.run.Run.train_step`: metrics
summed on device, state donated) on the default CNN and the same
device-resident batches; on: config.stop_on_nonfinite=True (the loss and the
global gradient norm are tested every step and the first non-finite step is
kept in the metric totals); off: config.stop_on_nonfinite=False.
The loop reads the flag only where it reads metrics anyway, so the per-step
cost is all there is to measure.
"""

from __future__ import annotations

from typing import Any

from benchmarks import common
from benchmarks import fixtures

NAME = 'guard'
BATCHES = 4


def run(size: common.Size) -> dict[str, Any]:
  """Interleaves guard-on and guard-off steps; returns the figures."""
  runs = {side: fixtures.trainer_run(fixtures.config(stop_on_nonfinite=on))
          for side, on in (('on', True), ('off', False))}
  batches = fixtures.device_batches(runs['on'], BATCHES)
  sides = {side: fixtures.TrainerStep(r) for side, r in runs.items()}
  n = size.steps
  units = {name: fixtures.timed_steps(side, batches, n)
           for name, side in sides.items()}
  for fn in units.values():  # Compile and warm up.
    fn()
  # The difference is small: three times the usual rounds for a stable median.
  rounds = size.rounds if size.tiny else 3 * size.rounds
  seconds = common.interleaved(units, rounds)
  ratios = common.round_ratios(seconds['on'], seconds['off'])
  ratio = common.median(ratios)
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure('guard on / off step time', ratio, 'x', '<= 1.02',
                        ratio <= 1.02, cmd),
          common.figure('step, guard on', common.median(seconds['on']) / n
                        * 1e3, 'ms', '-', None, cmd),
          common.figure('step, guard off', common.median(seconds['off']) / n
                        * 1e3, 'ms', '-', None, cmd),
      ],
      'details': {'batch_size': runs['on'].setup.schedule.batch_size,
                  'steps_per_unit': n, 'rounds': rounds,
                  'seconds': seconds, 'ratio_per_round': ratios},
  }
