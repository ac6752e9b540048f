"""Warm starts into sharded targets: what each process reads, and what it gets.

`python -m benchmarks.donor_shards DONORS OUT [--coordinator_address A
--num_processes N --process_id I]` runs in each process of a run (one
process of 4 forced CPU devices, or N processes of 2 devices each on gloo).
Over the global 2 x 2 `data` x `model` mesh it builds a target whose leaves
are sharded by `SPECS`, and warm-starts it (`warm_start`, through
`hooks.apply`) from each donor:

- `one_chunk`: `ocp.StandardCheckpointer` from numpy, every tensor one chunk
  (`write_donors`, in the parent process);
- `chunked`: a `CheckpointManager` step, `StandardSave` with
  `SaveArgs(chunk_byte_size=CHUNK)` (`write_donors`);
- `sharded`: saved here, by all processes at once, with
  `ocp.StandardCheckpointer` from the sharded arrays (one chunk a shard).

For each it writes OUT/process_<I>.json: the `rchar` delta of
/proc/self/io around the warm start, the process's own shard bytes (its
distinct addressable shards), the report's notes, and per leaf its sharding,
its shard shapes and whether its shards hold the donor's values. `launch`
starts the processes and returns their records (the `donor` benchmark and
tests/hooks/test_sharded_donors.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Any

import numpy as np

from benchmarks import common

MESH = (2, 2)  # data x model.
# key -> (shape, PartitionSpec entries): most split across processes (the
# `data` axis), one is held whole by each process, one is replicated.
SPECS = {
    'params/Dense_0/kernel': ((2048, 1024), ('data', 'model')),
    'params/Dense_0/bias': ((1024,), ('model',)),
    'params/Dense_1/kernel': ((1024, 2048), (None, ('data', 'model'))),
    'params/Conv_0/kernel': ((3, 3, 64, 128), (None, None, None, 'data')),
    'step': ((), ()),
}
CHUNK = 256 * 1024  # chunk_byte_size of the chunked donor: below any shard.
DONORS = ('one_chunk', 'chunked', 'sharded')


def value(key: str) -> np.ndarray:
  """The donor's value of `key` (the same in every process)."""
  shape = SPECS[key][0]
  if not shape:
    return np.int32(7)
  rng = np.random.default_rng(sorted(SPECS).index(key))
  return rng.normal(size=shape).astype(np.float32)


def tree(leaves: dict[str, Any]) -> dict[str, Any]:
  """A nested dict (a TrainState's layout) of flat `leaves`."""
  out: dict[str, Any] = {}
  for key, leaf in leaves.items():
    *path, last = key.split('/')
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[last] = leaf
  return out


def write_donors(directory: str) -> None:
  """Writes `one_chunk` and `chunked` under `directory`, as users save."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = tree({key: value(key) for key in SPECS})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, 'one_chunk'), state)
  checkpointer.wait_until_finished()
  chunked = {key: ocp.SaveArgs(chunk_byte_size=CHUNK) for key in SPECS}
  with ocp.CheckpointManager(os.path.join(directory, 'chunked')) as manager:
    manager.save(3, args=ocp.args.StandardSave(
        state, save_args=tree(chunked)))
    manager.wait_until_finished()


def _rchar() -> int:
  with open('/proc/self/io') as f:
    for line in f:
      if line.startswith('rchar:'):
        return int(line.split()[1])
  raise RuntimeError('/proc/self/io has no rchar')


def _target(mesh: Any) -> dict[str, Any]:
  """Zeros, sharded by SPECS, built on each process from its own shards."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  out = {}
  for key, (shape, spec) in SPECS.items():
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    dtype = np.int32 if not shape else np.float32
    out[key] = jax.make_array_from_callback(
        shape, sharding, lambda index, s=shape, d=dtype: np.zeros(s, d)[index])
  return out


def _leaf_record(key: str, leaf: Any, like: Any) -> dict[str, Any]:
  want = value(key)
  return {
      'same_sharding': leaf.sharding == like.sharding,
      'shard_shape': list(like.sharding.shard_shape(like.shape)),
      'shard_shapes': [list(s.data.shape) for s in leaf.addressable_shards],
      'equal': all(np.array_equal(np.asarray(s.data), want[s.index])
                   for s in leaf.addressable_shards),
  }


def _warm_start(donor: str, flat: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import hooks  # pylint: disable=g-import-not-at-top
  from hooks import shards  # pylint: disable=g-import-not-at-top
  own = sum(int(np.prod([b - a for a, b in index])) * leaf.dtype.itemsize
            for leaf in flat.values()
            for index in (shards.shard_indices(leaf)
                          or [tuple((0, n) for n in leaf.shape)]))
  before = _rchar()
  out, report = hooks.apply(
      tree(flat), [{'name': 'warm_start', 'donor': donor, 'step': 'donor'}],
      rng=jax.random.key(0))
  jax.block_until_ready(out)
  read = _rchar() - before
  out = hooks.flatten(out)
  return {'rchar': read, 'own_bytes': own, 'ratio': read / own,
          'notes': report.notes,
          'leaves': {k: _leaf_record(k, out[k], flat[k]) for k in SPECS}}


def run(donors: str, out_dir: str) -> dict[str, Any]:
  """Saves the `sharded` donor with every process, then warm-starts."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh(MESH, ('data', 'model'))
  flat = _target(mesh)
  donor = {k: jax.make_array_from_callback(
      v.shape, v.sharding, lambda index, k=k: np.asarray(value(k))[index])
           for k, v in flat.items()}
  sharded = os.path.join(donors, f'sharded_{jax.process_count()}')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(sharded, tree(donor))
  checkpointer.wait_until_finished()
  multihost_utils.sync_global_devices('donor_shards: saved')
  record = {'process_index': jax.process_index(),
            'process_count': jax.process_count(),
            'device_count': jax.device_count(),
            'donors': {}}
  for name in DONORS:
    path = sharded if name == 'sharded' else os.path.join(donors, name)
    record['donors'][name] = _warm_start(path, flat)
  path = os.path.join(out_dir, f'process_{jax.process_index()}.json')
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  return record


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(donors: str, out: str, processes: int, devices: int,
           timeout: float = 300) -> list[dict[str, Any]]:
  """Runs `run` in `processes` fresh processes of `devices` CPU devices each.

  Args:
    donors: A directory holding `write_donors`' donors.
    out: Where each process writes its record.
    processes: 1, or the processes of one run (gloo collectives).
    devices: Forced CPU devices per process.
    timeout: Seconds each process may take.

  Returns:
    Each process's record, by process index.

  Raises:
    RuntimeError: A process failed (its output is quoted).
  """
  env = common.child_env(
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
      JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'benchmarks.donor_shards', donors, out]
  if processes > 1:
    command.append(f'--coordinator_address=127.0.0.1:{_free_port()}')
  procs = [subprocess.Popen(
      command + [f'--num_processes={processes}', f'--process_id={i}'],
      cwd=common.REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(processes)]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, output in zip(procs, outputs):
    if p.returncode:
      raise RuntimeError(f'{" ".join(p.args)} exited with {p.returncode}:\n'
                         f'{output[-3000:]}')
  records = []
  for i in range(processes):
    with open(os.path.join(out, f'process_{i}.json')) as f:
      records.append(json.load(f))
  return records


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.donor_shards')
  parser.add_argument('donors')
  parser.add_argument('out')
  parser.add_argument('--write', action='store_true',
                      help='only write the one_chunk and chunked donors')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  args = parser.parse_args(argv)
  if args.write:
    write_donors(args.donors)
    print(json.dumps({'written': args.donors}))
    return 0
  if args.num_processes > 1:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  record = run(args.donors, args.out)
  print(json.dumps({k: v['ratio'] for k, v in record['donors'].items()}))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
