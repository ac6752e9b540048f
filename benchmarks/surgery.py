"""`surgery`: flatten, hooks, freeze, validate, unflatten, per leaf.

Synthetic TrainStates of 270, 2,700 and 27,000 param leaves (small kernels
and biases, plus a 10-class head `Dense_1`) with `hooks.optim.adam` slots
(mu, nu and a count per param; the frozen tenth has none): 997, 9,991 and
99,901 flat leaves. One surgery, as the trainer's post_init phase runs it
(`hooks.apply`):

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

Goals (issue 12): at most 1.3x the cost per flat leaf at 10^5 leaves as at
10^3, and 10^5 leaves under 1 s.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from typing import Any

import flax.serialization
from flax.training import train_state
import jax
import numpy as np

from benchmarks import common
from benchmarks import surgery_checks
import hooks

NAME = 'surgery'
# Param leaves: about 10^3, 10^4 and 10^5 flat leaves with Adam's slots.
SIZES = (270, 2700, 27000)
TINY_SIZES = (27, 270)
ROUNDS = 3
REPEATS = (15, 5, 3)  # Surgeries a process times, per size: ~1 s or more.
# carry_opt_state (optax's tx.init, leaf by leaf) takes ~30 s at 10^5 leaves.
UNFREEZE_MAX = 2700
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


def _tree_floor(state: Any) -> None:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in leaves])


def _times(fn: Any, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `fn`, each after a collection."""
  out = []
  for _ in range(repeats):
    gc.collect()  # Not the garbage of the calls before.
    t = common.now()
    jax.block_until_ready(fn())
    out.append(common.now() - t)
  return out


def _child(n: int, repeats: int, check: bool) -> dict[str, Any]:
  """One size in a fresh process: its state is all that lives there, as in
  a trainer (a collection walks every live object)."""
  with tempfile.TemporaryDirectory(prefix='bench-surgery-') as tmp:
    state, donor = build_state(n), os.path.join(tmp, 'donor.msgpack')
    write_donor(n, donor)
    t = common.now()
    surgery(state, donor)  # Warm-up: compiles the eager ops once.
    out = {'first': [common.now() - t],
           'flat_leaves': len(hooks.flatten(state)),
           'surgery': _times(lambda: surgery(state, donor), repeats),
           'floor': _times(lambda: _tree_floor(state), repeats)}
    if n <= UNFREEZE_MAX:
      phase_change(state)  # Warm-up.
      out['unfreeze'] = _times(lambda: phase_change(state), repeats)
    if check:
      out.update(surgery_checks.checks(state, lambda: surgery(state, donor)))
  return out


def _size_figures(n: int, d: dict[str, Any], cmd: str) -> list[dict]:
  leaves, med = d['flat_leaves'], common.median
  total = med(d['rounds'])  # The median of the processes' medians.
  out = [
      common.figure(f'surgery of {n} params ({leaves} flat leaves)',
                    total * 1e3, 'ms', '-', None, cmd),
      common.figure(f'first surgery of a new {n}-param structure (warm-up)',
                    med(d['first']) * 1e3, 'ms', '-', None, cmd),
      common.figure(f'surgery of {n} params, per flat leaf',
                    total / leaves * 1e6, 'us', '-', None, cmd),
      common.figure(f'surgery / tree flatten+unflatten floor, {n} params',
                    med(common.round_ratios(d['surgery'], d['floor'])), 'x',
                    '-', None, cmd)]
  if d['unfreeze']:
    out.append(common.figure(
        f'unfreeze: carry_opt_state into a fresh Adam state, {n} params',
        med(d['unfreeze']) * 1e3, 'ms', '-', None, cmd))
  same, untouched = d['untouched_same_objects'], d['untouched']
  guarded = d['guard_error'] is None
  return out + [
      common.figure(f'untouched leaves that are the same objects, {n} params',
                    f'{same}/{untouched}', '', 'all', same == untouched, cmd),
      common.figure(f'device-to-host copies, {n} params',
                    d['host_conversions'] + (not guarded), '',
                    '0 (guard on)', d['host_conversions'] == 0 and guarded,
                    cmd)]


def run(size: common.Size) -> dict[str, Any]:
  """Times each size in fresh processes, sizes alternating round by round
  (a slow spell of the machine hits all sizes alike); the per-leaf ratio,
  largest size against smallest, is taken round by round."""
  sizes = TINY_SIZES if size.tiny else SIZES
  rounds = 1 if size.tiny else ROUNDS
  cmd = common.command(NAME)
  details: dict[str, Any] = {
      str(n): {'param_leaves': n, 'first': [], 'surgery': [], 'floor': [],
               'unfreeze': [], 'rounds': []} for n in sizes}
  load_before = os.getloadavg()[0]
  for r in range(rounds):
    for i in range(len(sizes))[::1 if r % 2 == 0 else -1]:
      n, d = sizes[i], details[str(sizes[i])]
      repeats = 2 if size.tiny else REPEATS[i]
      child = common.run_child(
          ['-m', 'benchmarks.surgery', str(n), str(repeats), str(r == 0)],
          timeout=1200)
      d['rounds'].append(common.median(child['surgery']))
      for key in ('first', 'surgery', 'floor', 'unfreeze'):
        d[key] += child.get(key, [])
      d.update({k: v for k, v in child.items() if k not in d})
  load_after = os.getloadavg()[0]
  small, large = details[str(sizes[0])], details[str(sizes[-1])]
  per_leaf = [(b / large['flat_leaves']) / (a / small['flat_leaves'])
              for a, b in zip(small['rounds'], large['rounds'])]
  ratio = common.median(per_leaf)
  total = common.median(large['rounds'])
  figures = [
      common.figure(
          f'surgery per flat leaf, {large["flat_leaves"]:,} / '
          f'{small["flat_leaves"]:,} flat leaves', ratio, 'x', '<= 1.3',
          ratio <= 1.3, cmd),
      common.figure(
          f'surgery of {large["flat_leaves"]:,} flat leaves (params + Adam '
          'slots)', total * 1e3, 'ms', '< 1000 ms', total < 1.0, cmd)]
  for n in sizes:
    figures += _size_figures(n, details[str(n)], cmd)
  details['per_leaf_ratios'] = per_leaf
  details['load_average'] = {'before': load_before, 'after': load_after}
  return {
      'figures': figures, 'details': details,
      'notes': (
          f'Each size runs in its own processes ({rounds} rounds, sizes '
          'alternating; a process gives the median of its repeats), so only '
          'its state is alive, as in a trainer. Load average (1 min) '
          f'{load_before:.2f} at the start, {load_after:.2f} at the end (2 '
          'cores, shared). hooks.apply and hooks.restore pause the cyclic '
          'garbage collector (hooks.runner.gc_paused): each full collection '
          'walks every live object, which made surgery superlinear. The '
          'first surgery of a structure builds its key paths once. Unfreeze '
          '(carry_opt_state) is dominated by optax building the fresh Adam '
          'state (tx.init); it is not timed at 10^5 leaves.'),
  }


if __name__ == '__main__':
  print(json.dumps(_child(int(sys.argv[1]), int(sys.argv[2]),
                          sys.argv[3] == 'True')))
