"""`nnx_step`: the trainer's step on the NNX CNN against the Linen CNN.

Three steps on the default config (batch 128, SGD momentum 0.9) and the same
device-resident batches, interleaved round by round: the trainer's loop step
(`trainer.run.Run.train_step`: metrics summed on device, state donated)
on the state `trainer.setup` builds with `config.model.api='linen'`, the
same with `'nnx'` (one `jax.jit` over the TrainState; the NNX graph is merged
with the params inside the trace), and, for comparison, the NNX idiom of
flax's own MNIST example: `nnx.jit` over the model and an `nnx.Optimizer`
(same model and optimizer), which splits and merges them on the host at
every call. The headline figure is the NNX/Linen ratio of each round's time
at batch 128, median and interquartile range over many short rounds. The
three at batch 8, where a step takes a few milliseconds, show what each call
costs on the host.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Sequence

from flax import nnx
import jax
import optax

from benchmarks import common
from benchmarks import fixtures
from trainer import models

NAME = 'nnx_step'
BATCHES = 4
GOAL = 1.03
SMALL_BATCH = 8


def iqr(values: Sequence[float]) -> tuple[float, float]:
  """The first and third quartiles (the median's interquartile range)."""
  if len(values) < 2:
    return values[0], values[0]
  q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive')
  return q1, q3


class NnxJitStep:
  """The flax MNIST example's step: `nnx.jit` over (model, optimizer)."""

  def __init__(self, run: Any):
    setup = run.setup
    self.model = models.create_nnx(setup.model_name, len(setup.classes),
                                   nnx.Rngs(params=setup.seed))
    self.optimizer = nnx.Optimizer(self.model, setup.tx_at(0), wrt=nnx.Param)
    self._step = nnx.jit(self._train_step, donate_argnums=(0, 1))
    self.loss = None

  @staticmethod
  def _train_step(model: nnx.Module, optimizer: nnx.Optimizer,
                  batch: dict[str, jax.Array]) -> jax.Array:
    def loss_fn(model: nnx.Module) -> jax.Array:
      logits = model(batch['image'])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  def __call__(self, batch: dict[str, Any]) -> None:
    self.loss = self._step(self.model, self.optimizer, batch)

  def block(self) -> None:
    jax.block_until_ready((nnx.state(self.model), nnx.state(self.optimizer),
                           self.loss))


def _sides(batch_size: int, nnx_jit: bool
           ) -> tuple[dict[str, Any], list[Any], Any]:
  """The steps at `batch_size`, the batches, and the setups."""
  setups = {api: fixtures.trainer_run(fixtures.config(**{
      'model.api': api, 'batch_size': batch_size})) for api in models.APIS}
  sides = {'linen': fixtures.TrainerStep(setups['linen']),
           'nnx': fixtures.TrainerStep(setups['nnx'])}
  if nnx_jit:
    sides['nnx_jit'] = NnxJitStep(setups['nnx'])
  return sides, fixtures.device_batches(setups['linen'], BATCHES), setups


def _interleave(sides: dict[str, Any], batches: list[Any], steps: int,
                rounds: int) -> dict[str, list[float]]:
  """Seconds of `steps` steps of each side per round, after a warm-up."""
  units = {name: fixtures.timed_steps(side, batches, steps)
           for name, side in sides.items()}
  for fn in units.values():  # Compile and warm up.
    fn()
  return common.interleaved(units, rounds)


def run(size: common.Size) -> dict[str, Any]:
  """Times the trainer's two steps at batch 128, then all three at batch 8.

  At the tiny size (a smoke test) the two are timed at batch 8, with the
  steps of the second part: each step compiles once.
  """
  load_before = os.getloadavg()[0]
  if size.tiny:  # A smoke test: the steps at batch 8 serve both parts.
    small_sides, small_batches, setups = _sides(SMALL_BATCH, True)
    sides = {api: small_sides[api] for api in models.APIS}
    batches = small_batches
  else:
    sides, batches, setups = _sides(fixtures.config().batch_size, False)
  # The goal is a 3% margin on a shared machine: many short rounds, so that
  # the two sides of a round see the same load.
  n = size.steps if size.tiny else 4
  rounds = size.rounds if size.tiny else 8 * size.rounds
  seconds = _interleave(sides, batches, n, rounds)
  # At batch 8 a step is a few ms: what each call costs on the host shows.
  if not size.tiny:
    small_sides, small_batches, _ = _sides(SMALL_BATCH, True)
  small_n = 5 * size.steps
  small_rounds = size.rounds if size.tiny else 3 * size.rounds
  small = _interleave(small_sides, small_batches, small_n, small_rounds)
  load_after = os.getloadavg()[0]
  ratios = common.round_ratios(seconds['nnx'], seconds['linen'])
  jit_ratios = common.round_ratios(small['nnx_jit'], small['nnx'])
  ratio, (q1, q3) = common.median(ratios), iqr(ratios)
  jit_ratio, (jq1, jq3) = common.median(jit_ratios), iqr(jit_ratios)
  step_ms = {name: common.median(s) / n * 1e3 for name, s in seconds.items()}
  small_ms = {name: common.median(s) / small_n * 1e3
              for name, s in small.items()}
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure(f'NNX / Linen trainer step time (IQR {q1:.3f}-'
                        f'{q3:.3f})', ratio, 'x', f'<= {GOAL}',
                        ratio <= GOAL, cmd, iqr=[q1, q3]),
          common.figure('NNX / Linen trainer step time, fastest round each',
                        min(seconds['nnx']) / min(seconds['linen']), 'x',
                        '-', None, cmd),
          common.figure('step, Linen CNN (trainer)', step_ms['linen'], 'ms',
                        '-', None, cmd),
          common.figure('step, NNX CNN (trainer: jax.jit, nnx.merge in the '
                        'trace)', step_ms['nnx'], 'ms', '-', None, cmd),
          common.figure(f'batch {SMALL_BATCH}: nnx.jit + nnx.Optimizer step / '
                        f'trainer NNX step (IQR {jq1:.3f}-{jq3:.3f})',
                        jit_ratio, 'x', '-', None, cmd, iqr=[jq1, jq3]),
          common.figure(f'batch {SMALL_BATCH}: step, Linen / NNX (trainer) / '
                        'NNX (nnx.jit)', ' / '.join(
                            f'{small_ms[k]:.2f}'
                            for k in ('linen', 'nnx', 'nnx_jit')),
                        'ms', '-', None, cmd),
      ],
      'notes': (
          f'NNX / Linen: median of {rounds} interleaved rounds of {n} steps '
          f'each, IQR {q1:.3f}-{q3:.3f}; load average (1 min) '
          f'{load_before:.2f} at the start and {load_after:.2f} at the end '
          f'({os.cpu_count()} cores, shared). The two trainer steps lower to '
          'the same program (tests/trainer/test_nnx.py), so the ratio is '
          'the noise of the machine. nnx.jit splits and merges the model '
          'and optimizer on the host at every call: '
          f'{small_ms["nnx_jit"] - small_ms["nnx"]:.2f} ms a call at batch '
          f'{SMALL_BATCH}, lost in the noise of a {step_ms["nnx"]:.0f} ms '
          'step at batch 128.'),
      'details': {'batch_size': setups['linen'].setup.schedule.batch_size,
                  'small_batch_size': SMALL_BATCH,
                  'load_average_1min': [load_before, load_after],
                  'steps_per_unit': n, 'small_steps_per_unit': small_n,
                  'rounds': rounds, 'small_rounds': small_rounds,
                  'seconds': seconds, 'small_seconds': small,
                  'nnx_over_linen_per_round': ratios,
                  'small_nnx_jit_over_nnx_per_round': jit_ratios},
  }
