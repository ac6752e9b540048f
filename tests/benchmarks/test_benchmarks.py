"""Each benchmark runs at its tiny size and writes its result and table row.

These check that the benchmarks work, not what they measure: the tiny sizes
time too little to mean anything. Only figures that do not depend on timing
(identity of untouched leaves, host copies, compile counts) are asserted.
"""

import json

import pytest

import benchmarks
from benchmarks import common
from trainer import host


@pytest.fixture(scope='module')
def out_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('bench')


@pytest.fixture(scope='module')
def run(out_dir):
  """Runs a benchmark at its tiny size once per module; returns its JSON."""
  done = {}

  def run_once(name):
    if name not in done:
      benchmarks.run_benchmark(name, tiny=True, out_dir=str(out_dir))
      done[name] = json.loads((out_dir / f'{name}.json').read_text())
    return done[name]

  return run_once


def _figure(result, prefix):
  matches = [f for f in result['figures'] if f['figure'].startswith(prefix)]
  assert matches, [f['figure'] for f in result['figures']]
  return matches[0]


@pytest.mark.parametrize('name', benchmarks.ALL)
def test_benchmark_runs_at_tiny_size(name, run, out_dir):
  written = run(name)
  assert written['size'] == 'tiny'
  assert written['figures']
  env = written['environment']
  assert env == host.environment()  # The trainer's record of the machine.
  for fig in written['figures']:
    assert set(fig) >= {'figure', 'value', 'unit', 'goal', 'met', 'command'}
    assert fig['command'].startswith('.venv/bin/python -m benchmarks')
  common.write_table(str(out_dir), benchmarks.ALL)
  table = (out_dir / 'README.md').read_text()
  assert f'| {name} | {written["figures"][0]["figure"]} |' in table
  assert (f"| {env['versions']['jax']} / {env['versions']['jaxlib']} | "
          f"{env['jax_backend']} {env['device_kind']} x{env['device_count']} "
          f"({env['cpu_count']} cores) |") in table


def test_table_reads_results_stamped_before_host_environment(tmp_path):
  result = {'environment': {'cpu': 'AMD EPYC', 'cpu_count': 2,
                            'device': 'cpu cpu x1', 'jax': '0.10.2',
                            'jaxlib': '0.10.2', 'python': '3.11.7'},
            'figures': [common.figure('f', 1.0, 'x', '-', None, 'cmd')]}
  common.write_result(str(tmp_path), 'step', result)
  common.write_table(str(tmp_path), ['step'])
  assert ('| step | f | 1 x | - | - | - | 0.10.2 / 0.10.2 | cpu cpu x1 '
          '(2 cores) | `cmd` |') in (tmp_path / 'README.md').read_text()


def test_surgery_keeps_untouched_leaves_and_copies_nothing_to_host(run):
  result = run('surgery')
  assert _figure(result, 'untouched leaves that are the same objects')['met']
  assert _figure(result, 'device-to-host copies')['value'] == 0


def test_loop_compiles_each_step_function_once(run):
  result = run('loop')
  assert _figure(result, 'compiles during timed epochs')['value'] == 0
  assert _figure(result, 'train_step / eval_step compiles')['value'] == '1 / 1'


def test_donor_warm_start_copies_the_needed_leaves(run):
  result = run('donor')
  runs = result['details']['runs']
  assert sorted(runs) == ['hooks 10% 0.66 MB', 'hooks 50% 0.66 MB',
                          'orbax 10% 0.66 MB']
  for name, measured in runs.items():
    for one in measured:
      assert len(one['copied']) == (80 if '50%' in name else 16), name
      assert one['warmed_up'], name
