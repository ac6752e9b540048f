"""The trainer's hook phases, freezing, plan, and their bad inputs."""

import os

import jax
import ml_collections
import numpy as np
import pytest

import hooks
from tests.trainer import runs
from trainer import checkpoint
from trainer import plan
from trainer import steps
from trainer import surgery
from trainer import train
from trainer.__main__ import main
from trainer.errors import ConfigError
from trainer.errors import SurgeryError

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')


def _entry(**kwargs):
  return ml_collections.ConfigDict(kwargs)


def test_post_init_hooks_run_once_and_are_recorded(tiny_config, tmp_path,
                                                   capsys):
  tiny_config.hooks.post_init = [
      _entry(name='tests.trainer.custom_hooks:scale',
             patterns=['Dense_1/.*'], factor=0.0)]
  tiny_config.num_train_steps = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  step0 = runs.final_state(str(tmp_path), step=0)
  np.testing.assert_array_equal(step0['params/Dense_1/kernel'], 0.0)
  assert np.abs(step0['params/Dense_0/kernel']).sum() > 0
  meta = checkpoint.read_json(checkpoint.directory(str(tmp_path)), 2, 'meta')
  assert meta['surgery']['post_init'] == [
      {'name': 'tests.trainer.custom_hooks:scale',
       'patterns': ['Dense_1/.*'], 'factor': 0.0}]
  assert 'params/Dense_1/kernel' in capsys.readouterr().out
  report = (tmp_path / 'surgery_report.json').read_text()
  assert 'Dense_1/kernel' in report


def test_resume_runs_no_hook_and_refuses_other_hooks(tiny_config, tmp_path):
  tiny_config.hooks.post_init = [
      _entry(name='tests.trainer.custom_hooks:scale',
             patterns=['Dense_1/.*'], factor=0.5)]
  tiny_config.num_train_steps = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.num_train_steps = 4
  calls = []
  tiny_config.hooks.post_init[0].factor = 0.5
  originals = hooks.apply, hooks.restore
  try:
    # The trainer's only ways into surgery (trainer/surgery.py).
    hooks.apply = lambda *a, **k: calls.append(1) or originals[0](*a, **k)
    hooks.restore = lambda *a, **k: calls.append(1) or originals[1](*a, **k)
    train.train_and_evaluate(tiny_config, str(tmp_path / 'fresh'))
    assert calls  # The spies see a fresh start...
    calls.clear()
    train.train_and_evaluate(tiny_config, str(tmp_path))
  finally:
    hooks.apply, hooks.restore = originals
  assert not calls  # ...and no resume.
  tiny_config.hooks.post_init[0].factor = 2.0
  with pytest.raises(Exception, match=r'hooks.post_init: checkpoint has '):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_frozen_params_are_bit_identical_under_adamw(tiny_config, tmp_path):
  tiny_config.optimizer.name = 'adamw'
  tiny_config.optimizer.learning_rate = 1e-3
  tiny_config.optimizer.weight_decay = 0.1
  tiny_config.freeze.patterns = ('Conv_.*',)
  tiny_config.keep_checkpoints = 10
  train.train_and_evaluate(tiny_config, str(tmp_path))
  start = runs.final_state(str(tmp_path), step=0)
  end = runs.final_state(str(tmp_path))
  for key in start:
    if key.startswith('params/Conv_'):
      np.testing.assert_array_equal(start[key], end[key], strict=True)
    elif key.startswith('params/'):
      assert not np.array_equal(start[key], end[key]), key
  # Frozen params carry no optimizer slots.
  assert not [k for k in end if 'Conv_' in k and k.startswith('opt_state')]


def _count_traces(monkeypatch):
  traces = []
  original = steps.train_step

  def counted(state, batch, *args):
    traces.append(1)
    return original(state, batch, *args)
  monkeypatch.setattr(steps, 'train_step', counted)
  return traces


def test_unfreeze_traces_once_per_phase_and_resumes_in_phase(
    tiny_config, tmp_path, monkeypatch):
  tiny_config.optimizer.name = 'adam'
  tiny_config.optimizer.learning_rate = 1e-3
  tiny_config.freeze.patterns = ('Conv_0/.*', 'Conv_1/.*')
  tiny_config.freeze.unfreeze_steps = (2, 4)
  traces = _count_traces(monkeypatch)
  train.train_and_evaluate(tiny_config, str(tmp_path / 'whole'))
  assert len(traces) == 3  # Phases [0, 2), [2, 4), [4, 6).
  # Checkpoints at 2, 3 (mid-phase) and 5 resume in the right phase.
  for stop in (3, 5):
    tiny_config.num_train_steps = stop
    train.train_and_evaluate(tiny_config, str(tmp_path / 'parts'))
  tiny_config.num_train_steps = 6
  train.train_and_evaluate(tiny_config, str(tmp_path / 'parts'))
  runs.assert_bitwise_equal(runs.final_state(str(tmp_path / 'whole')),
                            runs.final_state(str(tmp_path / 'parts')))


def test_plan_writes_nothing_and_allocates_no_params(tmp_path, capsys):
  before = {id(a) for a in jax.live_arrays()}
  workdir = tmp_path / 'run'
  assert plan.main(['plan', f'--config={TINY}', f'--workdir={workdir}',
                    "--config.freeze.patterns=('Conv_0/.*',)"]) == 0
  out = capsys.readouterr().out
  assert 'params/Conv_0/kernel' in out and 'frozen' in out
  assert 'nothing is written' in out
  assert not workdir.exists()
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert not [a for a in new if a.size > 1000], [a.shape for a in new]


BAD_SURGERY = [
    ('unknown hook', [_entry(name='warm_strat')], 'post_init',
     ConfigError, r"warm_strat.*Registered hooks"),
    ('unknown parameter', [_entry(name='reinit', patterns=['Dense_1/.*'],
                                  scale=2)], 'post_init',
     ConfigError, r"unknown parameter.*scale.*patterns"),
    ('custom path does not import',
     [_entry(name='no_such_package.hooks:scale')], 'post_init',
     ConfigError, r'no_such_package'),
    ('regex matches nothing', [_entry(name='reinit', patterns=['Dense_9/.*'])],
     'post_init', SurgeryError, r"Dense_9"),
    ('pre_restore without init_from', [_entry(name='rename', rules=[])],
     'pre_restore', ConfigError, r'init_from'),
]


@pytest.mark.parametrize('name,entries,phase,error,pattern', BAD_SURGERY,
                         ids=[b[0] for b in BAD_SURGERY])
def test_bad_hook_config_fails_before_writing(tiny_config, tmp_path, name,
                                              entries, phase, error, pattern):
  del name
  tiny_config.hooks[phase] = entries
  workdir = tmp_path / 'run'
  with pytest.raises(error, match=pattern):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert not workdir.exists()


def test_freezing_every_param_is_an_error(tiny_config, tmp_path):
  tiny_config.freeze.patterns = ('.*',)
  with pytest.raises(ConfigError, match='nothing left to train'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


LABEL_MAPPINGS = [
    ((0, 1, 2, 3, 4), tuple(range(10)),
     'head Dense_1: columns 0..4 <- donor columns 0..4 (digits 0..4); new: '
     'columns 5..9 (digits 5..9)'),
    ((5, 6, 7, 8, 9), (7, 1, 9, 8),
     'head Dense_1: column 0 <- donor column 2 (digit 7), column 2 <- donor '
     'column 4 (digit 9), column 3 <- donor column 3 (digit 8); new: column 1 '
     '(digit 1); dropped: donor columns 0..1 (digits 5..6)'),
    ((1, 2), (3, 4), 'head Dense_1: no digit in common with the donor; new: '
     'columns 0..1 (digits 3..4); dropped: donor columns 0..1 (digits 1..2)'),
    ((0, 1), (0, 1, 5, 7, 8), 'head Dense_1: columns 0..1 <- donor columns '
     '0..1 (digits 0..1); new: column 2 (digit 5), columns 3..4 (digits '
     '7..8)'),
]


@pytest.mark.parametrize('source,target,text', LABEL_MAPPINGS)
def test_label_mapping_names_the_digits(source, target, text):
  assert surgery.label_mapping('Dense_1', list(source), list(target),
                               'donor') == text


def test_hook_index_out_of_range_on_the_command_line(tmp_path, capsys):
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}/run',
               '--config.hooks.post_init[0].donor=/x']) == 2
  assert ('index 0 is out of range: config.hooks.post_init has 0 entries'
          in capsys.readouterr().err)
  assert not (tmp_path / 'run').exists()
