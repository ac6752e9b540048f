"""The trainer's side of surgery: its hooks, built once, through one pipeline.

A fresh workdir starts from `config.init_from` through the pre_restore hooks
(`hooks.restore`), or from a fresh state through the post_init hooks
(`hooks.apply`). `trainer.plan` runs the same calls with `dry_run=True`. The
trainer adds what only it knows to the entries: its model's head layer and
the digit labels of its classes and of a donor run's (from the donor's
`meta` item), so a donor on digits 0-4 fills columns 0-4 of a ten-digit head;
the report then notes which digit went to which column. The step-0
checkpoint records what ran; a resume never runs hooks again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

import hooks
from hooks import pairing
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


def _copies_head(entry: dict[str, Any], head: str,
                 setup: setup_lib.Setup) -> bool:
  """Whether a donor hook's include/exclude select a variable of the head."""
  paths = [k for k in hooks.flatten(setup.abstract_params)
           if k.startswith(f'{head}/')]
  try:
    chosen = hooks.match_keys(list(entry.get('include', ('.*',))), paths,
                              allow_empty=True)
    dropped = hooks.match_keys(list(entry.get('exclude', ())), paths,
                               allow_empty=True)
  except (ValueError, TypeError):
    return True  # The hook's own checks say what is wrong.
  return bool(set(chosen) - set(dropped))


def _complete(entry: dict[str, Any], phase: str, index: int,
              setup: setup_lib.Setup, sources: hooks.Sources,
              init_from: hooks.DonorReader | None) -> dict[str, Any]:
  """Adds the head layer and labels the trainer knows to one entry."""
  head, target = setup.head, list(setup.classes)
  entry = dict(entry)
  name = entry.get('name')
  if name in _DONOR_HOOKS and entry.get('donor'):
    # The same arguments as the hook's, so the hook finds this reader.
    reader = _open(sources, entry['donor'],
                   f'config.hooks.{phase}[{index}].donor',
                   item=entry.get('item'), step=entry.get('donor_step'))
    donor = _classes(reader)
    if 'labels' not in entry:
      if donor is not None and _copies_head(entry, head, setup):
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


def prepare(setup: setup_lib.Setup) -> Surgery:
  """Opens init_from and donors (once each) and builds the hooks (once).

  Args:
    setup: the checked run.

  Returns:
    The built surgery of a fresh start.

  Raises:
    CheckpointError: a donor or init_from cannot be read.
    ConfigError: a hook entry is malformed.
  """
  sources = hooks.Sources()
  init_from = (_open(sources, setup.init_from, 'config.init_from')
               if setup.init_from else None)
  entries, built = {}, {}
  for phase in setup_lib.HOOK_PHASES:
    entries[phase] = [
        _complete(entry, phase, i, setup, sources, init_from)
        for i, entry in enumerate(setup.hook_lists[phase])]
    built[phase] = []
    for index, entry in enumerate(entries[phase]):
      try:
        built[phase].append(hooks.build(entry))
      except (KeyError, ValueError, TypeError, ImportError,
              AttributeError) as e:
        raise ConfigError(f'config.hooks.{phase}[{index}]: {e}') from e
  return Surgery(sources, init_from, entries, built)


def _report_frozen(frozen_patterns: tuple[str, ...]) -> hooks.HookFn:
  def freeze(flat: dict[str, Any], ctx: hooks.Context) -> dict[str, Any]:
    for key in hooks.param_keys(flat, frozen_patterns):
      ctx.report.record(key, 'frozen')
    return flat
  return freeze


def _runs(rows: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], ...]]:
  """Groups rows each of whose entries is one more than the row before's."""
  runs: list[list[tuple[int, ...]]] = []
  for row in rows:
    if runs and all(v == p + 1 for v, p in zip(row, runs[-1][1])):
      runs[-1][1] = row
    else:
      runs.append([row, row])
  return [tuple(run) for run in runs]


def _span(noun: str, first: int, last: int) -> str:
  return f'{noun} {first}' if first == last else f'{noun}s {first}..{last}'


def label_mapping(head: str, source: list[int], target: list[int],
                  source_name: str) -> str:
  """Says which digit went to which head column, e.g. for digits 5-9 of ten:

  `'head Dense_1: columns 5..9 <- donor columns 0..4 (digits 5..9); new:
  columns 0..4 (digits 0..4)'`

  Args:
    head: the head layer.
    source: the digit of each column of the checkpoint read.
    target: the digit of each column of this run's head.
    source_name: what the checkpoint read is called ('donor', 'init_from').

  Returns:
    One line: the columns taken (in runs), then new and dropped ones.
  """
  t_index, s_index = pairing.pairs(target, source)
  moved = [f'{_span("column", a[0], b[0])} <- {source_name} '
           f'{_span("column", a[1], b[1])} ({_span("digit", a[2], b[2])})'
           for a, b in _runs([(t, s, target[t])
                              for t, s in zip(t_index, s_index)])]
  parts = [', '.join(moved) or f'no digit in common with the {source_name}']
  for what, labels, used, prefix in (('new', target, t_index, ''),
                                     ('dropped', source, s_index,
                                      f'{source_name} ')):
    rows = [(i, label) for i, label in enumerate(labels) if i not in used]
    if rows:
      parts.append(f'{what}: {prefix}' + ', '.join(
          f'{_span("column", a[0], b[0])} ({_span("digit", a[1], b[1])})'
          for a, b in _runs(rows)))
  return f'head {head}: ' + '; '.join(parts)


def _head_labels_of(entry: dict[str, Any], head: str
                    ) -> tuple[list[int], list[int], str] | None:
  """(source digits, target digits, source name) an entry gives the head."""
  if entry.get('name') == 'resize_head' and entry.get('layer') == head:
    source, target = entry.get('from_classes'), entry.get('to_classes')
    return (None if source is None or target is None
            else (list(source), list(target), 'init_from'))
  if entry.get('name') in _DONOR_HOOKS:
    for spec in entry.get('labels') or ():
      source = spec.get('donor', spec.get('from'))
      target = spec.get('target', spec.get('to'))
      if (spec.get('layers') == head and 'map' not in spec
          and source is not None and target is not None):
        return list(source), list(target), 'donor'
  return None


def _note_labels(head: str, entries: list[dict[str, Any]],
                 report: hooks.Report) -> None:
  """Notes the digit of each head column for the hooks that moved them."""
  touched = {a.hook for key in report.keys()
             if key.startswith(f'params/{head}/')
             for a in report.actions(key)}
  for entry in entries:
    labels = _head_labels_of(entry, head)
    if labels is not None and entry['name'] in touched:
      report.note(f'labels ({entry["name"]}): '
                  + label_mapping(head, *labels))


def _run(setup: setup_lib.Setup, surgery: Surgery, *, dry_run: bool
         ) -> tuple[TrainState, hooks.Report]:
  """The one pipeline of a start and of its plan."""
  rng = jax.random.fold_in(jax.random.key(setup.seed), 1)
  fresh = lambda: setup_lib.initial_state(setup)
  phase = 'pre_restore' if surgery.init_from is not None else 'post_init'
  frozen = tuple(setup.freeze.phase_at(0))
  hook_fns = [*surgery.built[phase], *([_report_frozen(frozen)] if frozen
                                       else [])]
  try:
    if surgery.init_from is not None:
      state, report = hooks.restore(
          surgery.init_from, setup_lib.abstract_state(setup), hook_fns,
          rng=rng, fresh=fresh, sources=surgery.sources, dry_run=dry_run)
    else:
      state = (setup_lib.abstract_state(setup) if dry_run
               else setup_lib.initial_state(setup))
      state, report = hooks.apply(state, hook_fns, rng=rng, fresh=fresh,
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
  _note_labels(setup.head, surgery.entries[phase], report)
  return state, report


def start(setup: setup_lib.Setup
          ) -> tuple[TrainState, dict[str, Any], hooks.Report]:
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
  return state, record, report


def plan(setup: setup_lib.Setup) -> tuple[hooks.Report, str]:
  """Runs the hooks a fresh start would run, abstractly (no memory, no writes).

  Args:
    setup: the checked run (prepared without data).

  Returns:
    The report and where the state comes from, through which hooks (the
    report names the checkpoints read).
  """
  surgery = prepare(setup)
  _, report = _run(setup, surgery, dry_run=True)
  phase = 'pre_restore' if surgery.init_from is not None else 'post_init'
  count = len(surgery.built[phase])
  start = 'init_from' if surgery.init_from is not None else 'a fresh state'
  return report, (f'{start} through {count} {phase} '
                  f'hook{"" if count == 1 else "s"}')


def write_report(workdir: str, report: hooks.Report) -> None:
  """Prints the surgery table and writes it to workdir/surgery_report.json."""
  print(report.table())
  workdir_lib.write_json(os.path.join(workdir, 'surgery_report.json'),
                         report.to_json())
