"""Sharded runs on 4 forced CPU devices, for tests/trainer/test_sharding.py.

`python -m tests.trainer.sharding_runs OUT`, started with
XLA_FLAGS=--xla_force_host_platform_device_count=4, trains the tiny config
three ways: replicated (OUT/replicated), sharded by RULES on a 2 x 2 mesh
(OUT/sharded), and sharded in two invocations, 3 steps then 6
(OUT/resumed). It writes OUT/record.json: each leaf's PartitionSpec and
shard shape in the abstract state and a fresh start (Conv layers frozen),
on entering the phase that unfreezes them, after a step in it, and restored
from a checkpoint; and the ConfigError of each bad config in
BAD_CONFIGS (None where the config is accepted). One process does it all,
so JAX starts once.
"""

import json
import os
import sys
from typing import Any

import jax

import hooks
from configs import tiny
from trainer import Run
from trainer import run as run_lib
from trainer import train
from trainer.errors import ConfigError

MESH = (2, 2)
RULES = [('Dense_0/kernel', (None, 'model')),
         ('Conv_1/kernel', (None, None, None, 'data')),  # FSDP-style.
         ('Dense_.*/bias', ('model',))]  # Dense_1/bias (10,) over 2.
# Configs prepare refuses, or accepts (batch 34 splits over data = 2 only).
BAD_CONFIGS = {
    'head_over_four': {'mesh.shape': (1, 4),
                       'partition_rules': [('Dense_1/kernel',
                                            (None, 'model'))]},
    'batch_over_data': {'mesh.shape': MESH, 'batch_size': 33},
    'batch_over_data_only': {'mesh.shape': MESH, 'batch_size': 34},
    'mesh_does_not_fit': {'mesh.shape': (3, -1)},
}


def config(**overrides: Any) -> Any:
  """The tiny config, evaluated at the end only, dotted fields overridden."""
  cfg = tiny.get_config()
  cfg.eval_every_steps = 6
  cfg.update_from_flattened_dict(overrides)
  return cfg


def sharded(**overrides: Any) -> Any:
  return config(**{'mesh.shape': MESH, 'partition_rules': RULES, **overrides})


def _spec(sharding: Any) -> list[Any]:
  spec = list(getattr(sharding, 'spec', ()))
  while spec and spec[-1] is None:
    spec.pop()
  return [list(s) if isinstance(s, tuple) else s for s in spec]


def layout(state: Any) -> dict[str, list[Any]]:
  """Flat key -> [spec (trailing Nones dropped), shard shape]."""
  return {key: [_spec(leaf.sharding),
                list(leaf.sharding.shard_shape(leaf.shape))]
          for key, leaf in hooks.flatten(state).items()}


def _steps(out: str) -> dict[str, Any]:
  """Layouts through a fresh start, a freeze phase change and a restore."""
  run = Run.prepare(sharded(**{'freeze.patterns': ('Conv_.*',),
                               'freeze.unfreeze_steps': (1,)}),
                    os.path.join(out, 'steps'))
  start = run.start()  # Conv layers frozen: no slots.
  record = {'fresh': layout(start.state),
            'abstract': layout(run.abstract_state())}
  batches = run.train_batches(0)
  state, totals = run.train_step(start.state, run.empty_metrics(),
                                 next(batches))
  state = run.enter_phase(state, 1)  # Conv slots start fresh.
  record['entered'] = layout(state)
  state, totals = run.train_step(state, totals, next(batches))
  record['stepped'] = layout(state)
  record['stepped_shards'] = {
      key: sorted({tuple(s.data.shape) for s in leaf.addressable_shards})
      for key, leaf in hooks.flatten(state).items()}
  record['metrics'] = layout(totals)
  restored = Run.prepare(sharded(), os.path.join(out, 'sharded')).restore()
  record['restored'] = layout(restored)
  return record


def _errors(out_dir: str) -> dict[str, str | None]:
  out = {}
  for name, overrides in BAD_CONFIGS.items():
    try:
      Run.prepare(config(**overrides), os.path.join(out_dir, name),
                  load_data=False)
      out[name] = None
    except ConfigError as e:
      out[name] = str(e)
  return out


def main(out: str) -> None:
  assert jax.device_count() == 4, 'set XLA_FLAGS before starting'
  # The runs compile the same steps: compile each once.
  run_lib.enable_compilation_cache(os.path.join(out, 'compilation_cache'))
  train.train_and_evaluate(config(), os.path.join(out, 'replicated'))
  train.train_and_evaluate(sharded(), os.path.join(out, 'sharded'))
  resumed = os.path.join(out, 'resumed')
  train.train_and_evaluate(sharded(num_train_steps=3), resumed)
  train.train_and_evaluate(sharded(), resumed)
  record = {**_steps(out), 'errors': _errors(os.path.join(out, 'bad'))}
  with open(os.path.join(out, 'record.json'), 'w') as f:
    json.dump(record, f)


if __name__ == '__main__':
  main(sys.argv[1])
