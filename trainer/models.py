"""Models, looked up by name and Flax API so that a config can choose one.

The trainer holds a model as two pure functions of a params dict (`Model`):
`init(rng) -> params` and `apply({'params': params}, images) -> log-probs`,
what a flax `TrainState` keeps as `apply_fn`. A Linen module gives them as
`module.init` and `module.apply`. An NNX module is split once, abstractly,
into its static graph (`nnx.GraphDef`) and its params; `apply` merges the
graph with the params it is given (`nnx.merge`, inside the caller's
`jax.jit`) and calls the module, so an NNX step is jitted and dispatched as a
Linen one is. The NNX CNN has the Linen CNN's attribute names, so both give
the same flat keys (`params/Conv_0/kernel`, ...) and the same checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

Params = Any  # Nested dicts of arrays under the Linen names.


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


class NnxCNN(nnx.Module):
  """`CNN` written in NNX: the same layers, names, initialisers and ops.

  Attribute names are Linen's auto-names, so the params' paths and shapes
  (and so the trainer's flat keys) are the Linen CNN's. Param values differ
  for the same seed: NNX draws its initial values in another order.
  """

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    # pylint: disable=invalid-name
    self.Conv_0 = nnx.Conv(INPUT_SHAPE[-1], 32, kernel_size=(3, 3),
                           rngs=rngs)
    self.Conv_1 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.Dense_0 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
    self.Dense_1 = nnx.Linear(256, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = relu(self.Conv_0(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = relu(self.Conv_1(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = relu(self.Dense_0(x))
    return nnx.log_softmax(self.Dense_1(x))


APIS = ('linen', 'nnx')
MODELS: dict[str, Callable[..., nn.Module]] = {'cnn': CNN}
# The same models written in NNX, under the same names.
NNX_MODELS: dict[str, Callable[..., nnx.Module]] = {'cnn': NnxCNN}
# The classifier layer of each model: its last axis is one column per class,
# which surgery maps by digit label.
HEADS: dict[str, str] = {'cnn': 'Dense_1'}

INPUT_SHAPE = (28, 28, 1)


def _registered(registry: dict[str, Callable[..., Any]], name: str,
                what: str) -> Callable[..., Any]:
  if name not in registry:
    raise KeyError(f'unknown {what} {name!r}; known: {sorted(registry)}')
  return registry[name]


def create(name: str, num_classes: int) -> nn.Module:
  """Builds the Linen model registered as `name`.

  Args:
    name: a key of MODELS.
    num_classes: size of the output layer.

  Returns:
    The Flax module.

  Raises:
    KeyError: `name` is not registered.
  """
  return _registered(MODELS, name, 'model')(num_classes=num_classes)


def create_nnx(name: str, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the NNX model registered as `name`, its params drawn from `rngs`.

  Args:
    name: a key of NNX_MODELS.
    num_classes: size of the output layer.
    rngs: the NNX random streams (`params` draws the initial values).

  Returns:
    The NNX module.

  Raises:
    KeyError: `name` is not registered.
  """
  return _registered(NNX_MODELS, name, 'NNX model')(num_classes, rngs=rngs)


def init_params(model: nn.Module, rng: jax.Array) -> Params:
  """Initialises the Linen model's params for one MNIST image."""
  return model.init(rng, jnp.ones((1,) + INPUT_SHAPE, jnp.float32))['params']


@dataclasses.dataclass(frozen=True)
class NnxApply:
  """`apply_fn` of an NNX model: merges its graph with params, then calls it.

  Equal for equal graphs, so states built from the same model have the same
  pytree structure and a jitted step never retraces for a new object.

  Attributes:
    graphdef: the model's static structure (`nnx.graphdef`).
  """
  graphdef: nnx.GraphDef

  def __call__(self, variables: dict[str, Params], images: jax.Array
               ) -> jax.Array:
    return nnx.merge(self.graphdef, variables['params'])(images)

  def model(self, params: Params) -> nnx.Module:
    """The NNX module holding `params` (e.g. a TrainState's)."""
    return nnx.merge(self.graphdef, params)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model as the trainer holds it: pure functions of a params dict.

  Attributes:
    init: `rng -> params`, nested dicts under the Linen names.
    apply: `({'params': params}, images) -> log-probabilities`; a
      TrainState's `apply_fn`.
    api: 'linen' or 'nnx', the API the model is written in.
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  api: str


def _nnx_init(name: str, num_classes: int, rng: jax.Array) -> Params:
  model = create_nnx(name, num_classes, nnx.Rngs(params=rng))
  return nnx.state(model, nnx.Param).to_pure_dict()


def _nnx_graphdef(name: str, num_classes: int) -> nnx.GraphDef:
  """The model's graph; only params allowed (no memory allocated)."""
  abstract = nnx.eval_shape(
      lambda: create_nnx(name, num_classes, nnx.Rngs(params=0)))
  graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
  others = [('/'.join(map(str, path)), type(variable).__name__)
            for path, variable in nnx.to_flat_state(rest)]
  if others:
    raise ValueError(
        f'the NNX model {name!r} holds state other than nnx.Param {others}, '
        'which the trainer does not carry; keep only nnx.Param variables in '
        'it.')
  return graphdef


def build(name: str, num_classes: int, api: str = 'linen') -> Model:
  """The model `name`, written in `api`, as the trainer's pure functions.

  Args:
    name: a key of MODELS (and of NNX_MODELS for 'nnx').
    num_classes: size of the output layer.
    api: 'linen' or 'nnx'.

  Returns:
    The model's `init` and `apply`.

  Raises:
    KeyError: `name` is not registered for `api`.
    ValueError: `api` is unknown, or the NNX model holds non-param state.
  """
  if api == 'linen':
    module = create(name, num_classes)
    return Model(init=functools.partial(init_params, module),
                 apply=module.apply, api=api)
  if api == 'nnx':
    return Model(init=functools.partial(_nnx_init, name, num_classes),
                 apply=NnxApply(_nnx_graphdef(name, num_classes)), api=api)
  raise ValueError(f'unknown Flax API {api!r}; use one of {list(APIS)}')
