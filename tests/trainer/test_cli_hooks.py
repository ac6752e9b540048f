"""Hook entries from the command line alone, and what the entry points print.

`--config.hooks.PHASE=[...]` replaces, `--hook=PHASE:NAME[:{...}]` appends,
`--config.hooks.PHASE[I].FIELD=V` edits; runs of the legacy migration and of
a custom `module:function` hook with no config file written; bad input;
the ready configs; no orbax read-only warning on inspect, plan or resume.
"""

import contextlib
import io
import os
import re
import warnings

from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np
import pytest

import hooks
from tests import legacy as legacy_lib
from tests.trainer import runs
from trainer import checkpoint
from trainer import cli
from trainer import inspect
from trainer import plan
from trainer.run import Run
from trainer.__main__ import main

CONFIGS = os.path.join(runs.REPO, 'configs')
TINY = os.path.join(CONFIGS, 'tiny.py')
LEGACY = legacy_lib.CHECKPOINT
SCALE = 'tests.trainer.custom_hooks:scale'
# Replace the (empty) list, append a second entry, then edit its factor.
SCALE_FLAGS = [
    f"--config.hooks.post_init=[{{'name': '{SCALE}', "
    "'patterns': ['Dense_1/.*'], 'factor': 2.0}]",
    f"--hook=post_init:{SCALE}:{{'patterns': ('Dense_0/kernel',), "
    "'factor': 3.0}",
    '--config.hooks.post_init[1].factor=0.5',
]
FIVE = "--config.classes=(0,1,2,3,4)"


def _config(*args, config=TINY):
  return cli.parse_flags(['trainer', f'--config={config}', *args]).config


def _flat_params(state):
  return {k: np.asarray(v) for k, v in hooks.flatten(state.params).items()}


@contextlib.contextmanager
def _what_the_user_sees():
  """What absl's handler (the entry points' stderr) prints, and warnings."""
  handler = absl_logging.get_absl_handler().python_handler
  stream, handler.stream = handler.stream, io.StringIO()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      yield handler.stream, caught
  finally:
    handler.stream = stream


@pytest.fixture(scope='module')
def scaled_run(tmp_path_factory):
  """A one-step run on digits 0-4 whose post_init hooks are all flags."""
  workdir = tmp_path_factory.mktemp('scaled') / 'run'
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
                 '--config.num_train_steps=1', FIVE, *SCALE_FLAGS]) == 0
  return str(workdir), out.getvalue()


def test_replace_append_and_edit_apply_in_that_order():
  config = _config(*SCALE_FLAGS, '--hook=pre_restore:migrate_flax_optim')
  assert config.hooks.post_init == [
      {'name': SCALE, 'patterns': ['Dense_1/.*'], 'factor': 2.0},
      {'name': SCALE, 'patterns': ('Dense_0/kernel',), 'factor': 0.5}]
  assert config.hooks.pre_restore == [{'name': 'migrate_flax_optim'}]


def test_a_config_files_entries_are_kept_and_extended():
  config = _config('--hook=post_init:reinit:{"patterns": ["Dense_1/.*"]}',
                   '--config.hooks.post_init[0].donor=runs/donor',
                   '--config.hooks.post_init[1].patterns=["Dense_0/.*"]',
                   config=os.path.join(CONFIGS, 'warm_start.py'))
  first, second = config.hooks.post_init
  assert isinstance(first, ml_collections.ConfigDict)
  assert (first.name, first.donor, first.opt_state) == (
      'warm_start', 'runs/donor', 'fresh')
  assert second == {'name': 'reinit', 'patterns': ['Dense_0/.*']}


BAD_FLAGS = [
    ('JSON true', ["--config.hooks.post_init=[{'name': 'reinit', "
                   "'patterns': ['x'], 'fresh': true}]"],
     r"post_init=\"\[\{'name': 'reinit'.*'fresh': true\}\]\" is not a Python "
     r'literal: it holds JSON; write True for true'),
    ('JSON null in --hook', ["--hook=post_init:reinit:{'patterns': null}"],
     r"--hook=post_init:reinit:\{'patterns': null\}: .*write None for null"),
    ('JSON null in a field', ['--hook=post_init:reinit',
                              '--config.hooks.post_init[0].patterns=[null]'],
     r"cannot parse '\[null\]'.*write None for null"),
    ('unquoted words', ['--config.hooks.post_init=[{name: reinit}]'],
     r"quote the word\(s\) \['name', 'reinit'\].*double quotes"),
    ('not a list', ["--config.hooks.post_init={'name': 'reinit'}"],
     r"post_init=\{'name': 'reinit'\} must be a list of hook entries"),
    ('unknown phase in --hook', ['--hook=post_int:reinit'],
     r"unknown hook phase 'post_int'; did you mean 'post_init'\? use one of "
     r"\['post_init', 'pre_restore'\]"),
    ('unknown phase key', ['--config.hooks.pre_restor=[]'],
     r"unknown config key 'pre_restor'\nDid you mean \"pre_restore\""),
    ('no hook name', ['--hook=post_init'], r'write PHASE:NAME or PHASE:NAME:'),
    ('no colon before the parameters', ["--hook=post_init:reinit{'a': 1}"],
     r'put a ":" between the hook name and its parameters'),
    ('parameters not a dict', ["--hook=post_init:reinit:{'Dense_1'}"],
     r"the parameters must be a dict, got \{'Dense_1'\}"),
    ('name twice', ["--hook=post_init:reinit:{'name': 'reinit'}"],
     r"give the hook's name once"),
    ('index out of range', ["--config.hooks.post_init[0].patterns=['x']"],
     r'index 0 is out of range: config.hooks.post_init has 0 entries; add '
     r'one with --hook'),
]


@pytest.mark.parametrize('name,args,pattern', BAD_FLAGS,
                         ids=[b[0] for b in BAD_FLAGS])
def test_bad_hook_flags_name_the_value_and_the_fix(name, args, pattern):
  del name
  with pytest.raises(flags.Error, match=pattern):
    _config(*args)


BAD_RUNS = [
    ('JSON true', ["--hook=post_init:reinit:{'patterns': ['x'], "
                   "'fresh': true}"], 2, r'write True for true'),
    ('unknown hook', ['--hook=post_init:reinti'], 1,
     r"config.hooks.post_init\[0\]: Unknown hook 'reinti'. Did you mean "
     r"'reinit'\?"),
    ('unknown module', ['--hook=post_init:tests.trainer.no_such:scale'], 1,
     r"Cannot import module 'tests.trainer.no_such'"),
    ('unknown parameter', ["--hook=post_init:reinit:{'pattern': ['x']}"], 1,
     r"Hook 'reinit' got unknown parameter\(s\) \['pattern'\]"),
    ('bad phase', ['--hook=pre_restor:migrate_flax_optim'], 2,
     r"unknown hook phase 'pre_restor'; did you mean 'pre_restore'"),
    ('pre_restore without init_from', ['--hook=pre_restore:migrate_flax_optim'],
     1, r'config.hooks.pre_restore runs on the checkpoint named by '
     r'config.init_from, which is empty'),
]


@pytest.mark.parametrize('name,args,code,pattern', BAD_RUNS,
                         ids=[b[0] for b in BAD_RUNS])
def test_bad_hooks_on_the_command_line_fail_before_writing(
    tmp_path, capsys, name, args, code, pattern):
  del name
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               *args]) == code
  err = capsys.readouterr().err
  assert err.startswith('error: ')
  assert len(re.findall(pattern, err)) == 1, err  # Said once.
  assert not workdir.exists()


def test_legacy_adam_migration_from_the_command_line(tmp_path, capsys):
  legacy_lib.require()
  workdir = str(tmp_path / 'migrated')
  args = [f'--config={TINY}', f'--workdir={workdir}',
          f'--config.init_from={LEGACY}',
          '--hook=pre_restore:migrate_flax_optim',
          '--config.optimizer.name=adam',
          '--config.optimizer.learning_rate=0.001',
          '--config.batch_size=64',
          '--config.num_train_steps=20']  # The restore and an eval; no step.
  with _what_the_user_sees() as (logs, _):
    assert main(['trainer', *args]) == 0
  out = capsys.readouterr().out
  assert out.count(LEGACY) == 1  # Its source line, with the file's step.
  assert f'source: {LEGACY} (flax-optim-msgpack, step 20), sha256 ' in out
  assert LEGACY not in logs.getvalue()  # Named once: by the source line.

  # The restored state holds the legacy values, bit for bit.
  legacy = hooks.flatten_raw(legacy_lib.read(LEGACY))
  got = runs.final_state(workdir, step=20)
  assert int(got['step']) == 20
  params = [k for k in legacy if k.startswith('target/')]
  assert len(params) == 8
  for key in params:
    path = key[len('target/'):]
    slots = f'state/param_states/{path}'
    for restored, given in (
        (f'params/{path}', key),
        (f'opt_state/inner_state/0/mu/{path}', f'{slots}/grad_ema'),
        (f'opt_state/inner_state/0/nu/{path}', f'{slots}/grad_sq_ema')):
      np.testing.assert_array_equal(got[restored], legacy[given],
                                    err_msg=restored, strict=True)
    np.testing.assert_array_equal(
        got[f'opt_state/inner_state/0/count/{path}'], 20)

  # One more step of the trainer's own step on the fixture's batch gives
  # the fixture's reference params.
  run = Run.prepare(cli.parse_flags(['trainer', *args]).config, workdir,
                    load_data=False)
  reference = legacy_lib.reference()
  batch = {k: jax.device_put(v, run.setup.topology.replicated)
           for k, v in reference['batch'].items()}
  after, _ = run.train_step(run.restore(20), run.empty_metrics(), batch)
  legacy_lib.assert_next_step(_flat_params(after))


def test_custom_hook_from_the_command_line(scaled_run, tmp_path):
  workdir, out = scaled_run
  config = _config('--config.num_train_steps=1', FIVE)
  fresh = _flat_params(
      Run.prepare(config, str(tmp_path), load_data=False).fresh_state())
  got = runs.final_state(workdir, step=0)
  for key, factor in (('Dense_1/kernel', 2.0), ('Dense_0/kernel', 0.5),
                      ('Conv_0/kernel', 1.0)):
    np.testing.assert_array_equal(got[f'params/{key}'], fresh[key] * factor,
                                  err_msg=key, strict=True)
  meta = checkpoint.read_json(checkpoint.directory(workdir), 1, 'meta')
  assert meta['surgery']['post_init'] == [
      {'name': SCALE, 'patterns': ['Dense_1/.*'], 'factor': 2.0},
      {'name': SCALE, 'patterns': ['Dense_0/kernel'], 'factor': 0.5}]
  assert 'totals: modified: 3, unchanged: 13' in out


def test_ready_config_migrate_legacy(tmp_path, capsys):
  legacy_lib.require()
  config = os.path.join(CONFIGS, 'migrate_legacy.py')
  workdir = tmp_path / 'run'
  assert plan.main(['plan', f'--config={config}', f'--workdir={workdir}']
                   ) == 1
  assert ('config.hooks.pre_restore runs on the checkpoint named by '
          'config.init_from, which is empty; set --config.init_from'
          in capsys.readouterr().err)
  assert plan.main(['plan', f'--config={config}', f'--workdir={workdir}',
                    f'--config.init_from={LEGACY}']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ('plan: start from init_from through 1 pre_restore hook; '
                    'nothing is written.')
  assert ['opt_state/inner_state/0/mu/Dense_1/kernel', '(256,', '10)',
          'migrated', 'from', 'state/param_states/Dense_1/kernel/grad_ema'
          ] in [line.split() for line in out]
  assert f'source: {LEGACY} (flax-optim-msgpack, step 20), nothing read' in out
  assert not workdir.exists()


def test_ready_config_resize_head_resume_notes_the_digits(scaled_run, tmp_path,
                                                         capsys):
  workdir, _ = scaled_run
  config = os.path.join(CONFIGS, 'resize_head_resume.py')
  assert plan.main(['plan', f'--config={config}', f'--workdir={tmp_path}/r',
                    f'--config.init_from={workdir}',
                    '--config.classes=(5,6,7,0,1,2,3,4)']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == (
      'labels (resize_head): head Dense_1: columns 3..7 <- init_from columns '
      '0..4 (digits 0..4); new: columns 0..2 (digits 5..7)')
  assert any(line.startswith('params/Dense_1/kernel') and
             'resized (256, 5) -> (256, 8)' in line for line in lines)


def test_warm_start_without_the_head_from_the_command_line(scaled_run,
                                                          tmp_path, capsys):
  workdir, _ = scaled_run
  entry = f"[{{'name': 'warm_start', 'donor': '{workdir}', " \
          "'exclude': ['Dense_1/.*']}]"
  with _what_the_user_sees() as (logs, _):
    assert plan.main(['plan', f'--config={CONFIGS}/warm_start.py',
                      f'--workdir={tmp_path}/warm',
                      f'--config.hooks.post_init={entry}',
                      "--config.hooks.post_init[0].opt_state=donor"]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line for line in out.splitlines()[1:]}
  assert rows['params/Dense_1/kernel'].endswith('unchanged')
  assert rows['params/Dense_0/kernel'].endswith(
      'copied from donor key params/Dense_0/kernel')
  assert rows['opt_state/inner_state/0/trace/Dense_0/kernel'].endswith(
      'copied from donor key opt_state/inner_state/0/trace/Dense_0/kernel')
  assert not [key for key in rows if key.startswith('labels')]
  # The donor is named once, by the report's source line.
  assert out.count(f'source: {workdir} ') == 1, out
  assert workdir not in logs.getvalue(), logs.getvalue()


def test_no_orbax_read_only_warning_on_inspect_plan_or_resume(scaled_run,
                                                              capsys):
  workdir, _ = scaled_run
  args = [f'--config={TINY}', f'--workdir={workdir}',
          '--config.num_train_steps=1', FIVE, *SCALE_FLAGS]
  with _what_the_user_sees() as (logs, caught):
    assert inspect.main(['inspect', workdir]) == 0
    assert plan.main(['plan', *args]) == 0
    assert main(['trainer', *args]) == 0  # Resumes at step 1: an eval.
  text = logs.getvalue()
  assert 'Resuming from' in text  # The capture sees the runs' log lines.
  for noise in ('read_only', 'read only'):
    assert noise not in text, text
    assert not [w for w in caught if noise in str(w.message)]
  out = capsys.readouterr().out
  assert f'{workdir}: step 1 (orbax-manager-step' in out
  assert 'holds a checkpoint at step 1: a run resumes it' in out
