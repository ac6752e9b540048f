"""Every experiment at its tiny size: the files it writes, and a report made
only of its summary.json's numbers."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

from experiments import common
from trainer import data as data_lib

# A number as a report writes one: not part of a name like Conv_0 or x86_64.
NUMBER = re.compile(r'(?<![\w.])-?\d+(?:\.\d+)*(?!\w)')
CACHE_FLAGS = ('jax_compilation_cache_dir',
               'jax_persistent_cache_min_compile_time_secs',
               'jax_persistent_cache_min_entry_size_bytes')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """Speeds the ~20 tiny runs up: the embedded digits are parsed once and the
  compiled steps are cached on disk; both are undone after this module."""
  previous = {flag: getattr(jax.config, flag) for flag in CACHE_FLAGS}
  patch = pytest.MonkeyPatch()
  load = functools.lru_cache(maxsize=8)(data_lib.load)
  patch.setattr(data_lib, 'load', lambda source, data_dir, classes: load(
      source, data_dir, tuple(int(c) for c in classes)))
  yield str(tmp_path_factory.mktemp('jax_cache'))
  patch.undo()
  for flag, value in previous.items():
    jax.config.update(flag, value)
  compilation_cache.reset_cache()


def numbers_of(tree: Any) -> set[str]:
  """Every way the report may write a number of `tree` (see common.fmt)."""
  out = set()
  if isinstance(tree, dict):
    for value in tree.values():
      out |= numbers_of(value)
  elif isinstance(tree, list):
    for value in tree:
      out |= numbers_of(value)
  elif isinstance(tree, str):
    out |= set(NUMBER.findall(tree))
  elif isinstance(tree, bool) or tree is None:
    pass
  elif isinstance(tree, (int, float)):
    out |= {common.fmt(tree), common.fmt(abs(tree))}  # common.signed: abs.
  return out


@pytest.mark.parametrize('name', common.NAMES)
def test_tiny_experiment_writes_a_report_of_its_summary(name, cache_dir,
                                                        tmp_path):
  if name == 'migrate_legacy' and not os.path.exists(common.LEGACY_ADAM):
    pytest.skip(f'the legacy fixture is not at {common.LEGACY_ADAM}')
  results = tmp_path / 'results'
  summary = common.execute(name, tiny=True, results_dir=str(results),
                           cache_dir=cache_dir)

  files = sorted(p.name for p in results.iterdir() if p.is_file())
  plots = [f for f in files if f.endswith('.png')]
  assert 'report.md' in files and 'summary.json' in files and plots
  for plot in plots:
    assert (results / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', plot
  report = (results / 'report.md').read_text()
  stored = json.loads((results / 'summary.json').read_text())
  assert stored == summary and stored['experiment'] == name
  assert stored['tiny'] is True

  # The report is a function of summary.json alone...
  experiment = importlib.import_module(f'experiments.{name}.experiment')
  assert report == experiment.render(stored)
  # ...and every number in it is one of summary.json's.
  allowed = numbers_of(stored)
  strays = [n for n in NUMBER.findall(report) if n not in allowed]
  assert not strays, f'numbers in report.md not in summary.json: {strays}'
  assert NUMBER.findall(report)  # The check above saw numbers.
  linked = re.findall(r'\]\(([\w.]+\.png)\)', report)
  assert linked and set(linked) <= set(plots)
  # Every arm ran every seed, with the same steps.
  for arm in stored['arms'].values():
    assert len(arm['per_seed']) == len(stored['seeds'])
    steps = {tuple(r['curve']['steps']) for r in arm['per_seed']}
    assert len(steps) == 1 and steps.pop()


def test_numbers_the_summary_lacks_are_found():
  report = 'accuracy 0.9731 at step 25 of Conv_0 on x86_64; -0.0110 below'
  allowed = numbers_of({'a': 0.97312, 'steps': [25], 'gap': -0.011})
  assert [n for n in NUMBER.findall(report) if n not in allowed] == []
  assert [n for n in NUMBER.findall('0.9732 and 26') if n not in allowed] == [
      '0.9732', '26']
