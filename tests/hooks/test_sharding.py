"""Every built-in hook keeps each leaf's sharding (4 forced CPU devices).

The test runs this module in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4
(`python -m tests.hooks.test_sharding OUT`): it places the CNN family's
state on a 2 x 2 (data x model) mesh by RULES (slots like their params,
the rest replicated) and runs each registered hook on it, with the contract
test's example for the CNN: hooks that edit a live state through
`hooks.apply` (each leaf must keep its input's sharding), hooks that read
another layout through `hooks.restore` into the sharded state (each leaf
must take its target's sharding, new shapes included).
`hooks.freeze_state` freezing and unfreezing goes through the same check:
fresh slots take their param's sharding, and fresh counts may be
uncommitted, as optax's are. The subprocess writes
each leaf whose sharding differs to OUT/shardings.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

import hooks
from tests.hooks import families
from tests.hooks import helpers
from tests.hooks import test_contract

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
RULES = {'Dense_0/kernel': (None, 'model'),  # (32, 16)
         'Dense_0/bias': ('model',),
         'Conv_1/kernel': (None, None, None, 'data'),  # FSDP-style.
         'Dense_1/kernel': ('data', None)}  # The head, resized by hooks.


def shardings(flat: dict[str, Any], mesh: jax.sharding.Mesh
              ) -> dict[str, NamedSharding]:
  """RULES' sharding of each params/ key and of its slots of its shape.

  Other leaves (the step, scalars, counts of another shape) are replicated.
  """
  specs = {f'params/{path}': PartitionSpec(*spec)
           for path, spec in RULES.items()}
  for key, slots in hooks.slot_index(flat).items():
    specs.update((slot, specs[key]) for slot in slots if key in specs
                 and np.shape(flat[slot]) == np.shape(flat[key]))
  return {k: NamedSharding(mesh, specs.get(k, PartitionSpec())) for k in flat}


def place(state: Any, mesh: jax.sharding.Mesh) -> Any:
  flat = hooks.flatten(state)
  return hooks.unflatten(jax.device_put(flat, shardings(flat, mesh)), state)


def differences(out: Any, want: dict[str, Any], *, fresh_ok: bool = False
                ) -> dict[str, list[str]]:
  """Key -> [sharding, wanted] for each leaf of `out` not placed as wanted.

  With `fresh_ok`, a leaf to be replicated may also be uncommitted: a fresh
  scalar or count that `tx.init` made, as optax makes its own; jit places
  it with the rest.
  """
  return {key: [repr(leaf.sharding), repr(want[key])]
          for key, leaf in hooks.flatten(out).items()
          if leaf.sharding != want[key] and not (
              fresh_ok and not leaf.committed
              and want[key].spec == PartitionSpec())}


def _hook(name: str, opt: str, mesh: Any, donor: str) -> dict[str, Any]:
  example = test_contract.EXAMPLES['cnn'][name]
  entry = {'name': name, **{k: donor if v == test_contract.DONOR else v
                            for k, v in example.params.items()}}
  used = place(families.CNN.used(opt, seed=0, step=3), mesh)
  fresh = place(families.CNN.state(opt, seed=1), mesh)
  rng = jax.random.key(0)
  if example.checkpoint is None:
    out, report = hooks.apply(used, [entry], rng=rng, fresh=lambda: fresh)
    want = {k: v.sharding for k, v in hooks.flatten(used).items()}
  else:
    flat = {k: np.asarray(v) for k, v in hooks.flatten(used).items()}
    reader = helpers.MemoryReader(example.checkpoint(flat))
    out, report = hooks.restore(reader, fresh, [entry], rng=rng,
                                fresh=lambda: fresh)
    want = {k: v.sharding for k, v in hooks.flatten(fresh).items()}
  acted = [k for k in report.keys()
           if {a.action for a in report.actions(k)} != {'unchanged'}]
  return {'acted': len(acted), 'differ': differences(out, want)}


def _freeze(opt: str, mesh: Any) -> dict[str, Any]:
  used = place(families.CNN.used(opt, seed=0, step=3), mesh)
  frozen = hooks.freeze_state(used, ['Conv_.*'])
  thawed = hooks.freeze_state(frozen, [])  # Conv slots start fresh.
  differ = {}
  for state in (frozen, thawed):
    flat = hooks.flatten(state)
    differ.update(differences(state, shardings(flat, mesh), fresh_ok=True))
  return {'acted': 1, 'differ': differ}


def main(out: str) -> None:
  assert jax.device_count() == 4, 'set XLA_FLAGS before starting'
  mesh = jax.make_mesh((2, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  record = {}
  for opt in families.OPTIMIZERS:
    donor = os.path.join(out, f'donor_{opt}')
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(donor, place(families.CNN.used(opt, seed=2, step=7),
                                   mesh))
    checkpointer.wait_until_finished()
    for name in hooks.names():
      record[f'{opt}/{name}'] = _hook(name, opt, mesh, donor)
    record[f'{opt}/freeze_state'] = _freeze(opt, mesh)
  with open(os.path.join(out, 'shardings.json'), 'w') as f:
    json.dump(record, f)


def test_every_built_in_hook_keeps_each_leafs_sharding(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(
      [sys.executable, '-m', 'tests.hooks.test_sharding', str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'shardings.json') as f:
    record = json.load(f)
  want = {f'{opt}/{name}' for opt in families.OPTIMIZERS
          for name in [*hooks.names(), 'freeze_state']}
  assert set(record) == want
  for run, result in record.items():
    assert result['acted'] > 0, f'{run} did nothing'
    assert result['differ'] == {}, run
  assert re.search(r'\bresize_head\b', ' '.join(record))


if __name__ == '__main__':
  main(sys.argv[1])
