"""Tests for hooks.donors: lazy orbax and msgpack donor readers."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import hooks
from hooks import donors
from hooks import flat as flat_lib
from hooks import optim
from tests.hooks import checkpoints
from tests.hooks import helpers

HEAD = 'params/Dense_1/kernel'
MU = 'opt_state/inner_state/0/mu/Dense_1/kernel'


@pytest.fixture(scope='module')
def state():
  tx = optax.inject_hyperparams(optim.adam)(learning_rate=optax.constant_schedule(1e-3))
  return helpers.jitted_train_step(helpers.make_state(tx), *helpers.batch())


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, state):
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('donor')), state, step=3)


def test_orbax_workdir_structure_classes_and_step(workdir, state):
  donor = hooks.open_donor(workdir)
  assert isinstance(donor, hooks.DonorReader)
  assert (donor.path, donor.step, donor.classes) == (workdir, 3, (0, 1, 2, 3, 4))
  structure = donor.structure()
  live = flat_lib.flatten(state)
  assert sorted(structure) == sorted(live)
  for key, leaf in live.items():
    assert structure[key].shape == np.shape(leaf), key
  assert structure['step'].dtype == np.int32
  assert structure[MU].dtype == np.float32


def test_orbax_step_directory_and_checkpoints_directory(workdir):
  step_dir = os.path.join(workdir, 'checkpoints', '3')
  assert hooks.open_donor(step_dir).step == 3
  assert hooks.open_donor(os.path.join(workdir, 'checkpoints')).step == 3


def test_orbax_latest_step_no_meta_and_int64_step(tmp_path, state):
  checkpoints.save_orbax(str(tmp_path), state, step=2, classes=None)
  fresh = helpers.make_state()  # step is the Python int 0: stored as int64.
  checkpoints.save_orbax(str(tmp_path), fresh, step=5, classes=None)
  donor = hooks.open_donor(str(tmp_path))
  assert donor.step == 5 and donor.classes is None
  assert donor.structure()['step'].dtype == np.int32  # What JAX (x32) holds.
  step = donor.read(['step'])['step']
  assert step.dtype == np.int32 and int(step) == 0


def test_orbax_read_returns_and_reads_only_the_requested_keys(workdir, state, monkeypatch):
  read = []
  for cls in (ocp.type_handlers.NumpyHandler, ocp.type_handlers.ArrayHandler):
    original = cls.deserialize

    def spy(self, infos, args=None, _original=original):
      read.extend(info.name for info in infos)
      return _original(self, infos, args)

    monkeypatch.setattr(cls, 'deserialize', spy)
  donor = hooks.open_donor(workdir)
  out = donor.read([HEAD, MU, 'step'])
  assert set(out) == {HEAD, MU, 'step'}
  assert sorted(read) == sorted(k.replace('/', '.') for k in out)
  live = flat_lib.flatten(state)
  np.testing.assert_array_equal(out[HEAD], live[HEAD])
  np.testing.assert_array_equal(out[MU], live[MU])
  assert isinstance(out[HEAD], np.ndarray) and out['step'].dtype == np.int32
  assert int(out['step']) == 1
  read.clear()
  assert donor.read([]) == {} and read == []


def test_digest_covers_what_was_read(workdir, tmp_path):
  a, b = hooks.open_donor(workdir), hooks.open_donor(workdir)
  empty = a.digest()
  a.read([HEAD])
  assert a.digest() != empty
  b.read([MU])
  assert b.digest() != a.digest()
  b.read([HEAD])
  a.read([MU])
  assert a.digest() == b.digest()  # Same leaves, any order.
  flat = {k: np.asarray(v) for k, v in a.read([HEAD, MU]).items()}
  packed = hooks.open_donor(checkpoints.save_msgpack(
      str(tmp_path / 'x.msgpack'),
      {'params': {'Dense_1': {'kernel': flat[HEAD]}},
       'opt_state': {'inner_state': {'0': {'mu': {'Dense_1': {'kernel': flat[MU]}}}}}}))
  packed.read([MU, HEAD])
  assert packed.digest() == a.digest()  # The content decides, not the format.


def test_msgpack_reader(tmp_path):
  params = {'Conv_0': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)},
            'w': np.int64(3)}
  path = checkpoints.save_msgpack(str(tmp_path / 'old.msgpack'),
                                  {'target': params, 'state': {'step': 4}})
  donor = hooks.open_donor(path)
  assert isinstance(donor, donors.MsgpackDonor) and donor.classes is None
  assert isinstance(donor, hooks.DonorReader) and donor.step is None
  assert donor.path == path
  structure = donor.structure()
  assert {k: (v.shape, v.dtype) for k, v in structure.items()} == {
      'target/Conv_0/kernel': ((2, 3), np.float32),
      'target/w': ((), np.int32),
      'state/step': ((), np.int32),
  }
  out = donor.read(['target/Conv_0/kernel'])
  assert list(out) == ['target/Conv_0/kernel']
  np.testing.assert_array_equal(out['target/Conv_0/kernel'], params['Conv_0']['kernel'])


def test_read_unknown_key_is_an_error_with_did_you_mean(workdir):
  with pytest.raises(hooks.DonorError, match=r"no key\(s\):\n  params/Dense_1/kernal  \(did you mean \['params/Dense_1/kernel'"):
    hooks.open_donor(workdir).read(['params/Dense_1/kernal'])


def test_open_errors(tmp_path):
  with pytest.raises(hooks.DonorError, match=r"Donor '.*/nowhere' does not exist; expected an orbax workdir"):
    hooks.open_donor(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(hooks.DonorError, match=r"the directory .*/empty holds no finished checkpoint step; expected"):
    hooks.open_donor(str(tmp_path / 'empty'))
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(hooks.DonorError, match=r"its directory .*/run/checkpoints holds no finished checkpoint"):
    hooks.open_donor(str(tmp_path / 'run'))
  (tmp_path / 'notes.txt').write_text('hello, not msgpack')
  with pytest.raises(hooks.DonorError, match=r"notes.txt' is a file but not flax msgpack .*; expected an orbax"):
    hooks.open_donor(str(tmp_path / 'notes.txt'))
  scalar = checkpoints.save_msgpack(str(tmp_path / 'scalar.msgpack'), 3)
  with pytest.raises(hooks.DonorError, match=r"decodes to a int, not a non-empty dict"):
    hooks.open_donor(scalar)
  assert issubclass(hooks.DonorError, ValueError)
