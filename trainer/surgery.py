"""The trainer's side of surgery: its hooks, built once, through one pipeline.

A fresh workdir starts from `config.init_from` through the pre_restore hooks
(`hooks.restore`), or from a fresh state through the post_init hooks
(`hooks.apply`). `trainer.plan` runs the same calls with `dry_run=True`. The
trainer adds what only it knows to the entries: its model's head layer and
the digit labels of its classes and of a donor run's (from the donor's
`meta` item), so a donor on digits 0-4 fills columns 0-4 of a ten-digit head.
The step-0 checkpoint records what ran; a resume never runs hooks again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax

import hooks
from trainer import models
from trainer import setup as setup_lib
from trainer import workdir as workdir_lib
from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import SurgeryError

TrainState = setup_lib.TrainState
# Hooks that copy from a donor and take `labels` for the head's columns.
_DONOR_HOOKS = ('warm_start', 'copy_params', 'copy_slots')


@dataclasses.dataclass(frozen=True)
class Surgery:
  """The hooks of a fresh start, built once, and the checkpoints they read.

  Attributes:
    sources: Opens each donor once; shared by the plan and the run.
    init_from: The reader of `config.init_from`, or None.
    entries: Phase -> the entries as run (with the trainer's additions).
    built: Phase -> the built hooks.
  """
  sources: hooks.Sources
  init_from: hooks.DonorReader | None
  entries: dict[str, list[dict[str, Any]]]
  built: dict[str, list[hooks.HookFn]]


def _open(sources: hooks.Sources, path: str, what: str, *,
          item: str | None = None, step: int | None = None
          ) -> hooks.DonorReader:
  try:
    return sources.open(path, item=item, step=step)
  except (hooks.DonorError, OSError) as e:
    raise CheckpointError(f'{what}={path!r}: {e}') from e


def _classes(reader: hooks.DonorReader) -> list[int] | None:
  """The digit labels a run of this trainer recorded in its `meta` item."""
  meta = reader.metadata.get('meta')
  classes = meta.get('classes') if isinstance(meta, dict) else None
  return None if classes is None else [int(c) for c in classes]


def _head_labels(spec: dict[str, Any], head: str, donor: list[int] | None,
                 target: list[int]) -> dict[str, Any]:
  if spec.get('layers') == head:
    spec.setdefault('target', target)
    if donor is not None:
      spec.setdefault('donor', donor)
  return spec


def _complete(entry: dict[str, Any], phase: str, index: int, setup: Any,
              sources: hooks.Sources,
              init_from: hooks.DonorReader | None) -> dict[str, Any]:
  """Adds the head layer and labels the trainer knows to one entry."""
  config = setup.config
  head = models.HEADS[config.model.name]
  target = [int(c) for c in config.classes]
  entry = dict(entry)
  name = entry.get('name')
  if name in _DONOR_HOOKS and entry.get('donor'):
    # The same arguments as the hook's, so the hook finds this reader.
    reader = _open(sources, entry['donor'],
                   f'config.hooks.{phase}[{index}].donor',
                   item=entry.get('item'), step=entry.get('donor_step'))
    donor = _classes(reader)
    if 'labels' not in entry:
      if donor is not None:
        entry['labels'] = [{'layers': head, 'axis': -1, 'donor': donor,
                            'target': target}]
    else:  # The run's own labels for a head spec that leaves them out.
      entry['labels'] = [
          _head_labels(dict(spec), head, donor, target)
          for spec in entry['labels']]
  elif name == 'resize_head':
    entry.setdefault('layer', head)
    entry.setdefault('to_classes', target)
    if 'from_classes' not in entry and init_from is not None:
      donor = _classes(init_from)
      if donor is not None:
        entry['from_classes'] = donor
  return entry


def prepare(setup: Any) -> Surgery:
  """Opens init_from and donors (once each) and builds the hooks (once).

  Args:
    setup: the checked run.

  Returns:
    The built surgery of a fresh start.

  Raises:
    CheckpointError: a donor or init_from cannot be read.
    ConfigError: a hook entry is malformed.
  """
  config = setup.config
  sources = hooks.Sources()
  init_from = (_open(sources, config.init_from, 'config.init_from')
               if config.init_from else None)
  entries, built = {}, {}
  for phase in setup_lib.HOOK_PHASES:
    entries[phase] = [
        _complete(entry, phase, i, setup, sources, init_from)
        for i, entry in enumerate(setup_lib.hook_entries(config, phase))]
    built[phase] = []
    for index, entry in enumerate(entries[phase]):
      try:
        built[phase].append(hooks.build(entry))
      except (KeyError, ValueError, TypeError, ImportError,
              AttributeError) as e:
        raise ConfigError(f'config.hooks.{phase}[{index}]: {e}') from e
  return Surgery(sources, init_from, entries, built)


def _report_frozen(setup: Any) -> hooks.HookFn:
  frozen_patterns = setup.freeze.phase_at(0)

  def freeze(flat: dict[str, Any], ctx: hooks.Context) -> dict[str, Any]:
    if frozen_patterns:
      for key in hooks.param_keys(flat, frozen_patterns):
        ctx.report.record(key, 'frozen')
    return flat
  return freeze


def _run(setup: Any, surgery: Surgery, *, dry_run: bool
         ) -> tuple[TrainState, hooks.Report]:
  """The one pipeline of a start and of its plan."""
  rng = jax.random.fold_in(jax.random.key(setup.config.seed), 1)
  fresh = lambda: setup_lib.initial_state(setup)
  phase = 'pre_restore' if surgery.init_from is not None else 'post_init'
  hook_fns = [*surgery.built[phase], _report_frozen(setup)]
  try:
    if surgery.init_from is not None:
      return hooks.restore(surgery.init_from, setup_lib.abstract_state(setup),
                           hook_fns, rng=rng, fresh=fresh,
                           sources=surgery.sources, dry_run=dry_run)
    state = (setup_lib.abstract_state(setup) if dry_run
             else setup_lib.initial_state(setup))
    return hooks.apply(state, hook_fns, rng=rng, fresh=fresh,
                       sources=surgery.sources, dry_run=dry_run)
  except hooks.DonorError as e:
    raise CheckpointError(f'{phase} hooks: {e}') from e
  except hooks.HookError as e:
    if isinstance(e.__cause__, hooks.DonorError):
      raise CheckpointError(f'{phase} hooks: {e}') from e
    raise SurgeryError(f'{phase} hooks: {e}') from e
  except hooks.StructureError as e:
    where = (f'checkpoint {surgery.init_from.path} after the pre_restore hooks'
             if surgery.init_from is not None else 'the post_init hooks')
    error = CheckpointError if surgery.init_from is not None else SurgeryError
    raise error(f'{where} do not fit the state this config builds:\n{e}'
                ) from e


def start(setup: Any) -> tuple[TrainState, dict[str, Any], hooks.Report]:
  """The state a fresh workdir starts from, what made it, and the report.

  Args:
    setup: the checked run.

  Returns:
    (state, record, report): the record goes into every checkpoint's
    metadata, the report into surgery_report.json.

  Raises:
    CheckpointError, ConfigError, SurgeryError: before anything is written.
  """
  surgery = prepare(setup)
  state, report = _run(setup, surgery, dry_run=False)
  record: dict[str, Any] = dict(surgery.entries)
  # The record goes into every checkpoint: the number of tensors read, not
  # their keys (surgery_report.json has those).
  sources = [{**s, 'keys_read': len(s.get('keys_read', ()))}
             for s in report.sources]
  init_path = surgery.init_from.path if surgery.init_from else None
  record['init_from'] = next(
      (s for s in sources if s.get('path') == init_path), None)
  record['donors'] = [s for s in sources if s.get('path') != init_path]
  if surgery.init_from is not None:
    logging.info('Started from %s (step %s) through %d pre_restore hooks.',
                 surgery.init_from.path, record['init_from'].get('step'),
                 len(surgery.built['pre_restore']))
  return state, record, report


def plan(setup: Any) -> tuple[hooks.Report, str]:
  """Runs the hooks a fresh start would run, abstractly (no memory, no writes).

  Args:
    setup: the checked run (prepared without data).

  Returns:
    The report and a one-line description of where the state comes from.
  """
  surgery = prepare(setup)
  _, report = _run(setup, surgery, dry_run=True)
  if surgery.init_from is not None:
    step = surgery.init_from.provenance().get('step')
    return report, f'init_from {surgery.init_from.path} (step {step})'
  return report, 'a fresh state'


def write_report(workdir: str, report: hooks.Report) -> None:
  """Prints the surgery table and writes it to workdir/surgery_report.json."""
  print(report.table())
  workdir_lib.write_json(os.path.join(workdir, 'surgery_report.json'),
                         report.to_json())
