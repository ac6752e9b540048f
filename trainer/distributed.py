"""Devices and hosts: one `data` mesh axis over every device of every process.

Params are replicated; each global batch is split along the `data` axis and
every process builds its part from its own rows of that batch.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Topology:
  """The mesh and the two shardings the trainer uses."""
  mesh: jax.sharding.Mesh
  batch: NamedSharding
  replicated: NamedSharding

  @property
  def device_count(self) -> int:
    return self.mesh.size


def initialize(coordinator_address: str | None, num_processes: int,
               process_id: int) -> None:
  """Joins a multi-process run; a no-op for a single process.

  On CPU the processes exchange gradients through gloo collectives.

  Args:
    coordinator_address: host:port of process 0's coordinator.
    num_processes: number of processes in the run.
    process_id: this process's index, 0..num_processes-1.
  """
  if num_processes <= 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info('Joined %d processes as process %d (coordinator %s).',
               num_processes, process_id, coordinator_address)


def topology() -> Topology:
  """The `data` mesh over all devices of all processes."""
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(AxisType.Auto,))
  return Topology(mesh=mesh,
                  batch=NamedSharding(mesh, PartitionSpec('data')),
                  replicated=NamedSharding(mesh, PartitionSpec()))


def check_divisible(name: str, batch_size: int, device_count: int) -> None:
  """Raises ConfigError unless `batch_size` splits evenly over the devices."""
  if batch_size % device_count:
    raise ConfigError(
        f'{name} ({batch_size}) must be divisible by the global device count '
        f'({device_count}); choose a multiple of {device_count}.')


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
  """The rows of a global batch whose shards live on this process."""
  indices = sharding.addressable_devices_indices_map((global_rows,)).values()
  starts = [index[0].start or 0 for index in indices]
  stops = [global_rows if index[0].stop is None else index[0].stop
           for index in indices]
  return slice(min(starts), max(stops))


def shard_batch(batch: dict[str, np.ndarray],
                sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places a global numpy batch on the mesh, this process's rows only."""
  rows = local_rows(sharding, next(iter(batch.values())).shape[0])
  return {
      key: jax.make_array_from_process_local_data(
          sharding, value[rows], value.shape)
      for key, value in batch.items()
  }
