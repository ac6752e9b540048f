"""The trainer's side of surgery: hook contexts, the two hook phases, records.

A fresh workdir starts from `config.init_from` through the pre_restore hooks,
or from a fresh state through the post_init hooks. Either way the step-0
checkpoint records what ran (`record`), and a resume never runs them again.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import jax

import hooks
from trainer import checkpoint
from trainer import setup as setup_lib
from trainer import workdir as workdir_lib
from trainer.errors import CheckpointError
from trainer.errors import SurgeryError

TrainState = setup_lib.TrainState


def open_source(path: str, what: str) -> hooks.DonorReader:
  """Opens a checkpoint to read from (init_from or a donor).

  Args:
    path: a workdir, a step directory or a legacy flax msgpack file.
    what: the config field that names it, for the message.

  Returns:
    A reader over it.

  Raises:
    CheckpointError: nothing readable is there.
  """
  try:
    return hooks.open_donor(path)
  except (hooks.DonorError, OSError) as e:
    raise CheckpointError(f'{what}={path!r}: {e}') from e


def context(setup: setup_lib.Setup, *, abstract: bool,
            donor: hooks.DonorReader | None = None,
            report: hooks.Report | None = None) -> hooks.Context:
  """The hook context of a run: its expected structure, fresh state, classes."""
  target = setup_lib.abstract_state(setup)
  if abstract:
    fresh = functools.partial(hooks.flatten, target)
  else:
    fresh = lambda: hooks.flatten(setup_lib.initial_state(setup))
  return hooks.Context(
      expected=hooks.expected_structure(hooks.flatten(target)),
      rng=jax.random.fold_in(jax.random.key(setup.config.seed), 1),
      fresh=fresh, classes=tuple(setup.config.classes), donor=donor,
      report=report or hooks.Report(), abstract=abstract)


def _report_frozen(setup: setup_lib.Setup) -> hooks.HookFn:
  frozen_patterns = setup.freeze.phase_at(0)

  def frozen(flat: dict[str, Any], ctx: hooks.Context) -> dict[str, Any]:
    if frozen_patterns:
      for key in hooks.param_keys(flat, frozen_patterns):
        ctx.report.record(key, 'frozen')
    return flat
  return frozen


def build_phase(setup: setup_lib.Setup, phase: str) -> list[hooks.HookFn]:
  """Builds the config's hooks of `phase`, each named as its entry."""
  built = []
  for entry in setup_lib.hook_entries(setup.config, phase):
    hook_fn = hooks.build(entry)
    hook_fn.__name__ = entry['name']
    built.append(hook_fn)
  return built


def run_phase(setup: setup_lib.Setup, phase: str, flat: dict[str, Any],
              ctx: hooks.Context,
              built: list[hooks.HookFn] | None = None) -> dict[str, Any]:
  """Runs the hooks of `phase` over `flat`; errors name the hook."""
  if built is None:
    built = build_phase(setup, phase)
  try:
    return hooks.run_hooks(flat, [*built, _report_frozen(setup)], ctx,
                           validate_each=phase == 'post_init')
  except (hooks.HookError, hooks.StructureError) as e:
    raise SurgeryError(f'{phase} hooks: {e}') from e


def start(setup: setup_lib.Setup
          ) -> tuple[TrainState, dict[str, Any], hooks.Report]:
  """The state a fresh workdir starts from, what made it, and the report.

  Args:
    setup: the checked run.

  Returns:
    (state, record, report): the record goes into every checkpoint's
    metadata, the report into surgery_report.json.

  Raises:
    CheckpointError, SurgeryError: before anything is written.
  """
  config = setup.config
  report = hooks.Report()
  record = {phase: setup_lib.hook_entries(config, phase)
            for phase in setup_lib.HOOK_PHASES}
  record['init_from'] = None
  record['donors'] = []
  if config.init_from:
    source = open_source(config.init_from, 'config.init_from')
    ctx = context(setup, abstract=False, donor=source, report=report)
    state = checkpoint.restore(
        setup_lib.abstract_state(setup), source,
        pre_restore=lambda flat: run_phase(setup, 'pre_restore', flat, ctx))
    record['init_from'] = {'path': source.path, 'step': source.step,
                           'sha256': source.digest()}
    logging.info('Started from %s (step %s) through %d pre_restore hooks.',
                 source.path, source.step, len(config.hooks.pre_restore))
  else:
    state = setup_lib.initial_state(setup)
    ctx = context(setup, abstract=False, report=report)
    built = build_phase(setup, 'post_init')
    flat = run_phase(setup, 'post_init', hooks.flatten(state), ctx, built)
    record['donors'] = [
        {'hook': fn.__name__, 'path': fn.donor.path, 'step': fn.donor.step,
         'sha256': fn.donor.digest()}
        for fn in built if getattr(fn, 'donor', None) is not None]
    state = hooks.unflatten(
        jax.device_put(flat, setup.topology.replicated), state)
    if config.hooks.post_init:
      logging.info('Ran %d post_init hooks: %s.', len(config.hooks.post_init),
                   [e['name'] for e in record['post_init']])
  return state, record, report


def plan(setup: setup_lib.Setup) -> tuple[hooks.Report, str]:
  """Runs the hooks a fresh start would run, abstractly (no memory, no writes).

  Args:
    setup: the checked run (prepared without data).

  Returns:
    The report and a one-line description of where the state comes from.
  """
  report = hooks.Report()
  config = setup.config
  if config.init_from:
    source = open_source(config.init_from, 'config.init_from')
    ctx = context(setup, abstract=True, donor=source, report=report)
    run_phase(setup, 'pre_restore', dict(source.structure()), ctx)
    origin = f'init_from {source.path} (step {source.step})'
  else:
    ctx = context(setup, abstract=True, report=report)
    run_phase(setup, 'post_init',
              hooks.flatten(setup_lib.abstract_state(setup)), ctx)
    origin = 'a fresh state'
  return report, origin



def write_report(workdir: str, report: hooks.Report) -> None:
  """Prints the surgery table and writes it to workdir/surgery_report.json."""
  print(report.table())
  workdir_lib.write_json(os.path.join(workdir, 'surgery_report.json'),
                         report.to_json())
