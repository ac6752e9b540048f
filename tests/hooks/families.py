"""Model families as Flax users write them, for the hooks tests.

Each ``Family`` makes a ``TrainState`` (or a subclass) of one small model with
``make_state(tx, seed, **sizes)``: variables come from one jitted init per
model and are cached, optimizers are shared objects (``optimizer(name)``), so
``train_step`` traces once per family, optimizer and size.

- ``cnn``: the seed CNN (``Conv_0``, ``Conv_1``, ``Dense_0``, ``Dense_1``).
- ``bn``: ``BNNet`` from ``tests.hooks.models`` (Conv + BatchNorm + Dense,
  classifier ``head``), in ``BNTrainState`` (carries ``batch_stats``).
- ``transformer``: ``Embed_0``, one self-attention block
  (``MultiHeadDotProductAttention_0``), ``LayerNorm_0/1``, an MLP
  (``Dense_0/1``) and ``head`` over ``outputs`` (classes or the vocabulary).
- ``mlp``: three Dense layers with Flax's default names ``Dense_0..2``.

``tests.hooks.nnx_families`` has the first three in NNX (``api='nnx'``),
under the same flat names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

from hooks import flat as flat_lib
from hooks import nnx_state
from hooks import optim
from hooks import views
from tests.hooks import helpers
from tests.hooks import models

BATCH = 4
SEQ = 6
MLP_IN = 8


class TinyTransformer(nn.Module):
  """Embedding, one pre-norm self-attention block, MLP, ``head``."""

  vocab: int = 50
  outputs: int = 5
  features: int = 16
  heads: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.features)(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        nn.LayerNorm()(x))
    y = nn.relu(nn.Dense(2 * self.features)(nn.LayerNorm()(x)))
    x = x + nn.Dense(self.features)(y)
    return nn.Dense(self.outputs, name='head')(x.mean(axis=1))


class MLP(nn.Module):
  """Three Dense layers, Flax's default names."""

  outputs: int = 5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(self.outputs)(x)


@functools.lru_cache(maxsize=None)
def optimizer(name: str) -> optax.GradientTransformation:
  """``'adam'`` (``hooks.optim``, a count per tensor) or ``'sgd'`` (momentum).

  Cached: states with the same optimizer object share jit traces.
  """
  if name == 'adam':
    return optim.adam(1e-2)
  if name == 'sgd':
    return optax.sgd(1e-2, momentum=0.9)
  raise ValueError(f'Unknown optimizer {name!r}; use "adam" or "sgd".')


OPTIMIZERS = ('adam', 'sgd')


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(model: nn.Module, seed: jax.Array, shape: tuple[int, ...],
          dtype: str) -> Any:
  # XLA compiles an init with 'rbg' keys several times faster on CPU than
  # with the default threefry (seconds per model), for the same initializers.
  return model.init(jax.random.key(seed, impl='rbg'), jnp.ones(shape, dtype))


@functools.lru_cache(maxsize=None)
def variables(model: nn.Module, seed: int, shape: tuple[int, ...],
              dtype: str = 'float32') -> Any:
  """The model's variables, compiled once per model and input; cached.

  Call it outside any trace (``jax.eval_shape`` would cache tracers).
  """
  return _init(model, jnp.asarray(seed), shape, dtype)


@functools.lru_cache(maxsize=None)
def _model(cls: type[nn.Module], *args: Any) -> nn.Module:
  # One instance per model: a state's apply_fn is part of its jit cache key,
  # and two instances' bound methods do not compare equal.
  return cls(*args)


def _state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
           shape: tuple[int, ...], dtype: str = 'float32'
           ) -> train_state.TrainState:
  return train_state.TrainState.create(
      apply_fn=model.apply,
      params=variables(model, seed, shape, dtype)['params'], tx=tx)


def cnn_state(tx: optax.GradientTransformation, seed: int = 0,
              outputs: int = 5) -> train_state.TrainState:
  return _state(_model(helpers.TinyCNN, outputs), tx, seed,
                (1, *helpers.IMAGE_SHAPE))


def bn_state(tx: optax.GradientTransformation, seed: int = 0,
             outputs: int = 5) -> models.BNTrainState:
  state = models.make_bn_state(tx, seed=seed, num_classes=outputs)
  return state.replace(apply_fn=_model(models.BNNet, outputs).apply)


def transformer_state(tx: optax.GradientTransformation, seed: int = 0,
                      outputs: int = 5, vocab: int = 50
                      ) -> train_state.TrainState:
  return _state(_model(TinyTransformer, vocab, outputs), tx, seed, (1, SEQ),
                'int32')


def mlp_state(tx: optax.GradientTransformation, seed: int = 0,
              outputs: int = 5) -> train_state.TrainState:
  return _state(_model(MLP, outputs), tx, seed, (1, MLP_IN))


def _images(key: jax.Array, shape: tuple[int, ...], **_) -> jax.Array:
  return jax.random.normal(key, (BATCH, *shape))


def _tokens(key: jax.Array, vocab: int = 50, **_) -> jax.Array:
  return jax.random.randint(key, (BATCH, SEQ), 0, vocab)


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: Short id for test ids.
    make_state: ``make_state(tx, seed=0, outputs=5, **sizes)``.
    inputs: ``inputs(key, **sizes)`` -> a batch of model inputs.
    head: The classifier layer's path.
    layers: Every param layer path, in model order.
    api: ``'linen'`` (a ``TrainState``) or ``'nnx'`` (``(model,
      nnx.Optimizer)``, edited in place by hooks).
  """

  name: str
  make_state: Callable[..., Any]
  inputs: Callable[..., jax.Array]
  head: str
  layers: tuple[str, ...]
  api: str = 'linen'

  @property
  def id(self) -> str:
    """``name``, prefixed by the API unless Linen (for test ids)."""
    return self.name if self.api == 'linen' else f'{self.api}_{self.name}'

  def batch(self, seed: int = 0, outputs: int = 5, **sizes: Any
            ) -> tuple[jax.Array, jax.Array]:
    """A batch ``(inputs, labels)`` with labels in ``[0, outputs)``."""
    kx, ky = jax.random.split(jax.random.key(seed + 1000))
    return (self.inputs(kx, **sizes),
            jax.random.randint(ky, (BATCH,), 0, outputs))

  def state(self, opt: str, seed: int = 0, **sizes: Any) -> Any:
    """A fresh state with the shared optimizer ``optimizer(opt)``."""
    return self.make_state(optimizer(opt), seed=seed, **sizes)

  def used(self, opt: str, seed: int = 0, step: int = 3, **sizes: Any
           ) -> Any:
    """A state as after some training, without compiling a step.

    Every float leaf (params, batch statistics, slots) is random (``nu``
    non-negative), every integer leaf (step, Adam's counts) is
    ``step``.
    """
    return perturbed(self.state(opt, seed, **sizes), seed, step)

  def abstract(self, opt: str, **sizes: Any) -> Any:
    """The state's shapes and dtypes, computing no value.

    NNX as its users do it: ``nnx.eval_shape`` over the constructor.
    """
    if self.api == 'nnx':
      return nnx.eval_shape(lambda: self.state(opt, **sizes))
    return abstract(self.state(opt, **sizes))


CNN = Family('cnn', cnn_state,
             functools.partial(_images, shape=helpers.IMAGE_SHAPE), 'Dense_1',
             ('Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'))
BN = Family('bn', bn_state,
            functools.partial(_images, shape=models.BN_IMAGE_SHAPE), 'head',
            ('Conv_0', 'BatchNorm_0', 'Dense_0', 'head'))
TRANSFORMER = Family(
    'transformer', transformer_state, _tokens, 'head',
    ('Embed_0', 'LayerNorm_0', 'MultiHeadDotProductAttention_0/query',
     'MultiHeadDotProductAttention_0/key',
     'MultiHeadDotProductAttention_0/value',
     'MultiHeadDotProductAttention_0/out', 'LayerNorm_1', 'Dense_0',
     'Dense_1', 'head'))
MLP_FAMILY = Family('mlp', mlp_state,
                    lambda key, **_: jax.random.normal(key, (BATCH, MLP_IN)),
                    'Dense_2', ('Dense_0', 'Dense_1', 'Dense_2'))

FAMILIES = {f.name: f for f in (CNN, BN, TRANSFORMER, MLP_FAMILY)}


def _loss(params: Any, state: Any, inputs: jax.Array, labels: jax.Array
          ) -> tuple[jax.Array, Any]:
  batch_stats = getattr(state, 'batch_stats', None)
  if batch_stats is None:
    logits, updates = state.apply_fn({'params': params}, inputs), {}
  else:
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats}, inputs, train=True,
        mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), updates


@jax.jit
def train_step(state: Any, inputs: jax.Array, labels: jax.Array) -> Any:
  """One step of any family's state (BatchNorm statistics updated too)."""
  grads, updates = jax.grad(_loss, has_aux=True)(state.params, state, inputs,
                                                 labels)
  state = state.apply_gradients(grads=grads)
  if 'batch_stats' in updates:
    state = state.replace(batch_stats=updates['batch_stats'])
  return state


def perturbed(state: Any, seed: int, step: int) -> Any:
  """``state`` with random floats (``nu`` >= 0) and integers set to ``step``.

  An NNX state is copied first (``state`` keeps its values).
  """
  rng = np.random.default_rng(seed)

  def leaf(key: str, x: Any) -> np.ndarray:
    dtype = np.dtype(jnp.result_type(x))
    if not np.issubdtype(dtype, np.floating):
      return np.full(np.shape(x), step, dtype)
    value = rng.standard_normal(np.shape(x)).astype(dtype)
    return np.abs(value) if '/nu/' in key else value

  flat = {k: leaf(k, v) for k, v in views.flatten(state).items()}
  if nnx_state.is_nnx(state):
    return nnx_state.write(copy(state), jax.device_put(flat))
  return jax.device_put(flat_lib.unflatten(flat, state))


def copy(state: Any) -> Any:
  """A state a run may edit: NNX objects cloned (arrays shared), else itself.

  ``hooks.apply`` updates an NNX model and optimizer in place; a Linen
  ``TrainState`` is immutable.
  """
  return nnx.clone(state) if nnx_state.is_nnx(state) else state


def abstract(tree: Any) -> Any:
  """``tree`` with ``jax.ShapeDtypeStruct`` leaves (an abstract state)."""
  return helpers.abstract(tree)
