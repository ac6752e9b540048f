"""The docs cannot drift: their code blocks run, the config table is complete."""

import ast
import os
import re

import pytest

from configs import default
from hooks import registry
from tests import legacy as legacy_lib
from tests.docs import mdblocks
from trainer import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
LEGACY = legacy_lib.CHECKPOINT


@pytest.mark.parametrize('doc', ['docs/surgery.md', 'docs/hooks.md',
                                 'docs/plugin.md'])
def test_code_blocks_run_and_print_what_the_doc_says(doc, monkeypatch):
  # A doc may register its example hook; keep it out of other tests' registry.
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))  # pylint: disable=protected-access
  if doc == 'docs/surgery.md' and not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  monkeypatch.chdir(REPO)
  assert mdblocks.run(os.path.join(REPO, doc)) >= 4


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def test_config_doc_lists_every_key_with_its_default():
  with open(os.path.join(REPO, 'docs', 'config.md')) as f:
    rows = re.findall(r'^\| `([\w.]+)` \| `(.*?)` \|', f.read(), re.MULTILINE)
  documented = {key: ast.literal_eval(value) for key, value in rows}
  defaults = _flat(default.get_config().to_dict())
  assert sorted(documented) == sorted(defaults)
  for key, value in defaults.items():
    assert documented[key] == value, key


def test_config_doc_marks_exactly_the_fields_that_may_change_on_resume():
  with open(os.path.join(REPO, 'docs', 'config.md')) as f:
    marked = set(re.findall(r'^\| `([\w.]+)` \|.*May change on resume',
                            f.read(), re.MULTILINE))
  assert marked == set(resume.MUTABLE_FIELDS)
