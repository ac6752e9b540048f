"""pyproject.toml's dependencies against the code that imports them.

Each declared requirement has a lower bound that the installed version meets,
each third-party import resolves to a declared distribution, each runtime
dependency is imported somewhere (or says why not), and the GPU extras pin the
jax of constraints.txt. Reads files only: no network, no install.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import pathlib
import re
import sys
import tomllib

from packaging import requirements
from packaging import utils as packaging_utils
from packaging import version as packaging_version
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())
PROJECT = PYPROJECT['project']
FIRST_PARTY = frozenset(
    {'trainer', 'hooks', 'configs', 'experiments', 'benchmarks', 'tests'})
# Declared but never imported by our code, each with the reason it is needed.
INDIRECT = {
    # clu's TensorBoard writer imports tensorflow (lazily, never at import).
    'tensorflow-cpu': 'clu.metric_writers',
    # tfds imports it, but declares it only for Python < 3.9.
    'importlib-resources': 'tensorflow_datasets',
}
# Which declared requirements each folder's imports may use.
ALLOWED_GROUPS = {
    'trainer': ('runtime',),
    'hooks': ('runtime',),
    'configs': ('runtime',),
    'experiments': ('runtime', 'experiments'),
    'tests': ('runtime', 'test'),
}


def _name(req: requirements.Requirement) -> str:
  return packaging_utils.canonicalize_name(req.name)


def _group(name: str) -> list[requirements.Requirement]:
  entries = (PROJECT['dependencies'] if name == 'runtime'
             else PROJECT['optional-dependencies'][name])
  return [requirements.Requirement(entry) for entry in entries]


def _imported_top_levels(folder: pathlib.Path) -> dict[str, str]:
  """Top-level module of every absolute import under folder -> first file."""
  found = {}
  for path in sorted(folder.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        found.setdefault(name.split('.')[0], str(path.relative_to(REPO)))
  return found


def _third_party(imports: dict[str, str]) -> dict[str, str]:
  return {module: where for module, where in imports.items()
          if module not in sys.stdlib_module_names
          and module not in FIRST_PARTY and module != '__future__'}


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()  # Scans every package.


def _distributions(module: str) -> set[str]:
  names = _module_distributions().get(module, [])
  return {packaging_utils.canonicalize_name(name) for name in names}


def _constraint_pin(name: str) -> str:
  text = (REPO / 'constraints.txt').read_text()
  match = re.search(rf'^{re.escape(name)}==(\S+)\s*$', text, re.MULTILINE)
  assert match, f'constraints.txt pins no {name}'
  return match.group(1)


ALL_GROUPS = ['runtime', *PROJECT['optional-dependencies']]


@pytest.mark.parametrize('group', ALL_GROUPS)
def test_every_requirement_has_a_lower_bound_the_installed_version_meets(
    group):
  for req in _group(group):
    if req.marker is not None and not req.marker.evaluate({'extra': group}):
      continue
    operators = {spec.operator for spec in req.specifier}
    assert operators & {'>=', '=='}, (
        f'{group} requirement {req} has no lower bound: add ">=<the oldest '
        'version the code works with>"')
    if group.startswith('cuda'):
      continue  # Not installed on a CPU machine.
    installed = importlib.metadata.version(req.name)
    assert req.specifier.contains(installed, prereleases=True), (
        f'{req.name} {installed} is installed, but pyproject.toml asks for '
        f'{req}: raise the bound or reinstall with `make install`')


@pytest.mark.parametrize('folder', sorted(ALLOWED_GROUPS))
def test_every_third_party_import_is_declared(folder):
  declared = {_name(req) for group in ALLOWED_GROUPS[folder]
              for req in _group(group)}
  imports = _third_party(_imported_top_levels(REPO / folder))
  assert imports, f'no third-party import found under {folder}/'
  for module, where in sorted(imports.items()):
    dists = _distributions(module)
    assert dists, f'{where} imports {module!r}, which no installed package provides'
    assert dists & declared, (
        f'{where} imports {module!r} (from {sorted(dists)}), which '
        f'pyproject.toml does not declare for {folder}/ '
        f'(groups {ALLOWED_GROUPS[folder]})')


def test_every_runtime_dependency_is_imported_or_says_why_not():
  imported = set()
  for folder in ('trainer', 'hooks', 'configs'):
    for module in _third_party(_imported_top_levels(REPO / folder)):
      imported |= _distributions(module)
  for req in _group('runtime'):
    name = _name(req)
    assert name in imported or name in INDIRECT, (
        f'{req} is declared but trainer/, hooks/ and configs/ never import '
        'it: drop it, or name what needs it in INDIRECT')
  for name, needed_by in INDIRECT.items():
    assert name in {_name(req) for req in _group('runtime')}, name
    assert name not in imported, (
        f'{name} is imported now ({needed_by} was the reason): drop it from '
        'INDIRECT')


def test_msgpack_comes_from_flax_not_from_us():
  assert 'msgpack' not in {_name(req) for req in _group('runtime')}
  flax_requires = importlib.metadata.requires('flax') or []
  assert any(requirements.Requirement(r).name == 'msgpack'
             for r in flax_requires)


@pytest.mark.parametrize('extra', ['cuda12', 'cuda13'])
def test_gpu_extras_pin_the_constrained_jax(extra):
  jax_pin = _constraint_pin('jax')
  assert PROJECT['optional-dependencies'][extra] == [
      f'jax[{extra}]=={jax_pin}'], (
          f'the {extra} extra must pin the jax of constraints.txt ({jax_pin})')


def test_runtime_lower_bounds_are_not_below_the_known_api_floors():
  # The first releases with APIs the code uses; see pyproject.toml.
  floors = {'jax': '0.6', 'optax': '0.2.5', 'orbax-checkpoint': '0.11.30',
            'tensorstore': '0.1.74', 'tensorflow-datasets': '4.9.10',
            'tensorflow-cpu': '2.20'}
  bounds = {}
  for req in _group('runtime'):
    for spec in req.specifier:
      if spec.operator == '>=':
        bounds[_name(req)] = spec.version
  for name, floor in floors.items():
    assert name in bounds, f'{name} has no ">=" bound'
    assert (packaging_version.Version(bounds[name])
            >= packaging_version.Version(floor)), (
                f'{name}>={bounds[name]} is below {floor}, the first release '
                'with the APIs the code uses')
