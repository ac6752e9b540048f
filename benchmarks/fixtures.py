"""The two sides of the in-process benchmarks: the trainer, and a hand loop.

The hand-written side is what a careful user writes from the Flax and optax
documentation: the seed document's CNN with `nn.Conv`, `nn.relu` and
`nn.avg_pool`, one jitted step with the whole carry donated, loss and
accuracy summed on device, no host sync per step.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import optax

from benchmarks import common
from configs import default
from trainer import run as run_lib


class SeedCNN(nn.Module):
  """The seed document's CNN, written the usual way (same param names)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=self.num_classes)(x)
    return nn.log_softmax(x)


def hand_step(model: nn.Module, tx: optax.GradientTransformation,
              compiler_options: dict[str, Any] | None = None) -> Any:
  """One jitted step over a donated carry (params, opt_state, sums).

  Args:
    model: the module.
    tx: the optimizer.
    compiler_options: `jax.jit`'s; None: jax's defaults, as a user's loop.
  """

  @functools.partial(jax.jit, donate_argnums=(0,),
                     compiler_options=compiler_options)
  def step(carry, images, labels):
    params, opt_state, loss_sum, correct = carry

    def loss_fn(p):
      logits = model.apply({'params': p}, images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    correct = correct + (logits.argmax(-1) == labels).sum()
    return params, opt_state, loss_sum + loss, correct

  return step


def hand_carry(model: nn.Module, tx: optax.GradientTransformation,
               seed: int = 0) -> Any:
  params = model.init(jax.random.key(seed),
                      jax.numpy.ones((1, 28, 28, 1)))['params']
  return (params, tx.init(params), jax.numpy.zeros(()),
          jax.numpy.zeros((), jax.numpy.int32))


def hand_sgd() -> optax.GradientTransformation:
  """The default config's optimizer, written directly."""
  return optax.sgd(0.1, momentum=0.9)


def hand_frozen_sgd(params: Any, frozen: Sequence[str]) -> Any:
  """optax.set_to_zero on the top-level layers in `frozen`, SGD elsewhere."""
  labels = {layer: jax.tree.map(
      lambda _, f=layer in frozen: 'frozen' if f else 'trainable', leaves)
            for layer, leaves in params.items()}
  return optax.multi_transform(
      {'trainable': hand_sgd(), 'frozen': optax.set_to_zero()}, labels)


def config(**overrides: Any) -> Any:
  """The default config on the embedded data, with dotted-key overrides."""
  cfg = default.get_config()
  cfg.data_source = 'embedded'
  cfg.update_from_flattened_dict(overrides)
  return cfg


def trainer_run(cfg: Any) -> run_lib.Run:
  """The trainer's `Run` of `cfg`, in a workdir nothing is written to."""
  # prepare() only checks that the workdir could be created; nothing is
  # written there by the in-process benchmarks.
  workdir = os.path.join(tempfile.gettempdir(), 'bench-unused-workdir')
  return run_lib.Run.prepare(cfg, workdir)


def trainer_state(run: run_lib.Run) -> Any:
  """The state train_and_evaluate starts from (no hooks), in its phase."""
  return run.enter_phase(run.fresh_state(), 0)


class TrainerStep:
  """The trainer's loop step (`Run.train_step`), with its carry.

  `trainer.steps.train_step` as the loop runs it: metrics added to running
  totals in the same program, state and totals donated.
  """

  def __init__(self, run: run_lib.Run):
    self._run = run
    self.state = trainer_state(run)
    self.totals = run.empty_metrics()

  def __call__(self, batch: dict[str, Any]) -> None:
    self.state, self.totals = self._run.train_step(self.state, self.totals,
                                                   batch)

  def block(self) -> None:
    jax.block_until_ready((self.state, self.totals))


def timed_steps(side: Any, batches: Sequence[Any], steps: int
                ) -> Callable[[], float]:
  """A unit for `common.interleaved`: seconds of `steps` calls of `side`.

  Args:
    side: a step with `__call__(batch)` and `block()` (e.g. `TrainerStep`).
    batches: the batches, used in turn.
    steps: how many steps one unit runs.

  Returns:
    A function that runs the steps, waits for the device and returns the
    seconds.
  """
  def unit() -> float:
    t = common.now()
    for i in range(steps):
      side(batches[i % len(batches)])
    side.block()
    return common.now() - t
  return unit


def device_batches(run: run_lib.Run, count: int) -> list[dict[str, Any]]:
  """The run's first `count` train batches, placed as the trainer places them."""
  return list(itertools.islice(run.train_batches(), count))
