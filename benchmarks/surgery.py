"""`surgery`: flatten, hooks, freeze, validate, unflatten, per leaf.

Synthetic TrainStates of 10^2, 10^3 and 10^4 param leaves (small kernels and
biases, plus a 10-class head `Dense_1`) with `hooks.optim.adam` slots (mu,
nu and a per-element count: four flat leaves per param). One surgery, as the
trainer's post_init phase runs it (`hooks.apply`):

1. `hooks.apply` flattens the state (its `expected_structure` is the
   target), runs the hooks, validating the structure after every hook, places
   new leaves like the leaves they replace and unflattens into the state.
   The hooks: `warm_start` from a flax msgpack donor, whose rename rules map
   a tenth of the layers to the donor's own names, and whose label spec puts
   the donor's 5-class head into columns 0-4 of the 10-class head (a resize
   by class label); then a hook that reports the frozen params;
2. `hooks.freeze` builds the optimizer of the frozen phase over the params
   (a tenth of the layers frozen). Unfreezing (`hooks.carry_opt_state` into a
   fresh Adam state) is timed apart.

Untouched leaves must come out as the very same objects; the whole surgery
runs under `jax.transfer_guard_device_to_host('disallow')`, and the host
conversions of device arrays (`jax.Array._value`, which a CPU backend does
not guard) are counted: there must be none. The reference timed side by side
is the floor of any flat-key surgery: `jax.tree_util.tree_flatten_with_path`
and `tree_unflatten` of the same state.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from typing import Any, Iterator

import flax.serialization
from flax.training import train_state
import jax
from jax._src import array as jax_array  # For the host-conversion counter.
import numpy as np

from benchmarks import common
import hooks

NAME = 'surgery'
FEATURES = 4
CLASSES = 10
DONOR_CLASSES = 5


# A tenth of the layers each: indices ending in 0 are copied, in 1 frozen.
COPIED = r'layer_\d*0/.*'
FROZEN = r'layer_\d*1/.*'


def _params(num_leaves: int, rng: np.random.Generator,
            prefix: str = 'layer', classes: int = CLASSES) -> dict[str, Any]:
  params: dict[str, Any] = {}
  for i in range((num_leaves - 2) // 2):
    params[f'{prefix}_{i:05d}'] = {
        'kernel': rng.standard_normal((FEATURES, FEATURES), np.float32),
        'bias': rng.standard_normal((FEATURES,), np.float32)}
  params['Dense_1'] = {
      'kernel': rng.standard_normal((FEATURES, classes), np.float32),
      'bias': np.zeros((classes,), np.float32)}
  return params


def build_state(num_leaves: int) -> train_state.TrainState:
  """The fresh state of the frozen phase, as the trainer builds it."""
  params = jax.device_put(_params(num_leaves, np.random.default_rng(0)))
  tx = hooks.freeze(hooks.optim.adam(1e-3), params, [FROZEN])
  return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)


def write_donor(num_leaves: int, path: str) -> None:
  """A flax msgpack file: the layers under 'old_*' names, a 5-class head."""
  params = _params(num_leaves, np.random.default_rng(1), prefix='old',
                   classes=DONOR_CLASSES)
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize({'params': params}))


def _record_frozen(flat: dict[str, Any],
                   ctx: hooks.Context) -> dict[str, Any]:
  for key in hooks.param_keys(flat, [FROZEN]):
    ctx.report.record(key, 'frozen')
  return flat


def surgery(state: train_state.TrainState, donor: str) -> tuple[Any, Any]:
  """The surgery the benchmark times; returns the new state and the report.

  As the trainer's post_init phase: `hooks.apply` over the fresh state (each
  hook's result validated against its structure), then the optimizer of the
  frozen phase built over the params (`hooks.freeze`).
  """
  warm_start = {
      'name': 'warm_start', 'donor': donor,
      'include': [COPIED, 'Dense_1/.*'],
      'rename': [(r'layer_(\d+)/(.*)', r'old_\1/\2')],
      'labels': [{'layers': 'Dense_1', 'axis': -1,
                  'donor': list(range(DONOR_CLASSES)),
                  'target': list(range(CLASSES))}]}
  new_state, report = hooks.apply(state, [warm_start, _record_frozen],
                                  rng=jax.random.key(0), fresh=lambda: state)
  hooks.freeze(hooks.optim.adam(1e-3), state.params, [FROZEN])
  return new_state, report


def phase_change(state: train_state.TrainState) -> Any:
  """Unfreezing: the optimizer state of the next phase, slots carried."""
  tx = hooks.optim.adam(1e-3)
  return hooks.carry_opt_state(hooks.flatten(state), tx, state.params)


@contextlib.contextmanager
def _count_host_conversions() -> Iterator[list[int]]:
  """Counts device arrays turned into host arrays, however it is done.

  On a CPU backend `np.asarray(jax_array)` reads the buffer in place and
  the transfer guard does not see it, so numpy's converters and the
  Array's own (`__array__`, `_value`) are wrapped while the surgery runs.
  """
  count = [0]
  patched = []

  def wrap(owner: Any, name: str, is_property: bool = False) -> None:
    original = getattr(owner, name)
    if is_property:
      def counted_property(self):
        count[0] += 1
        return original.fget(self)
      setattr(owner, name, property(counted_property))
    else:
      def counted(x, *args, **kwargs):
        if isinstance(x, jax.Array):
          count[0] += 1
        return original(x, *args, **kwargs)
      setattr(owner, name, counted)
    patched.append((owner, name, original))

  for name in ('asarray', 'array', 'ascontiguousarray', 'asanyarray'):
    wrap(np, name)
  wrap(jax_array.ArrayImpl, '__array__')
  wrap(jax_array.ArrayImpl, '_value', is_property=True)
  try:
    yield count
  finally:
    for owner, name, original in reversed(patched):
      setattr(owner, name, original)


def _same_objects(before: Any, after: Any, report: Any) -> tuple[int, int]:
  """(untouched leaves, how many of them are the very same objects)."""
  old = hooks.flatten(before)
  touched = {k for k in report.keys()
             if any(a.action in ('copied', 'resized')
                    for a in report.actions(k))}
  untouched = same = 0
  for key, leaf in hooks.flatten(after).items():
    if key in touched:
      continue
    untouched += 1
    same += leaf is old.get(key)
  return untouched, same


def _tree_floor(state: Any) -> None:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in leaves])


def run(size: common.Size) -> dict[str, Any]:
  """Times the surgery at each size; checks identity and host transfers."""
  sizes = (100,) if size.tiny else (100, 1000, 10000)
  repeats = {100: 10, 1000: 5, 10000: 3}
  figures, details = [], {}
  cmd = common.command(NAME)
  with tempfile.TemporaryDirectory(prefix='bench-surgery-') as tmp:
    for n in sizes:
      state = build_state(n)
      donor = os.path.join(tmp, f'donor_{n}.msgpack')
      write_donor(n, donor)
      t = common.now()
      surgery(state, donor)  # Warm-up: compiles the eager ops once.
      first = common.now() - t

      def surgery_unit(state=state, donor=donor) -> float:
        gc.collect()  # Not the garbage of the units before.
        t = common.now()
        surgery(state, donor)
        return common.now() - t

      def floor_unit(state=state) -> float:
        gc.collect()
        t = common.now()
        _tree_floor(state)
        return common.now() - t

      def phase_unit(state=state) -> float:
        gc.collect()
        t = common.now()
        jax.block_until_ready(phase_change(state))
        return common.now() - t

      phase_unit()
      rounds = 1 if size.tiny else repeats[n]
      seconds = common.interleaved({'surgery': surgery_unit,
                                    'tree_floor': floor_unit,
                                    'unfreeze_carry': phase_unit}, rounds)
      with _count_host_conversions() as conversions:
        guard_error = None
        try:
          with jax.transfer_guard_device_to_host('disallow'):
            new_state, report = surgery(state, donor)
        except Exception as e:  # pylint: disable=broad-except
          guard_error = f'{type(e).__name__}: {e}'[:300]
          new_state, report = surgery(state, donor)
      untouched, same = _same_objects(state, new_state, report)
      leaves = len(hooks.flatten(state))
      total = common.median(seconds['surgery'])
      ratio = common.median(common.round_ratios(seconds['surgery'],
                                                seconds['tree_floor']))
      details[str(n)] = {
          'param_leaves': n, 'flat_leaves': leaves, 'seconds': seconds,
          'untouched': untouched, 'untouched_same_objects': same,
          'host_conversions': conversions[0], 'guard_error': guard_error,
          'report_totals': report.totals()}
      figures.append(common.figure(
          f'surgery of {n} params ({leaves} flat leaves)', total * 1e3, 'ms',
          '< 1000 ms' if n == 10000 else '-',
          total < 1.0 if n == 10000 else None, cmd))
      figures.append(common.figure(
          f'first surgery of a new {n}-param structure (warm-up)',
          first * 1e3, 'ms', '-', None, cmd))
      figures.append(common.figure(
          f'surgery of {n} params, per flat leaf', total / leaves * 1e6,
          'us', '-', None, cmd))
      figures.append(common.figure(
          f'surgery / tree flatten+unflatten floor, {n} params', ratio, 'x',
          '-', None, cmd))
      figures.append(common.figure(
          f'unfreeze: carry_opt_state into a fresh Adam state, {n} params',
          common.median(seconds['unfreeze_carry']) * 1e3, 'ms', '-', None,
          cmd))
      figures.append(common.figure(
          f'untouched leaves that are the same objects, {n} params',
          f'{same}/{untouched}', '', 'all', same == untouched, cmd))
      figures.append(common.figure(
          f'device-to-host copies, {n} params',
          conversions[0] + (guard_error is not None), '', '0 (guard on)',
          conversions[0] == 0 and guard_error is None, cmd))
  return {
      'figures': figures, 'details': details,
      'notes': (
          'Flat keys depend only on the tree structure: hooks.flatten '
          'builds key paths (tens of microseconds a leaf) once per '
          'structure and then reuses them, which is why the first surgery '
          'of a new structure costs more. The unfreeze figure is '
          'carry_opt_state, dominated by optax building the fresh Adam '
          'state leaf by leaf (tx.init).'),
  }
