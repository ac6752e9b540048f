"""Surgery as a plugin for any Flax loop: issue 8's "done when" tests.

- A plain three-layer MLP (``Dense_0..2``) warm-starts with ``warm_start``'s
  default arguments from an identical donor.
- A Transformer's 1,000-token vocabulary is remapped into a 1,200-token one:
  shared tokens keep their rows and Adam slots bit for bit, new tokens get
  fresh rows and fresh slots.
- Freezing after a warm start is one call (``hooks.freeze_state``): ``tx``
  and ``opt_state`` agree, every slot surgery edited is kept, and frozen
  params stay bit-identical under AdamW with weight decay.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hooks
from hooks import flat as flat_lib
from hooks import optim
from tests.hooks import families

RNG = jax.random.key(0)


def _np(flat):
  return {k: np.asarray(v) for k, v in flat.items()}


def _save_standard(path, state) -> str:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  return str(path)


def _save_manager(root, state, step: int) -> str:
  """How Flax's examples save: a CheckpointManager with StandardSave."""
  with ocp.CheckpointManager(root) as manager:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  return str(root)


def test_mlp_warm_starts_with_default_arguments(tmp_path):
  family = families.MLP_FAMILY
  donor = family.used('adam', seed=2, step=7)
  path = _save_manager(tmp_path / 'ckpt', donor, step=7)
  state = family.state('adam', seed=1)

  out, report = hooks.apply(state, [{'name': 'warm_start', 'donor': path}],
                            rng=RNG, fresh=lambda: state)

  got, before, want = (flat_lib.flatten(s) for s in (out, state, donor))
  assert [k for k in got if k.startswith('params/')] == [
      f'params/Dense_{i}/{p}' for i in range(3) for p in ('bias', 'kernel')]
  for key, value in got.items():
    if key.startswith('params/'):  # Copied bit for bit.
      np.testing.assert_array_equal(np.asarray(value), np.asarray(want[key]))
      assert [a.action for a in report.actions(key)] == ['copied']
      assert report.actions(key)[0].source == key
    else:  # Fresh slots and step by default: the same objects.
      assert value is before[key], key
  assert out.step == 0
  assert [s['path'] for s in report.sources] == [path]


VOCAB, NEW_VOCAB, SHARED = 1000, 1200, 700
REMAPPED = ('Embed_0', 'head')  # Token rows; the head's token columns.


@pytest.fixture(scope='module')
def vocab_run(tmp_path_factory):
  """A donor trained two Adam steps on 1,000 tokens, and the new vocabulary."""
  rng = np.random.default_rng(0)
  old = [f'w{i}' for i in range(VOCAB)]
  shared = [old[i] for i in rng.choice(VOCAB, SHARED, replace=False)]
  new = shared + [f'new{i}' for i in range(NEW_VOCAB - SHARED)]
  new = [new[i] for i in rng.permutation(NEW_VOCAB)]
  donor = families.TRANSFORMER.state('adam', seed=3, vocab=VOCAB,
                                     outputs=VOCAB)
  for step in range(2):  # Every token in each batch: every row has slots.
    tokens = rng.permutation(VOCAB).reshape(8, VOCAB // 8)
    labels = rng.integers(0, VOCAB, 8)
    donor = families.train_step(donor, tokens, labels)
  path = _save_standard(tmp_path_factory.mktemp('vocab') / 'donor', donor)
  target = families.TRANSFORMER.state('adam', seed=1, vocab=NEW_VOCAB,
                                      outputs=NEW_VOCAB)
  return path, _np(flat_lib.flatten(donor)), target, old, new


def _labels(old, new):
  return [{'layers': 'Embed_0', 'axis': 0, 'donor': old, 'target': new},
          {'layers': 'head', 'axis': -1, 'donor': old, 'target': new}]


def test_vocabulary_remap_keeps_shared_rows_and_their_adam_slots(vocab_run):
  path, donor, target, old, new = vocab_run
  entry = {'name': 'warm_start', 'donor': path, 'labels': _labels(old, new),
           'opt_state': 'donor'}
  out, report = hooks.apply(target, [entry], rng=RNG, fresh=lambda: target)
  got = _np(flat_lib.flatten(out))
  fresh = _np(flat_lib.flatten(target))
  where = {token: i for i, token in enumerate(old)}
  shared = np.array([i for i, t in enumerate(new) if t in where])
  from_donor = np.array([where[new[i]] for i in shared])
  added = np.array([i for i, t in enumerate(new) if t not in where])
  assert len(shared) == SHARED and len(added) == NEW_VOCAB - SHARED

  checked = 0
  for key, value in got.items():
    layer = next((l for l in REMAPPED if re.search(f'/{l}/', f'/{key}')),
                 None)
    if key == 'step':
      assert value == 0  # step='reset'.
    elif layer is None:  # Everything else: the donor's, slots included.
      np.testing.assert_array_equal(value, donor[key], err_msg=key)
    else:
      axis = 0 if layer == 'Embed_0' else -1
      if value.ndim == 1:  # The head's bias: one entry per token.
        axis = 0
      donor_value, fresh_value = donor[key], fresh[key]
      if '/count/' in key:  # One count per tensor, grown along the tokens.
        param = 'params/' + key.split('/count/', 1)[1]
        assert value.shape[axis] == got[param].shape[axis], key
        value = np.broadcast_to(value, got[param].shape)
        donor_value = np.broadcast_to(donor_value, donor[param].shape)
        fresh_value = np.broadcast_to(fresh_value, fresh[param].shape)
      np.testing.assert_array_equal(
          np.take(value, shared, axis), np.take(donor_value, from_donor, axis),
          err_msg=f'{key}: shared tokens')
      np.testing.assert_array_equal(
          np.take(value, added, axis), np.take(fresh_value, added, axis),
          err_msg=f'{key}: new tokens')
      if key.startswith('opt_state/'):
        checked += 1
        # What was kept is the donor's training, what is new is fresh.
        assert np.all(np.take(donor_value, from_donor, axis) != 0), key
        assert not np.any(np.take(value, added, axis)), key
  assert checked == 3 * 3  # mu, nu, count of embedding, kernel and bias.
  assert got['opt_state/0/count/Embed_0/embedding'][shared].min() == 2

  # The report says which token went where.
  j = shared[0]
  for key, entry in (('params/Embed_0/embedding', 'row'),
                     ('params/head/kernel', 'column')):
    copied, resized = report.actions(key)
    assert (copied.action, copied.source, resized.action) == (
        'copied', key, 'resized')
    assert f"{j} ('{new[j]}') <- donor {entry} {where[new[j]]}" in copied.detail

  # The pieces, listed, do the same.
  pieces = [{'name': 'copy_params', 'donor': path, 'labels': _labels(old, new)},
            {'name': 'copy_slots', 'donor': path, 'labels': _labels(old, new)}]
  listed, _ = hooks.apply(target, pieces, rng=RNG, fresh=lambda: target)
  for key, value in flat_lib.flatten(listed).items():
    np.testing.assert_array_equal(np.asarray(value), got[key], err_msg=key)


TX = optim.adamw(1e-2, weight_decay=0.1)
FROZEN = ('Conv_0/.*', 'BatchNorm_0/.*')
_PARTITION = re.compile(r'inner_states/(?:trainable|frozen)/inner_state/')


def test_freeze_state_after_a_warm_start_keeps_edited_slots(tmp_path):
  family = families.BN
  donor = families.perturbed(family.make_state(TX, seed=2), seed=2, step=7)
  path = _save_standard(tmp_path / 'donor', donor)
  state = family.make_state(TX, seed=1)
  labels = [{'layers': 'head', 'donor': [0, 1, 2, 3, 4],
             'target': [4, 3, 2, 1, 0]}]
  warm, _ = hooks.apply(
      state, [{'name': 'warm_start', 'donor': path, 'labels': labels,
               'opt_state': 'donor'}], rng=RNG, fresh=lambda: state)
  edited = flat_lib.flatten(warm)
  mu = 'opt_state/0/mu/head/kernel'  # The head's columns moved, slots too.
  np.testing.assert_array_equal(
      edited[mu], np.asarray(flat_lib.flatten(donor)[mu])[:, ::-1])

  frozen = hooks.freeze_state(warm, FROZEN)

  assert (jax.tree.structure(frozen.tx.init(frozen.params))
          == jax.tree.structure(frozen.opt_state))
  flat = flat_lib.flatten(frozen)
  slots = flat_lib.slot_index(flat)
  for key, keys in slots.items():
    if re.fullmatch(r'params/(Conv_0|BatchNorm_0)/.*', key):
      assert keys == [], f'{key} is frozen and has no slots.'
      continue
    assert len(keys) == 3, key  # mu, nu, count.
    for slot in keys:  # Every slot surgery edited, bit for bit.
      np.testing.assert_array_equal(flat[slot],
                                    edited[_PARTITION.sub('', slot)], slot)

  trained = frozen
  for step in range(3):
    trained = families.train_step(trained, *family.batch(step))
  before, after = flat_lib.flatten(frozen.params), flat_lib.flatten(
      trained.params)
  for key in before:
    if re.fullmatch('|'.join(FROZEN), key):
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    else:
      assert not np.array_equal(after[key], before[key]), key
  assert int(trained.step) == int(frozen.step) + 3
