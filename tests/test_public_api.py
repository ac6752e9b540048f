"""Nothing outside trainer/ uses a private name of trainer/.

Experiments, benchmarks, tests and docs go through the public API (`trainer.Run`
and the public functions of trainer's modules), as users do. A private name
is one with a leading underscore (dunders such as `__main__` are public)
that trainer/ defines: a module-level function, class or variable, a
method or class attribute, or an attribute set on `self`.

Python files are read with `ast`; Markdown files through their ```python
blocks, and their prose for dotted paths such as `trainer.train._meta`.
"""

from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAINER = REPO / 'trainer'
OUTSIDE = ('experiments', 'benchmarks', 'tests', 'docs', 'configs', 'hooks')
SELF = frozenset({'self', 'cls'})
CODE_BLOCK = re.compile(r'```python\n(.*?)```', re.S)
DOTTED = re.compile(r'\btrainer(?:\.\w+)*\.(_\w+)')


def _private(name: str) -> bool:
  return (name.startswith('_') and name.strip('_') != ''
          and not (name.startswith('__') and name.endswith('__')))


def trainer_private_names() -> frozenset[str]:
  """Every private name trainer/ defines (see the module docstring)."""
  names = set()
  for path in TRAINER.rglob('*.py'):
    if _private(path.stem):
      names.add(path.stem)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        names.add(node.id)
      elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name) and node.value.id in SELF):
        names.add(node.attr)
  return frozenset(n for n in names if _private(n))


def _trainer_aliases(tree: ast.AST) -> set[str]:
  """Names bound to trainer or one of its modules by this file's imports."""
  aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == 'trainer' or alias.name.startswith('trainer.'):
          aliases.add(alias.asname or alias.name.split('.')[0])
    elif (isinstance(node, ast.ImportFrom) and node.module
          and (node.module == 'trainer' or node.module.startswith('trainer.'))):
      aliases.update(alias.asname or alias.name for alias in node.names)
  return aliases


def private_uses(source: str, private: frozenset[str]) -> list[str]:
  """The uses of trainer's private names in Python `source`, one line each."""
  tree = ast.parse(source)
  aliases = _trainer_aliases(tree)
  found = []
  for node in ast.walk(tree):
    where = f'line {getattr(node, "lineno", "?")}'
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == 'trainer' or node.module.startswith('trainer.')):
      found += [f'{where}: from {node.module} import {alias.name}'
                for alias in node.names if _private(alias.name)]
    elif isinstance(node, ast.Import):
      found += [f'{where}: import {alias.name}' for alias in node.names
                if alias.name.startswith('trainer.')
                and any(_private(p) for p in alias.name.split('.'))]
    elif isinstance(node, ast.Attribute) and _private(node.attr):
      base = node.value
      while isinstance(base, ast.Attribute):
        base = base.value
      own = isinstance(node.value, ast.Name) and node.value.id in SELF
      if (isinstance(base, ast.Name) and base.id in aliases) or (
          node.attr in private and not own):
        found.append(f'{where}: .{node.attr}')
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and (node.value in private
               or any(f'({name})' in node.value for name in private))):
      found.append(f'{where}: {node.value!r}')
  return found


def markdown_uses(text: str, private: frozenset[str]) -> list[str]:
  """The uses in a Markdown file: its python blocks, dotted paths in prose."""
  found = []
  for block in CODE_BLOCK.findall(text):
    try:
      found += private_uses(block, private)
    except SyntaxError:
      pass  # A fragment, not a program; the prose check still reads it.
  return found + [f'{m.group(0)}' for m in DOTTED.finditer(text)]


def _files() -> list[pathlib.Path]:
  files = [REPO / 'README.md']
  for folder in OUTSIDE:
    files += sorted((REPO / folder).rglob('*.py'))
    files += sorted((REPO / folder).rglob('*.md'))
  this = pathlib.Path(__file__).resolve()  # It names private names as data.
  return [f for f in files if '.venv' not in f.parts and f != this]


def test_the_check_finds_private_names():
  private = trainer_private_names()
  assert {'_meta', '_MetricWriter', '_phase_txs', '_complete'} <= private
  assert not {'train_and_evaluate', 'Run', '__main__'} & private
  snippet = '\n'.join([
      'from trainer import train', 'from trainer.surgery import _complete',
      'import trainer.setup as s', 'train._meta(1)', 's.prepare(1)._phase_txs',
      "patch.setattr(x, '_load_embedded', 1)", "n = 'jit(_meta)'",
      'self._meta = 1', 'from trainer.__main__ import main'])
  assert sorted(private_uses(snippet, private)) == [
      'line 2: from trainer.surgery import _complete', 'line 4: ._meta',
      'line 5: ._phase_txs', "line 6: '_load_embedded'",
      "line 7: 'jit(_meta)'"]
  assert markdown_uses('see `trainer.train._meta`\n```python\n'
                       'from trainer import setup\nsetup._check_hooks(c)\n```',
                       private) == ['line 2: ._check_hooks',
                                    'trainer.train._meta']


def test_no_private_trainer_name_outside_trainer():
  private = trainer_private_names()
  found = {}
  for path in _files():
    text = path.read_text()
    uses = (markdown_uses(text, private) if path.suffix == '.md'
            else private_uses(text, private))
    if uses:
      found[str(path.relative_to(REPO))] = uses
  assert not found, (
      f'private names of trainer/ used outside it: {found}. Use the public '
      'API (trainer.Run, the modules\' public functions), or make the name '
      'public in trainer/ if users need it too.')
