"""Models, looked up by name so that a config can choose one."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """The convolutional network of the Flax model-surgery document.

  Parameter names (Conv_0, Conv_1, Dense_0, Dense_1) and shapes are the seed's:
  824,458 parameters at ten classes.
  """
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


MODELS: dict[str, Callable[..., nn.Module]] = {'cnn': CNN}

INPUT_SHAPE = (28, 28, 1)


def create(name: str, num_classes: int) -> nn.Module:
  """Builds the model registered as `name`.

  Args:
    name: a key of MODELS.
    num_classes: size of the output layer.

  Returns:
    The Flax module.

  Raises:
    KeyError: `name` is not registered.
  """
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; known: {sorted(MODELS)}')
  return MODELS[name](num_classes=num_classes)


def init_params(model: nn.Module, rng: jax.Array) -> dict:
  """Initialises the model's params for one MNIST image."""
  return model.init(rng, jnp.ones((1,) + INPUT_SHAPE, jnp.float32))['params']
