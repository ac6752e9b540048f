"""Devices and hosts: the mesh, where each leaf of the state lives, batches.

The mesh's axes and sizes come from `config.mesh` (by default a `data` axis
over every device of every process and a `model` axis of size 1). Global
batches are split along `data`; every process builds its part from its own
rows of each batch. Params are placed by `config.partition_rules`: regexes
over param paths (`Dense_0/kernel`, as the hooks name them) to
PartitionSpecs, matched fully, in order, the first match winning; a param no
rule matches is replicated. An optimizer slot takes its param's spec (the
slots `hooks.slot_index` finds: an `opt_state/.../<param path>` key of the
param's shape); everything else (the step, counts, metrics) is replicated.
So a large axis can be split over `model`, or over `data` FSDP-style, and
each device holds its shard of the param and of its slots.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

import hooks
from trainer.errors import ConfigError

DATA = 'data'  # The mesh axis batches are split along.
_PARAMS = 'params/'


@dataclasses.dataclass(frozen=True)
class Rule:
  """One entry of config.partition_rules, checked.

  Attributes:
    index: its position in config.partition_rules (for messages).
    pattern: a regex over param paths, matched with `re.fullmatch`.
    spec: the PartitionSpec of the params it matches.
  """
  index: int
  pattern: str
  spec: PartitionSpec

  def __str__(self) -> str:
    return (f'config.partition_rules[{self.index}]=({self.pattern!r}, '
            f'{tuple(self.spec)!r})')


@dataclasses.dataclass(frozen=True)
class Topology:
  """The mesh, the partition rules, and the shardings the trainer uses.

  Attributes:
    mesh: every device of every process, under config.mesh's axes.
    batch: a global batch, split along `data`.
    replicated: a leaf every device holds whole.
    rules: the checked partition rules, in order.
  """
  mesh: jax.sharding.Mesh
  batch: NamedSharding
  replicated: NamedSharding
  rules: tuple[Rule, ...] = ()

  @property
  def device_count(self) -> int:
    return self.mesh.size

  @property
  def data_size(self) -> int:
    """The size of the `data` axis: how many parts a batch is split into."""
    return self.mesh.shape[DATA]

  def check(self, params: dict[str, Any]) -> None:
    """Checks the rules against the model's params, before anything runs.

    Args:
      params: param path (`Dense_0/kernel`) -> leaf with a shape.

    Raises:
      ConfigError: a rule matches no param (with close paths), or shards a
        dimension its mesh axes do not divide.
    """
    for rule in self.rules:
      try:
        hooks.match_keys([rule.pattern], params)
      except ValueError as e:
        raise ConfigError(f'{rule} matches no param of the model: {e} Each '
                          'rule names param paths (without "params/").'
                          ) from e
    matched = hooks.match_keys([r.pattern for r in self.rules], params,
                               allow_empty=True)
    for path, index in matched.items():
      self._spec(self.rules[index], path, np.shape(params[path]))

  def _spec(self, rule: Rule, path: str,
            shape: tuple[int, ...]) -> PartitionSpec:
    if len(rule.spec) > len(shape):
      raise ConfigError(
          f'{rule} gives {len(rule.spec)} dimensions, but param {path!r} has '
          f'shape {shape} ({len(shape)} dimensions); write at most '
          f'{len(shape)} entries.')
    for dim, entry in enumerate(rule.spec):
      names = _names(entry)
      size = math.prod(self.mesh.shape[name] for name in names)
      if shape[dim] % size:
        raise ConfigError(
            f'{rule} splits dimension {dim} of param {path!r} (shape {shape}) '
            f'over mesh axes {names} of size {size}, which does not divide '
            f'{shape[dim]}; shard another dimension, or change '
            'config.mesh.shape so that the axes divide it.')
    return rule.spec

  def specs(self, tree: Any) -> dict[str, PartitionSpec]:
    """Flat key -> PartitionSpec of every leaf the rules place.

    Args:
      tree: a TrainState, its flat view, or any pytree of arrays,
        ShapeDtypeStructs or tracers; params under `params/`.

    Returns:
      The spec of each matched param and of its slots of the param's shape;
      other keys (the step, scalars, counts of another shape) are left out:
      replicated.
    """
    flat = hooks.flatten(tree)
    params = {k[len(_PARAMS):]: k for k in flat if k.startswith(_PARAMS)}
    matched = hooks.match_keys([r.pattern for r in self.rules], params,
                               allow_empty=True)
    out = {}
    for path, index in matched.items():
      key = params[path]
      out[key] = self._spec(self.rules[index], path, np.shape(flat[key]))
    for key, slots in hooks.slot_index(flat).items():
      if key in out:  # Not hooks.optim's (1, 1)-like counts: replicated.
        out.update((slot, out[key]) for slot in slots
                   if np.shape(flat[slot]) == np.shape(flat[key]))
    return out

  def shardings(self, tree: Any) -> Any:
    """The NamedSharding of every leaf of `tree`, as a tree of its structure.

    Args:
      tree: a TrainState, or any pytree of arrays, ShapeDtypeStructs or
        tracers (e.g. metrics: every leaf replicated).

    Returns:
      `tree` with each leaf replaced by its sharding.
    """
    flat = hooks.flatten(tree)
    specs = self.specs(flat)
    return hooks.unflatten(
        {k: NamedSharding(self.mesh, specs[k]) if k in specs
         else self.replicated for k in flat}, tree)

  def place(self, tree: Any) -> Any:
    """`tree` on the devices, each leaf with its sharding (one transfer)."""
    return jax.device_put(tree, self.shardings(tree))

  def constrain(self, tree: Any) -> Any:
    """`tree` inside a jitted function, its leaves held to their shardings.

    What `out_shardings` does for a jitted step, for a state whose structure
    (and so whose shardings) changes with the freeze phase.
    """
    return jax.lax.with_sharding_constraint(tree, self.shardings(tree))


def _names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


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


def mesh_shape(axes: Sequence[str], shape: Sequence[int],
               device_count: int) -> tuple[int, ...]:
  """config.mesh's sizes with -1 resolved to the rest of the devices.

  Args:
    axes: config.mesh.axes: distinct names, one of them `data`.
    shape: config.mesh.shape: one size per axis, each > 0, or -1 for one
      axis (the devices the others leave).
    device_count: the global device count.

  Returns:
    The sizes, whose product is `device_count`.

  Raises:
    ConfigError: naming the field, its value and what is allowed.
  """
  axes, shape = tuple(axes), tuple(shape)
  if (not axes or len(set(axes)) != len(axes) or DATA not in axes
      or not all(isinstance(a, str) and a for a in axes)):
    raise ConfigError(f'config.mesh.axes={axes!r} is not allowed: name '
                      f"distinct axes, one of them {DATA!r} (batches are "
                      "split along it), e.g. ('data', 'model').")
  if len(shape) != len(axes) or not all(
      isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1)
      for s in shape) or shape.count(-1) > 1:
    raise ConfigError(
        f'config.mesh.shape={shape!r} is not allowed: give one size > 0 per '
        f'axis of config.mesh.axes={axes!r}, or -1 for one of them (the '
        'devices the others leave).')
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape and device_count % fixed == 0:
    return tuple(device_count // fixed if s == -1 else s for s in shape)
  if fixed != device_count or -1 in shape:
    raise ConfigError(
        f'config.mesh.shape={shape!r} over axes {axes!r} does not fit the '
        f'{device_count} devices: the sizes must multiply to {device_count} '
        '(with -1 for one axis, the others must divide it).')
  return shape


def parse_rules(rules: Sequence[Any], axes: Sequence[str]
                ) -> tuple[Rule, ...]:
  """Checks config.partition_rules' form (their params are checked later).

  Args:
    rules: (regex over param paths, spec) pairs; a spec is a tuple with one
      entry per leading dimension: None (not split), a mesh axis name, or a
      tuple of names.
    axes: the mesh's axis names.

  Returns:
    The rules, in order.

  Raises:
    ConfigError: naming the bad rule and the fix.
  """
  if isinstance(rules, (str, dict)) or not isinstance(rules, Sequence):
    raise ConfigError(f'config.partition_rules={rules!r} is not allowed: '
                      "give a list of (regex, spec) pairs, e.g. "
                      "[('Dense_0/kernel', (None, 'model'))].")
  out = []
  for index, entry in enumerate(rules):
    where = f'config.partition_rules[{index}]={entry!r}'
    if (not isinstance(entry, Sequence) or isinstance(entry, str)
        or len(entry) != 2 or not isinstance(entry[0], str)
        or isinstance(entry[1], str) or not isinstance(entry[1], Sequence)):
      raise ConfigError(
          f"{where} is not allowed: write (regex, spec), e.g. "
          "('Dense_0/kernel', (None, 'model')): a spec has one entry per "
          'leading dimension.')
    pattern, spec = entry
    try:
      hooks.match_keys([pattern], [], allow_empty=True)
    except ValueError as e:
      raise ConfigError(f'{where}: {e}') from e
    used: list[str] = []
    for item in spec:
      names_ok = isinstance(item, Sequence) and all(
          isinstance(name, str) for name in item)
      if not (item is None or isinstance(item, str) or names_ok):
        raise ConfigError(f'{where}: spec entry {item!r} is not allowed: use '
                          'None, a mesh axis name or a tuple of names.')
      used.extend(_names(item))
    unknown = [name for name in used if name not in axes]
    if unknown:
      raise ConfigError(f'{where} names mesh axes {unknown} that '
                        f'config.mesh.axes={tuple(axes)!r} does not have; use '
                        'those axes.')
    if len(set(used)) != len(used):
      raise ConfigError(f'{where} uses a mesh axis twice; each axis may split '
                        'one dimension.')
    out.append(Rule(index, pattern, PartitionSpec(
        *(tuple(item) if isinstance(item, (list, tuple)) else item
          for item in spec))))
  return tuple(out)


def topology(axes: Sequence[str] = (DATA,), shape: Sequence[int] = (-1,),
             rules: Sequence[Any] = ()) -> Topology:
  """The run's mesh over all devices of all processes, and its rules.

  Args:
    axes: config.mesh.axes.
    shape: config.mesh.shape (-1: the rest of the devices).
    rules: config.partition_rules.

  Returns:
    The topology; `Topology.check` then checks the rules against the
    model's params.

  Raises:
    ConfigError: a bad mesh or rule.
  """
  sizes = mesh_shape(axes, shape, jax.device_count())
  checked = parse_rules(rules, axes)
  mesh = jax.make_mesh(sizes, tuple(axes),
                       axis_types=(AxisType.Auto,) * len(sizes))
  return Topology(mesh=mesh,
                  batch=NamedSharding(mesh, PartitionSpec(DATA)),
                  replicated=NamedSharding(mesh, PartitionSpec()),
                  rules=checked)


def check_divisible(name: str, batch_size: int, topo: Topology) -> None:
  """Raises ConfigError unless `batch_size` splits evenly along `data`."""
  data, devices = topo.data_size, topo.device_count
  if batch_size % data == 0:
    return
  if data == devices:
    raise ConfigError(
        f'{name} ({batch_size}) must be divisible by the global device count '
        f'({devices}); choose a multiple of {devices}.')
  raise ConfigError(
      f'{name} ({batch_size}) must be divisible by the size of the mesh axis '
      f"{DATA!r} ({data} of the {devices} devices, config.mesh.shape="
      f'{tuple(topo.mesh.shape.values())}); choose a multiple of {data}.')


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
