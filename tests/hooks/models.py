"""Model families for the hooks tests, each with a small TrainState maker.

``BNNet``: a Flax-examples-style Linen net (Conv + BatchNorm + Dense) whose
classifier is named ``head``, in ``BNTrainState`` (a ``TrainState`` subclass
carrying ``batch_stats``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

BN_IMAGE_SHAPE = (8, 8, 1)


class BNNet(nn.Module):
  """Conv -> BatchNorm -> relu -> pool -> Dense -> ``head``."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(features=4, kernel_size=(3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(features=8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(features=self.num_classes, name='head')(x)


class BNTrainState(train_state.TrainState):
  """A TrainState with BatchNorm statistics, as in Flax's examples."""

  batch_stats: Any = None


@functools.partial(jax.jit, static_argnums=1)
def _bn_init(seed: jax.Array, num_classes: int) -> Any:
  return BNNet(num_classes).init(
      jax.random.key(seed), jnp.ones((1, *BN_IMAGE_SHAPE)))


@functools.lru_cache(maxsize=None)
def bn_variables(seed: int = 0, num_classes: int = 5) -> Any:
  """``{'params', 'batch_stats'}`` of ``BNNet``, compiled once and cached."""
  return _bn_init(jnp.asarray(seed), num_classes)


def make_bn_state(
    tx: optax.GradientTransformation,
    seed: int = 0,
    num_classes: int = 5,
) -> BNTrainState:
  """A fresh ``BNTrainState`` of ``BNNet(num_classes)``, optimizer ``tx``."""
  variables = bn_variables(seed, num_classes)
  return BNTrainState.create(
      apply_fn=BNNet(num_classes).apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx)
