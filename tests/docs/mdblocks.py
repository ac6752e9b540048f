"""Runs the ```python blocks of a markdown file; a ```text block right after
one is the output it must print."""

import contextlib
import io
import re

_BLOCK = re.compile(r'```python\n(?P<code>.*?)```'
                    r'(?:\n+```text\n(?P<output>.*?)```)?', re.DOTALL)


def blocks(text: str) -> list[tuple[str, str | None]]:
  """(code, expected output or None) for each python block, in order."""
  return [(m['code'], m['output']) for m in _BLOCK.finditer(text)]


def _normal(text: str) -> str:
  return '\n'.join(line.rstrip() for line in text.strip().splitlines())


def run(path: str) -> int:
  """Runs every block of `path` in one namespace; returns how many ran.

  Raises:
    AssertionError: a block printed something other than its text block.
  """
  with open(path) as f:
    found = blocks(f.read())
  namespace: dict = {'__name__': '__docs__'}
  for index, (code, expected) in enumerate(found):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, f'{path} block {index}', 'exec'), namespace)  # pylint: disable=exec-used
    if expected is not None:
      assert _normal(out.getvalue()) == _normal(expected), (
          f'{path} block {index} printed:\n{out.getvalue()}\nexpected:\n'
          f'{expected}')
  return len(found)
