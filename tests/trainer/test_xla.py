"""config.xla: the compiler options of the trainer's steps (trainer.xla)."""

import re
import subprocess
import sys

import numpy as np
import pytest

from tests.trainer import runs
from tests.trainer import xla_grads
from trainer import checkpoint
from trainer import data as data_lib
from trainer import resume
from trainer import run as run_lib
from trainer import train
from trainer import xla
from trainer.errors import ConfigError

ENV_FLAG = f'--{xla.YNN_FUSION_TYPE}=-individual_convolution'
EIGEN = xla.EIGEN_CONVOLUTIONS


def _grads_under_xla_flags(tmp_path, flags: str) -> dict[str, np.ndarray]:
  out = tmp_path / 'grads.npz'
  proc = subprocess.run(
      [sys.executable, '-m', 'tests.trainer.xla_grads', str(out)],
      cwd=runs.REPO, env=runs.env(XLA_FLAGS=flags), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    return {key: f[key] for key in f.files}


def test_per_compile_option_gives_the_bits_of_the_xla_flags_form(tmp_path):
  from_env = _grads_under_xla_flags(tmp_path, ENV_FLAG)
  per_compile = xla_grads.grads(EIGEN)
  runs.assert_bitwise_equal(from_env, per_compile)
  # The option does change the convolutions' arithmetic: XLA's default
  # (YNNPACK) differs in low bits, allclose.
  default = xla_grads.grads()
  assert any(not np.array_equal(default[k], per_compile[k]) for k in default)
  for key in default:
    np.testing.assert_allclose(default[key], per_compile[key], rtol=1e-4,
                               atol=1e-6, err_msg=key)


def test_the_default_list_is_this_jaxlibs_default():
  # The option's value replaces XLA's whole list; EIGEN is that list minus
  # INDIVIDUAL_CONVOLUTION only if the full list is what XLA does unasked.
  full = {xla.YNN_FUSION_TYPE: EIGEN[xla.YNN_FUSION_TYPE]
          + ',LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
  runs.assert_bitwise_equal(xla_grads.grads(), xla_grads.grads(full))


@pytest.mark.parametrize('setting, backend, flags, choice, options', [
    ('auto', 'cpu', '', 'eigen', EIGEN),
    ('auto', 'gpu', '', 'xla_default', {}),
    ('auto', 'tpu', '', 'xla_default', {}),
    ('auto', 'cpu', ENV_FLAG, 'xla_default', {}),
    ('eigen', 'gpu', '', 'eigen', EIGEN),
    ('xla_default', 'cpu', '', 'xla_default', {}),
])
def test_resolve(setting, backend, flags, choice, options):
  compilation = xla.resolve(setting, {}, backend, flags)
  assert compilation.cpu_convolutions == choice
  assert dict(compilation.options) == options
  assert compilation.compiler_options == (options or None)


def test_resolve_reasons_and_raw_options_win():
  assert xla.resolve('auto', {}, 'cpu').reason == (
      'auto: the CPU backend runs convolutions faster through Eigen than '
      'through YNNPACK')
  assert xla.resolve('auto', {}, 'cpu', ENV_FLAG).reason == (
      f'auto: XLA_FLAGS sets {xla.YNN_FUSION_TYPE}, which stands')
  raw = {xla.YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_REDUCE',
         'xla_cpu_enable_fast_math': False}
  compilation = xla.resolve('auto', raw, 'cpu')
  assert dict(compilation.options) == raw
  assert compilation.reason.endswith(
      f'; config.xla.compiler_options overrides {xla.YNN_FUSION_TYPE}')
  assert compilation.record() == {
      'cpu_convolutions': 'eigen', 'reason': compilation.reason,
      'compiler_options': raw}


def test_bad_settings_name_the_field_and_the_fix(tiny_config):
  with pytest.raises(ConfigError, match=re.escape(
      "config.xla.cpu_convolutions='ynn' is not allowed: use one of "
      "['auto', 'eigen', 'xla_default'].")):
    xla.resolve('ynn', {}, 'cpu')
  tiny_config.xla.compiler_options = ['xla_cpu_enable_fast_math']
  with pytest.raises(ConfigError, match=re.escape(
      "config.xla.compiler_options=['xla_cpu_enable_fast_math'] is not "
      'allowed: use a dict of XLA option name -> str, bool, int or float')):
    xla.from_config(tiny_config)
  tiny_config.xla.compiler_options = {'xla_cpu_no_such_option': True}
  with pytest.raises(ConfigError, match=re.escape(
      "XLA refuses the compiler options {'xla_cpu_experimental_ynn_fusion_"
      "type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'"
      ", 'xla_cpu_no_such_option': True} (config.xla.cpu_convolutions="
      "'auto', config.xla.compiler_options={'xla_cpu_no_such_option': True}"
      "): INVALID_ARGUMENT: No such compile option: 'xla_cpu_no_such_option'"
      '; fix or remove it in config.xla.compiler_options.')):
    xla.from_config(tiny_config)


def test_auto_falls_back_on_a_jaxlib_without_the_option(tiny_config,
                                                       monkeypatch):
  # Another jaxlib cannot run here: its answer to the option is simulated.
  refused = f"INVALID_ARGUMENT: No such compile option: '{xla.YNN_FUSION_TYPE}'"
  monkeypatch.setattr(xla, 'refusal', lambda options: refused if (
      xla.YNN_FUSION_TYPE in options) else None)
  compilation = xla.from_config(tiny_config)
  assert compilation.record() == {
      'cpu_convolutions': 'xla_default', 'compiler_options': {},
      'reason': f"auto: this jaxlib refuses {xla.YNN_FUSION_TYPE} "
                f"({refused}), so XLA's default stands"}
  tiny_config.xla.cpu_convolutions = 'eigen'
  with pytest.raises(ConfigError, match=re.escape(
      f"{refused}; this jaxlib does not take it: set config.xla."
      "cpu_convolutions to 'auto' or 'xla_default'.")):
    xla.from_config(tiny_config)


def _ynn_convolutions(compiled_text: str) -> int:
  """YNNPACK fusions of an optimized HLO module that are one convolution."""
  ynn = set(re.findall(r'calls=(%[\w.]+),[^\n]*"__ynn_fusion"',
                       compiled_text))
  bodies = re.split(r'\n(?=%|ENTRY )', compiled_text)
  return sum(bool(re.search(r'ROOT %\S+ = \S+ convolution\(', body))
             for body in bodies if body.split(' ', 1)[0] in ynn)


def _compiled_steps(config, workdir) -> dict[str, str]:
  run = run_lib.Run.prepare(config, workdir)
  state = run.enter_phase(run.fresh_state(), 0)
  batch = next(run.train_batches())
  lowered = {
      'train_step': run.train_step.lower(state, run.empty_metrics(), batch),
      'eval_step': run.eval_step.lower(state, next(data_lib.eval_batches(
          run.setup.data.test, run.setup.schedule.eval_batch_size))),
      'predict_step': run.predict_step.lower(state, batch['image']),
  }
  texts = {name: low.compile().as_text() for name, low in lowered.items()}
  # The computations without metadata (source lines, names): the programs.
  return {name: re.sub(r', metadata=\{[^}]*\}', '', text[text.index('\n%'):])
          for name, text in texts.items()}


def test_the_train_step_runs_its_convolutions_as_chosen(tiny_config,
                                                        tmp_path):
  auto = _compiled_steps(tiny_config, str(tmp_path))
  tiny_config.xla.cpu_convolutions = 'xla_default'
  default = _compiled_steps(tiny_config, str(tmp_path))
  # The CNN's 5 convolutions of a train step (2 forward, 2 weight gradients,
  # 1 input gradient): one YNNPACK fusion each by default, none under auto.
  assert _ynn_convolutions(default['train_step']) == 5
  assert _ynn_convolutions(auto['train_step']) == 0
  # Forward only, YNNPACK fuses each convolution with its bias, relu and
  # pooling (a REDUCE fusion, kept): eval and prediction compile the same.
  for name in ('eval_step', 'predict_step'):
    assert _ynn_convolutions(auto[name]) == 0
    assert auto[name] == default[name], name


def test_summary_and_checkpoints_record_it_and_resume_warns(tiny_config,
                                                            tmp_path, caplog):
  tiny_config.xla.cpu_convolutions = 'xla_default'
  tiny_config.num_train_steps = 2
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  record = {'cpu_convolutions': 'xla_default', 'compiler_options': {},
            'reason': "config.xla.cpu_convolutions='xla_default'"}
  assert summary['xla'] == record
  meta = checkpoint.read_json(checkpoint.directory(str(tmp_path)), 2, 'meta')
  assert meta['xla'] == record
  # Resumed under 'auto' (eigen): allowed, logged, and recorded anew.
  tiny_config.xla.cpu_convolutions = 'auto'
  tiny_config.num_train_steps = 4
  caplog.clear()
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert ("Resume: the checkpoint was trained with compiler options {} "
          "(cpu_convolutions='xla_default'); this run compiles with "
          f"{EIGEN} (cpu_convolutions='eigen'). Results stay allclose but "
          'are not bitwise those of an uninterrupted run; for that, set '
          '--config.xla.cpu_convolutions=xla_default' in caplog.text)
  assert summary['xla']['cpu_convolutions'] == 'eigen'
  meta = checkpoint.read_json(checkpoint.directory(str(tmp_path)), 4, 'meta')
  assert meta['xla']['compiler_options'] == EIGEN


def test_resume_change_of_an_unchanged_or_older_checkpoint():
  eigen = xla.resolve('eigen', {}, 'cpu')
  assert xla.resume_change(eigen.record(), eigen) is None
  default = xla.resolve('xla_default', {}, 'cpu')
  assert xla.resume_change(None, default) is None  # Written before config.xla.
  assert 'trained with compiler options {}' in xla.resume_change(None, eigen)


def test_config_xla_may_change_on_resume_raw_options_included(tiny_config):
  stored = resume.to_json_dict(tiny_config)
  tiny_config.xla.cpu_convolutions = 'eigen'
  tiny_config.xla.compiler_options = {'xla_cpu_enable_fast_math': False}
  current = resume.to_json_dict(tiny_config)
  assert resume.check(stored, current, 'ckpt') == [
      ('xla.compiler_options', None, '<absent>'),
      ('xla.compiler_options.xla_cpu_enable_fast_math', '<absent>', False),
      ('xla.cpu_convolutions', 'auto', 'eigen')]
  # A checkpoint from before config.xla existed was compiled at XLA's default.
  del stored['xla']
  assert resume.check(stored, current, 'ckpt') == [
      ('xla.compiler_options', None, '<absent>'),
      ('xla.compiler_options.xla_cpu_enable_fast_math', '<absent>', False),
      ('xla.cpu_convolutions', 'xla_default', 'eigen')]
