"""Freezing NNX params: ``nnx.Optimizer(wrt=...)`` from the freeze regexes.

The NNX counterpart of ``test_freeze.py``: the optimizer's ``wrt`` and the
gradient's ``nnx.DiffState`` come from ``hooks.nnx_freeze.freeze_filter``, so
frozen params get no slots and no gradient; ``hooks.freeze_state((model,
optimizer), patterns)`` changes the frozen set, carrying slots by key.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import hooks
from hooks import nnx_freeze
from hooks import nnx_state
from tests.hooks import helpers
from tests.hooks import nnx_families

LR = 1e-2
# One object each: nnx.jit compiles once per optimizer structure, which
# includes its tx and wrt (see _wrt).
ADAMW = optax.adamw(LR, weight_decay=0.1)
HOOKS_ADAM = hooks.optim.adam(LR)
OPTAX_ADAM = optax.adam(LR)


def _loss(model: nnx.Module, images: jax.Array, labels: jax.Array
          ) -> jax.Array:
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer,
                images: jax.Array, labels: jax.Array) -> jax.Array:
  # Only the optimizer's wrt is differentiated: frozen params are constants.
  grad_fn = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, optimizer.wrt))
  loss, grads = grad_fn(model, images, labels)
  optimizer.update(model, grads)
  return loss


def _model() -> nnx_families.TinyCNN:
  """The NNX TinyCNN holding Linen TinyCNN's params (same names, shapes).

  The Linen params are initialised once per process (compiled, cached); an
  NNX init would compile its own initialisers.
  """
  model = nnx.eval_shape(lambda: nnx_families.TinyCNN(rngs=nnx.Rngs(0)))
  return nnx_state.write(model, hooks.flatten(
      {'params': helpers.init_params()}))


@functools.lru_cache(maxsize=None)
def _wrt(patterns: tuple[str, ...]):
  return nnx_freeze.freeze_filter(_model(), patterns)


def _frozen_state(tx: optax.GradientTransformation, patterns: tuple[str, ...]):
  model = _model()
  return model, nnx.Optimizer(model, tx, wrt=_wrt(patterns))


def _flat(state) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in nnx_state.flatten(state).items()}


def test_frozen_params_stay_bit_identical_under_adamw_with_weight_decay():
  model, optimizer = _frozen_state(ADAMW, ('Conv_.*', 'Dense_0/.*'))
  start = _flat(model)
  for i in range(4):
    _train_step(model, optimizer, *helpers.batch(i))
  end = _flat(model)
  for key in start:
    frozen = key.startswith(('params/Conv_', 'params/Dense_0/'))
    assert np.array_equal(end[key], start[key]) == frozen, key
  assert int(optimizer.step[...]) == 4


def test_frozen_params_have_no_slots():
  model, optimizer = _frozen_state(ADAMW, ('Conv_.*', 'Dense_0/.*'))
  slots = [k for k in nnx_state.flatten((model, optimizer))
           if k.startswith('opt_state/')]
  assert slots and not [k for k in slots if 'Conv_' in k or 'Dense_0' in k]
  assert sorted(k for k in slots if k.startswith('opt_state/0/mu/')) == [
      'opt_state/0/mu/Dense_1/bias', 'opt_state/0/mu/Dense_1/kernel']


def test_frozen_params_get_no_gradient_computed():
  """DiffState(0, wrt) leaves frozen params out of the gradient, and XLA
  compiles no backward convolution for frozen convolutions."""
  graphdef, state = nnx.split(_model())
  images, labels = helpers.batch()

  def compiled(wrt):
    def grads(state):
      grad_fn = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))
      return grad_fn(nnx.merge(graphdef, state), images, labels)

    return jax.jit(grads).lower(state).compile()

  full, frozen = compiled(nnx.Param), compiled(_wrt(('Conv_.*',)))
  paths = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(frozen(state))]
  assert sorted(paths) == ['Dense_0/bias', 'Dense_0/kernel', 'Dense_1/bias',
                           'Dense_1/kernel']
  if jax.default_backend() == 'cpu':  # GPUs lower convolutions to custom calls.
    # Forward: 2 convolutions. Full backward adds 2 filter grads, 1 input grad.
    assert full.as_text().count('convolution(') == 5
    assert frozen.as_text().count('convolution(') == 2
  assert (frozen.cost_analysis()['flops']
          < 0.6 * full.cost_analysis()['flops'])


def test_unfreezing_carries_slots_by_key_and_gives_new_params_fresh_ones():
  model, optimizer = _frozen_state(HOOKS_ADAM, ('Conv_0/.*',))
  for i in range(3):
    _train_step(model, optimizer, *helpers.batch(i))
  old = _flat((model, optimizer))
  model, thawed = hooks.freeze_state((model, optimizer), [])
  assert thawed is not optimizer and thawed.wrt is nnx.Param
  new = _flat((model, thawed))
  carried = [k for k in old if k.startswith('opt_state/')]
  assert carried and not [k for k in carried if 'Conv_0' in k]
  for key in carried:
    np.testing.assert_array_equal(new[key], old[key], strict=True)
  np.testing.assert_array_equal(new['opt_state/0/count/Dense_1/kernel'], 3)
  assert new['step'] == 3 and new['step'].dtype == np.uint32
  fresh = sorted(k for k in new if k.startswith('opt_state/') and k not in old)
  assert fresh == [f'opt_state/0/{slot}/Conv_0/{name}'
                   for slot in ('count', 'mu', 'nu')
                   for name in ('bias', 'kernel')]
  for key in fresh:
    np.testing.assert_array_equal(new[key], np.zeros_like(new[key]),
                                  strict=True)
  # Refreezing drops the slots of the frozen params and keeps the others.
  model, refrozen = hooks.freeze_state((model, thawed), ['Conv_1/.*'])
  again = _flat((model, refrozen))
  assert not [k for k in again if k.startswith('opt_state/') and 'Conv_1' in k]
  for key in ('opt_state/0/mu/Conv_0/kernel', 'opt_state/0/nu/Dense_1/bias'):
    np.testing.assert_array_equal(again[key], new[key], strict=True)


def _first_update_after_unfreezing(tx: optax.GradientTransformation
                                   ) -> tuple[float, dict[str, np.ndarray]]:
  """Trains with Conv_0 frozen 'long' (counts set to 1000), unfreezes it,
  steps once.

  Returns:
    The largest change of Conv_0/kernel in learning rates, and the counts.
  """
  model, optimizer = _frozen_state(tx, ('Conv_0/.*',))
  _train_step(model, optimizer, *helpers.batch(0))
  flat = nnx_state.flatten((model, optimizer))
  counts = {k: np.full(np.shape(v), 1000, np.asarray(v).dtype)
            for k, v in flat.items() if '/count' in k}
  nnx_state.write((model, optimizer), {**flat, **counts})
  model, optimizer = hooks.freeze_state((model, optimizer), [])
  before = np.asarray(model.Conv_0.kernel[...])
  _train_step(model, optimizer, *helpers.batch(1))
  change = np.abs(np.asarray(model.Conv_0.kernel[...]) - before).max() / LR
  counts = {k: v for k, v in _flat((model, optimizer)).items() if '/count' in k}
  return float(change), counts


def test_per_element_adam_counts_give_newly_unfrozen_params_no_kick():
  # hooks.optim.adam: a fresh slot's count is 0, so its first step is Adam's
  # first step: at most the learning rate.
  change, counts = _first_update_after_unfreezing(HOOKS_ADAM)
  assert 0.5 < change <= 1.0, change
  np.testing.assert_array_equal(counts['opt_state/0/count/Conv_0/kernel'], 1)
  np.testing.assert_array_equal(counts['opt_state/0/count/Dense_1/kernel'],
                                1001)
  # optax.adam shares one count: the fresh moments are bias-corrected as if
  # they had 1000 steps of history, and the first step overshoots.
  change, counts = _first_update_after_unfreezing(OPTAX_ADAM)
  assert change > 2.0, change
  np.testing.assert_array_equal(counts['opt_state/0/count'], 1001)


class _LoRANet(nnx.Module):
  """A LoRA layer trained through its adapters only (``wrt=nnx.LoRAParam``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.Dense_0 = nnx.LoRA(3, 2, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)


def _mu_keys(state) -> list[str]:
  return sorted(k for k in nnx_state.flatten(state)
                if k.startswith('opt_state/0/mu/'))


def test_freezing_keeps_what_the_optimizer_trains_and_unfreezing_returns_to_it():
  model = _LoRANet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, hooks.optim.adam(1e-3), wrt=nnx.LoRAParam)
  assert _mu_keys((model, optimizer)) == ['opt_state/0/mu/Dense_0/lora_a',
                                          'opt_state/0/mu/Dense_0/lora_b']
  _, frozen = hooks.freeze_state((model, optimizer), ['Dense_0/lora_a'])
  # The head (an nnx.Param, not trained by this optimizer) stays untrained.
  assert _mu_keys((model, frozen)) == ['opt_state/0/mu/Dense_0/lora_b']
  _, unfrozen = hooks.freeze_state((model, frozen), [])
  assert unfrozen.wrt is nnx.LoRAParam
  assert _mu_keys((model, unfrozen)) == _mu_keys((model, optimizer))


def test_a_model_and_optimizer_is_viewed_once_and_freeze_state_asks_for_the_pair():
  model = _LoRANet(nnx.Rngs(0))
  both = nnx.ModelAndOptimizer(model, optax.sgd(0.1, momentum=0.9))
  flat = nnx_state.flatten(both)
  assert 'params/head/kernel' in flat and 'step' in flat
  assert not [k for k in flat if k.startswith('model/')]
  with pytest.raises(ValueError, match=r'pass \(model, nnx.Optimizer\), not '
                     'a ModelAndOptimizer alone'):
    hooks.freeze_state(both, ['head/.*'])
