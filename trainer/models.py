"""Models, looked up by name so that a config can choose one."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
  """max(x, 0), as `nn.relu`: the same values and gradients, compiled faster.

  Undifferentiated (inference, eval, frozen layers) it is `max`, which XLA's
  CPU backend fuses with the convolutions and pooling around it. Under
  differentiation the JVP rule below writes the value as a select on
  `x <= 0`: XLA then fuses each conv's bias add into the conv and keeps the
  pre-activation once, instead of materialising it and a broadcast zero
  (on a CPU the loss gradient is about 1.4x faster, the whole train step
  about 1.1x; benchmarks/step.py). NaNs propagate as with `max`; the
  gradient is 0 where x <= 0, as `nn.relu`'s.
  """
  return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
  x, = primals
  t, = tangents
  return jnp.where(x <= 0, 0, x), jnp.where(x > 0, t, 0)


class CNN(nn.Module):
  """The convolutional network of the Flax model-surgery document.

  Parameter names (Conv_0, Conv_1, Dense_0, Dense_1) and shapes are the seed's:
  824,458 parameters at ten classes.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = relu(x)
    x = nn.Dense(features=self.num_classes)(x)
    return nn.log_softmax(x)


MODELS: dict[str, Callable[..., nn.Module]] = {'cnn': CNN}
# The classifier layer of each model: its last axis is one column per class,
# which surgery maps by digit label.
HEADS: dict[str, str] = {'cnn': 'Dense_1'}

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
