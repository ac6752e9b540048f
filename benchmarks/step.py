"""`step`: the trainer's train step against hand-written flax+optax steps.

All sides train the default CNN (batch 128, SGD momentum 0.9, learning rate
0.1) on the same device-resident batches, interleaved round by round. The
trainer side is what a user running the trainer gets: `trainer.steps.
train_step` as the loop runs it (`trainer.run.Run.train_step`: metrics summed
on device, state donated, compiled with the options `trainer.xla` chooses;
Eigen convolutions on a CPU). The hand-written side (`fixtures.hand_step`,
`nn.relu`) runs twice: at jax's defaults, as a user's own loop would, and
with the trainer's compiler options, which shows how much of the gain is the
options and how much the trainer's own step. One step of the trainer and of
the hand loop at jax's defaults, from the same params and batch, must give
allclose params. Also: the FLOPs of the CNN's forward and backward pass
(XLA's cost analysis and a count by hand), the GFLOP/s the trainer achieves,
this machine's dense float32 matmul peak measured in the same run, and the
load average (the goal's ratio counts only when measured on an idle
machine).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks import fixtures
from benchmarks.nnx_step import iqr
from trainer import models

NAME = 'step'
BATCHES = 4
GOAL = 1.5  # Trainer / hand loop at jax's defaults (issue 12).
IDLE_LOAD = 0.5  # The goal counts at a 1-minute load average below this.
PEAK_STRETCH = 0.45  # Stretch: this fraction of the matmul peak.
ATOL = 1e-6  # Params after one step, trainer vs hand at defaults.


def analytic_flops(num_classes: int = 10) -> dict[str, int]:
  """Multiply-adds x 2 of the CNN per example, padded taps included.

  Forward: every layer. Backward: the weight gradient of every layer and the
  input gradient of every layer but the first.
  """
  conv0 = 28 * 28 * 32 * 9 * 1 * 2
  conv1 = 14 * 14 * 64 * 9 * 32 * 2
  dense0 = 3136 * 256 * 2
  dense1 = 256 * num_classes * 2
  forward = conv0 + conv1 + dense0 + dense1
  backward = conv0 + 2 * (conv1 + dense0 + dense1)
  return {'forward': forward, 'backward': backward,
          'total': forward + backward}


def xla_flops(batch: int, num_classes: int = 10) -> float:
  """XLA's cost analysis of the CNN's forward and backward, per example."""
  model = models.create('cnn', num_classes)
  params = models.init_params(model, jax.random.key(0))
  images = jnp.zeros((batch, 28, 28, 1), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)

  def loss(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  compiled = jax.jit(jax.value_and_grad(loss)).lower(
      params, images, labels).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops']) / batch


def matmul_peak(n: int, repeats: int) -> float:
  """GFLOP/s of a jitted n x n float32 jnp.dot (median of `repeats`)."""
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  seconds = []
  for _ in range(repeats):
    t = common.now()
    jax.block_until_ready(dot(a, a))
    seconds.append(common.now() - t)
  return 2 * n ** 3 / common.median(seconds) / 1e9


class HandLoop:
  """A hand-written step with its carry, as `fixtures.timed_steps` wants."""

  def __init__(self, compiler_options: dict[str, Any] | None = None):
    model, tx = fixtures.SeedCNN(), fixtures.hand_sgd()
    self._step = fixtures.hand_step(model, tx, compiler_options)
    self.carry = fixtures.hand_carry(model, tx)

  def __call__(self, batch: dict[str, Any]) -> None:
    self.carry = self._step(self.carry, batch['image'], batch['label'])

  def block(self) -> None:
    jax.block_until_ready(self.carry)


def one_step_difference(run: Any, batch: dict[str, Any]) -> float:
  """Max |params difference| after one step: trainer vs hand at defaults.

  Both start from the trainer's initial params and take the same batch.
  """
  state = fixtures.trainer_state(run)
  params = jax.device_get(state.params)
  trained, _ = run.train_step(state, run.empty_metrics(), batch)
  tx = fixtures.hand_sgd()
  hand = fixtures.hand_step(fixtures.SeedCNN(), tx)
  carry = jax.device_put((params, tx.init(params), np.float32(0),
                          np.int32(0)))
  by_hand = hand(carry, batch['image'], batch['label'])[0]
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(jax.device_get(trained.params)),
                             jax.tree.leaves(jax.device_get(by_hand))))


def run(size: common.Size) -> dict[str, Any]:
  """Interleaves the trainer and the two hand loops; returns the figures."""
  load_before = os.getloadavg()[0]
  run = fixtures.trainer_run(fixtures.config())
  options = run.setup.compilation.compiler_options
  batch_size = run.setup.schedule.batch_size
  batches = fixtures.device_batches(run, BATCHES)
  difference = one_step_difference(run, batches[0])
  n = size.steps
  units = {'trainer': fixtures.TrainerStep(run),
           'hand_default': HandLoop(),
           'hand_options': HandLoop(options)}
  units = {name: fixtures.timed_steps(side, batches, n)
           for name, side in units.items()}
  for unit in units.values():  # Compile and warm up.
    unit()
  seconds = common.interleaved(units, size.rounds)
  load_after = os.getloadavg()[0]
  eps = {name: batch_size * n / common.median(s)
         for name, s in seconds.items()}
  over_default = common.round_ratios(seconds['hand_default'],
                                     seconds['trainer'])
  over_options = common.round_ratios(seconds['hand_options'],
                                     seconds['trainer'])
  options_gain = common.round_ratios(seconds['hand_default'],
                                     seconds['hand_options'])
  ratio, (q1, q3) = common.median(over_default), iqr(over_default)
  same_options = common.median(over_options)
  flops = xla_flops(batch_size)
  counted = analytic_flops()
  gflops = eps['trainer'] * flops / 1e9
  peak = matmul_peak(256 if size.tiny else 2048, 3 if size.tiny else 10)
  allclose = difference <= ATOL
  idle = load_before < IDLE_LOAD
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure(
              'trainer / hand-written examples/s', ratio, 'x',
              f'>= {GOAL} against the hand loop at jax\'s defaults (nn.relu, '
              f'no compiler options), at load average < {IDLE_LOAD}, params '
              f'allclose after a step; stretch: >= {PEAK_STRETCH:.0%} of the '
              'matmul peak', ratio >= GOAL and allclose and idle, cmd,
              stretch_met=gflops / peak >= PEAK_STRETCH, iqr=[q1, q3],
              load_average=load_before),
          common.figure(
              'trainer / hand-written examples/s, both with the trainer\'s '
              'compiler options', same_options, 'x',
              '>= 1.0 (>= 0.97 within noise)', same_options >= 0.97, cmd),
          common.figure(
              'hand-written with / without the trainer\'s compiler options '
              'examples/s', common.median(options_gain), 'x', '-', None, cmd),
          common.figure(
              'max |params difference| after one step, trainer vs hand at '
              'defaults', difference, '', f'<= {ATOL:g} (allclose)',
              allclose, cmd),
          common.figure('load average (1 min) before the run', load_before,
                        '', f'< {IDLE_LOAD}', idle, cmd),
          common.figure('trainer examples/s', eps['trainer'], 'ex/s', '-',
                        None, cmd),
          common.figure('hand-written examples/s (jax\'s defaults)',
                        eps['hand_default'], 'ex/s', '-', None, cmd),
          common.figure('hand-written examples/s (trainer\'s compiler '
                        'options)', eps['hand_options'], 'ex/s', '-', None,
                        cmd),
          common.figure('CNN forward+backward FLOPs per example (XLA cost '
                        'analysis)', flops / 1e6, 'MFLOP',
                        f'about 27 (by hand: {counted["total"] / 1e6:.1f})',
                        None, cmd),
          common.figure('trainer achieved', gflops, 'GFLOP/s', '-', None,
                        cmd),
          common.figure('float32 matmul peak (jnp.dot '
                        f'{256 if size.tiny else 2048}^2)', peak, 'GFLOP/s',
                        '-', None, cmd),
          common.figure('trainer achieved / matmul peak', gflops / peak, 'x',
                        f'stretch >= {PEAK_STRETCH}', None, cmd,
                        stretch_met=gflops / peak >= PEAK_STRETCH),
      ],
      'notes': (
          f'Trainer / hand loop at jax\'s defaults: median of {size.rounds} '
          f'interleaved rounds of {n} steps, IQR {q1:.2f}-{q3:.2f}; load '
          f'average (1 min) {load_before:.2f} before the run and '
          f'{load_after:.2f} after it (which counts this benchmark\'s own '
          f'threads; {os.cpu_count()} cores). The trainer compiles its steps '
          f'with {options} (trainer/xla.py: on a CPU, convolutions through '
          'Eigen rather than YNNPACK); the hand loop with the same options '
          'shows that gain alone, and the trainer / hand ratio with the same '
          'options what is left: trainer.models.relu (a custom_jvp whose '
          'differentiated form lets XLA:CPU fuse each conv bias add). After '
          f'one step the params differ by at most {difference:.2g}.'),
      'details': {
          'batch_size': batch_size, 'steps_per_unit': n,
          'rounds': size.rounds, 'compiler_options': options,
          'load_average_1min': [load_before, load_after],
          'seconds': seconds,
          'trainer_over_hand_default_per_round': over_default,
          'trainer_over_hand_options_per_round': over_options,
          'hand_options_over_hand_default_per_round': options_gain,
          'flops_per_example_xla': flops,
          'flops_per_example_by_hand': counted,
      },
  }
