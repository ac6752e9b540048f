"""Tests for hooks.open_donor: every way a Flax user saves, read lazily.

Each form is written exactly as a user would write it, from a BatchNorm net in
a TrainState subclass, then opened, and read: ``read(keys)`` must return
exactly those keys, bit for bit, and (orbax forms) read nothing else.
"""

from __future__ import annotations

import os
import shutil

import flax
import flax.serialization
from flax.training import checkpoints as flax_checkpoints
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import hooks
from hooks import flat as flat_lib
from hooks import nnx_donor
from tests import legacy as legacy_lib
from tests.hooks import checkpoints
from tests.hooks import helpers
from tests.hooks import models

KEYS = ['params/head/kernel', 'batch_stats/BatchNorm_0/var',
        'opt_state/0/mu/Conv_0/kernel', 'step']
LEGACY = legacy_lib.CHECKPOINT


def _distinct(tree, offset: float):
  """Every leaf made distinct from every other, on the host (nothing to compile)."""
  def leaf(x):
    x = np.asarray(x)
    ramp = np.linspace(offset, offset + 1, x.size).reshape(x.shape)
    return jax.device_put((x + ramp).astype(x.dtype))
  return jax.tree.map(leaf, tree)


def _state(seed: int) -> models.BNTrainState:
  """A BNTrainState of Adam with every buffer distinct (as after training)."""
  state = models.make_bn_state(optax.adam(1e-2), seed=seed)
  return state.replace(step=jax.device_put(np.int32(3 + seed)),
                       opt_state=_distinct(state.opt_state, 0.25),
                       batch_stats=_distinct(state.batch_stats, 0.5))


@pytest.fixture(scope='module')
def state():
  return _state(0)


@pytest.fixture(scope='module')
def older():
  return _state(1)


@pytest.fixture
def reads(monkeypatch):
  """Names of the stored tensors read (``params.head.kernel``)."""
  return helpers.spy_on_orbax_reads(monkeypatch)


def _canonical(flat):
  return {k: np.asarray(v).astype(jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
          for k, v in flat.items()}


def _check(reader, want, keys, reads=None, *, form, step, item=None):
  """The reader's form, step, item and structure; read(keys) bitwise, alone."""
  want = _canonical(want)
  assert isinstance(reader, hooks.DonorReader)
  assert (reader.form, reader.step, reader.item) == (form, step, item)
  assert {k: (v.shape, v.dtype) for k, v in reader.structure().items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}
  if reads is not None:
    reads.clear()
  out = reader.read(keys)
  assert list(out) == keys
  for key in keys:
    assert isinstance(out[key], np.ndarray), key
    assert out[key].dtype == want[key].dtype, key
    assert out[key].tobytes() == want[key].tobytes(), key
  if reads is not None:
    assert sorted(set(reads)) == sorted(k.replace('/', '.') for k in keys)
  assert reader.provenance() == {
      'path': reader.path, 'form': form, 'step': step, 'item': item,
      'sha256': reader.digest(), 'keys_read': sorted(keys)}


def test_checkpoint_manager_standard_save_default_item(tmp_path, state, older, reads):
  root = str(tmp_path / 'ckpts')
  manager = ocp.CheckpointManager(root)
  manager.save(1, args=ocp.args.StandardSave(older))
  manager.save(2, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  want, want_older = flat_lib.flatten(state), flat_lib.flatten(older)
  reader = hooks.open_donor(root)
  assert (reader.path, reader.metadata) == (root, {})
  _check(reader, want, KEYS, reads, form='orbax-manager-step', step=2, item='default')
  _check(hooks.open_donor(root, step=1), want_older, KEYS, reads,
         form='orbax-manager-step', step=1, item='default')
  _check(hooks.open_donor(f'{root}/2'), want, KEYS[:1], reads,
         form='orbax-manager-step', step=2, item='default')
  _check(hooks.open_donor(f'{root}/1/default'), want_older, KEYS[1:], reads,
         form='orbax-item', step=1, item='default')
  with pytest.raises(hooks.DonorError, match=r"ckpts has no checkpoint of step 5; its steps are \[1, 2\]"):
    hooks.open_donor(root, step=5)
  with pytest.raises(hooks.DonorError, match=r"step=1 was asked for, but .*/ckpts/2 is one checkpoint of step 2; step= picks"):
    hooks.open_donor(f'{root}/2', step=1)


def test_checkpoint_manager_named_items(tmp_path, state, reads):
  root = str(tmp_path / 'run')
  manager = ocp.CheckpointManager(root)
  manager.save(4, args=ocp.args.Composite(
      model=ocp.args.StandardSave(state),
      dataset=ocp.args.JsonSave({'name': 'digits', 'classes': [3, 1]})))
  manager.save(5, args=ocp.args.Composite(
      model=ocp.args.StandardSave(state),
      ema=ocp.args.StandardSave(state.params)))
  manager.wait_until_finished()
  manager.close()
  reader = hooks.open_donor(root, step=4)  # One tensor item: it is picked.
  assert reader.metadata == {'dataset': {'name': 'digits', 'classes': [3, 1]}}
  _check(reader, flat_lib.flatten(state), KEYS, reads,
         form='orbax-manager-step', step=4, item='model')
  reader = hooks.open_donor(root, item='ema')
  _check(reader, flat_lib.flatten(state.params), ['head/bias'], reads,
         form='orbax-manager-step', step=5, item='ema')
  assert reader.metadata == {}
  with pytest.raises(hooks.DonorError, match=r"step .*/run/5 has 2 tensor items \['ema', 'model'\]; pass item= with"):
    hooks.open_donor(root)
  with pytest.raises(hooks.DonorError, match=r"item='dataset' is a JSON item of .*/run/4; its tensor items are \['model'\]"):
    hooks.open_donor(root, step=4, item='dataset')
  with pytest.raises(hooks.DonorError, match=r"item='modle' is not an item of .*/run/4 \(did you mean 'model'\?\)"):
    hooks.open_donor(f'{root}/4', item='modle')


def test_standard_checkpointer_directory(tmp_path, state, reads):
  path = str(tmp_path / 'state')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  reader = hooks.open_donor(path)
  _check(reader, flat_lib.flatten(state), KEYS, reads, form='orbax-standard', step=None)
  assert reader.metadata == {}
  with pytest.raises(hooks.DonorError, match=r"item='state' was asked for, but .*/state is a single-item"):
    hooks.open_donor(path, item='state')
  with pytest.raises(hooks.DonorError, match=r"step=3 was asked for, but .*/state is one checkpoint with no step number"):
    hooks.open_donor(path, step=3)


def test_pytree_checkpointer_directory(tmp_path, state, reads):
  path = str(tmp_path / 'pytree')
  ocp.PyTreeCheckpointer().save(path, state)
  _check(hooks.open_donor(path), flat_lib.flatten(state), KEYS, reads,
         form='orbax-pytree', step=None)


def test_flax_save_checkpoint_orbax(tmp_path, state, older, reads):
  ckpt_dir = str(tmp_path / 'flax')
  flax_checkpoints.save_checkpoint(ckpt_dir, older, step=3, keep=2)
  flax_checkpoints.save_checkpoint(ckpt_dir, state, step=7, keep=2)
  assert sorted(os.listdir(ckpt_dir)) == ['checkpoint_3', 'checkpoint_7']
  _check(hooks.open_donor(ckpt_dir), flat_lib.flatten(state), KEYS, reads,
         form='orbax-pytree', step=7)
  _check(hooks.open_donor(ckpt_dir, step=3), flat_lib.flatten(older), KEYS, reads,
         form='orbax-pytree', step=3)
  _check(hooks.open_donor(f'{ckpt_dir}/checkpoint_7'), flat_lib.flatten(state),
         KEYS[:2], reads, form='orbax-pytree', step=7)


def test_flax_save_checkpoint_msgpack(tmp_path, state, older):
  ckpt_dir = str(tmp_path / 'flax')
  with flax.config.temp_flip_flag('use_orbax_checkpointing', False):
    flax_checkpoints.save_checkpoint(ckpt_dir, older, step=3, keep=2)
    flax_checkpoints.save_checkpoint(ckpt_dir, state, step=7, keep=2)
  assert os.path.isfile(f'{ckpt_dir}/checkpoint_7')  # A file, not a directory.
  _check(hooks.open_donor(ckpt_dir), flat_lib.flatten(state), KEYS,
         form='flax-msgpack', step=7)
  _check(hooks.open_donor(ckpt_dir, step=3), flat_lib.flatten(older), KEYS,
         form='flax-msgpack', step=3)
  _check(hooks.open_donor(f'{ckpt_dir}/checkpoint_7'), flat_lib.flatten(state),
         KEYS[1:], form='flax-msgpack', step=7)


def test_train_state_and_params_msgpack(tmp_path, state):
  path = tmp_path / 'state.msgpack'
  path.write_bytes(flax.serialization.to_bytes(state))
  reader = hooks.open_donor(str(path))
  _check(reader, flat_lib.flatten(state), KEYS, form='flax-msgpack', step=None)
  assert reader.metadata == {}
  params = tmp_path / 'params.msgpack'
  params.write_bytes(flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, state.params)))
  _check(hooks.open_donor(str(params)), flat_lib.flatten(state.params),
         ['Conv_0/kernel', 'head/bias'], form='flax-msgpack', step=None)


def test_legacy_flax_optim_msgpack():
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  with open(LEGACY, 'rb') as f:
    want = flat_lib.flatten_raw(flax.serialization.msgpack_restore(f.read()))
  keys = ['target/Dense_1/kernel', 'state/param_states/Conv_0/bias/grad_ema', 'state/step']
  _check(hooks.open_donor(LEGACY), want, keys, form='flax-optim-msgpack', step=20)
  # Its directory holds other files too: checkpoint_20 is the one step.
  assert hooks.open_donor(os.path.dirname(LEGACY)).step == 20


def test_trainer_workdir_is_one_case_of_the_rules(tmp_path, state, reads):
  workdir = checkpoints.save_orbax(str(tmp_path / 'work'), state, step=3)
  os.makedirs(f'{workdir}/tensorboard')
  meta = {'config': {'model': 'tiny'},
          'meta': {'classes': [0, 1, 2, 3, 4], 'data_source': 'test', 'model': 'tiny'}}
  want = flat_lib.flatten(state)
  for path in (workdir, f'{workdir}/checkpoints', f'{workdir}/checkpoints/3'):
    reader = hooks.open_donor(path)
    assert (reader.path, reader.metadata) == (path, meta)
    _check(reader, want, KEYS, reads, form='orbax-manager-step', step=3, item='state')
  reader = hooks.open_donor(f'{workdir}/checkpoints/3/state')
  assert reader.metadata == meta
  _check(reader, want, KEYS, reads, form='orbax-item', step=3, item='state')
  checkpoints.save_orbax(f'{workdir}/ema', state, step=1)
  os.rename(f'{workdir}/ema/checkpoints', f'{workdir}/ema_ckpts')
  with pytest.raises(hooks.DonorError, match=r"work' holds 2 CheckpointManager directories \['checkpoints', 'ema_ckpts'\]; pass the one"):
    hooks.open_donor(workdir)


def _data_files(directory):
  return [os.path.join(d, f) for d, _, files in os.walk(directory)
          if os.path.basename(d) == 'd' for f in files]


@pytest.mark.parametrize('damage', ['truncate', 'remove'])
def test_damaged_donor_names_the_step_and_the_fix(tmp_path, state, damage):
  root = str(tmp_path / 'ckpts')
  manager = ocp.CheckpointManager(root)
  manager.save(2, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  reader = hooks.open_donor(root)
  largest = max(_data_files(f'{root}/2'), key=os.path.getsize)
  if damage == 'truncate':
    with open(largest, 'r+b') as f:
      f.truncate(os.path.getsize(largest) // 2)
  else:
    os.remove(largest)
  with pytest.raises(hooks.DonorError) as e:
    reader.read(sorted(reader.structure()))
  message = str(e.value)
  assert message.startswith(f"Donor '{root}': the checkpoint step directory {root}/2 is damaged: ")
  assert message.endswith('Pick another step (donor_step= in a hook entry, step= for '
                          'hooks.open_donor), or re-save this checkpoint.')
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_digest_covers_what_was_read_in_any_form(tmp_path, state):
  workdir = checkpoints.save_orbax(str(tmp_path / 'work'), state, step=3)
  a, b = hooks.open_donor(workdir), hooks.open_donor(workdir)
  empty = a.digest()
  a.read([KEYS[0]])
  assert a.digest() != empty
  b.read([KEYS[1]])
  assert b.digest() != a.digest()
  b.read([KEYS[0]])
  a.read([KEYS[1]])
  assert a.digest() == b.digest()  # Same leaves, any order.
  packed = tmp_path / 'state.msgpack'
  packed.write_bytes(flax.serialization.to_bytes(state))
  c = hooks.open_donor(str(packed))
  c.read(KEYS[:2])
  assert c.digest() == a.digest()  # The content decides, not the format.
  assert a.read([]) == {}


def test_read_unknown_key_is_an_error_with_did_you_mean(tmp_path, state):
  path = tmp_path / 'state.msgpack'
  path.write_bytes(flax.serialization.to_bytes(state))
  with pytest.raises(hooks.DonorError, match=r"no key\(s\):\n  params/head/kernal  \(did you mean \['params/head/kernel'"):
    hooks.open_donor(str(path)).read(['params/head/kernal'])
  with pytest.raises(hooks.DonorError, match=r"read\(\) takes a list of keys, got the string 'step'"):
    hooks.open_donor(str(path)).read('step')


def test_open_errors(tmp_path):
  with pytest.raises(hooks.DonorError, match=r"Donor '.*/nowhere' does not exist; expected an orbax CheckpointManager"):
    hooks.open_donor(str(tmp_path / 'nowhere'))
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  for empty in ('run', 'run/checkpoints'):
    with pytest.raises(hooks.DonorError, match=r"found no checkpoint in .*: orbax did not mark it as a checkpoint, it holds no checkpoint steps"):
      hooks.open_donor(str(tmp_path / empty))
  (tmp_path / 'notes.txt').write_text('hello, not msgpack')
  with pytest.raises(hooks.DonorError, match=r"notes.txt is not flax msgpack .*; expected a flax msgpack file"):
    hooks.open_donor(str(tmp_path / 'notes.txt'))
  scalar = checkpoints.save_msgpack(str(tmp_path / 'scalar.msgpack'), 3)
  with pytest.raises(hooks.DonorError, match=r"decodes to a int, not a non-empty dict"):
    hooks.open_donor(scalar)
  words = checkpoints.save_msgpack(str(tmp_path / 'words.msgpack'), {'name': 'abc'})
  with pytest.raises(hooks.DonorError, match=r"words.msgpack holds no arrays"):
    hooks.open_donor(words)
  manager = ocp.CheckpointManager(str(tmp_path / 'json'))
  manager.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave({'a': 1})))
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(hooks.DonorError, match=r"json/1 has no tensor item \(its items: \{'meta': 'JsonCheckpointHandler'\}\); expected an item saved with ocp.args.StandardSave"):
    hooks.open_donor(str(tmp_path / 'json'))
  ocp.PyTreeCheckpointer().save(str(tmp_path / 'strings'), {'name': 'abc'})
  with pytest.raises(hooks.DonorError, match=r"strings lists no tensors in its metadata"):
    hooks.open_donor(str(tmp_path / 'strings'))
  assert issubclass(hooks.DonorError, ValueError)


KERNEL = 'params/Dense_0/kernel'
# Parts of the (512, 256) kernel: 2 of the 8 chunks of 64 KiB (128 x 128).
PARTS = [((0, 128), (0, 128)), ((384, 512), (128, 256))]


def _rchar():
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar:')).split()[1])


@pytest.fixture(scope='module')
def kernels(tmp_path_factory):
  """One (512, 256) kernel saved chunked (a CheckpointManager step), whole
  (StandardCheckpointer), as msgpack, and as an nnx.state."""
  directory = tmp_path_factory.mktemp('kernels')
  kernel = np.random.default_rng(0).normal(size=(512, 256)).astype(np.float32)
  tree = {'params': {'Dense_0': {'kernel': kernel,
                                 'bias': np.ones(256, np.float32)}}}
  chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 * 1024),
                         tree)
  with ocp.CheckpointManager(directory / 'chunked') as manager:
    manager.save(1, args=ocp.args.StandardSave(tree, save_args=chunked))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / 'whole', tree)
  checkpointer.save(directory / 'nnx', {'Dense_0': {'kernel': {
      'value': kernel}}})
  checkpointer.wait_until_finished()
  checkpoints.save_msgpack(str(directory / 'packed'), tree)
  return kernel, {name: str(directory / name)
                  for name in ('chunked', 'whole', 'packed', 'nnx')}


def test_read_slices_reads_only_the_chunks_of_the_parts(kernels):
  kernel, paths = kernels
  for name, chunked in (('chunked', True), ('whole', False),
                        ('packed', False)):
    reader = hooks.open_donor(paths[name])
    assert reader.chunked(KERNEL) is chunked, name
    before = _rchar()
    parts = reader.read_slices(KERNEL, PARTS)
    read = _rchar() - before
    np.testing.assert_array_equal(parts[0], kernel[:128, :128], strict=True)
    np.testing.assert_array_equal(parts[1], kernel[384:, 128:], strict=True)
    if name == 'chunked':  # 2 chunks of 8, and the chunks' index.
      assert read < 0.35 * kernel.nbytes, read
    elif name == 'whole':  # The one chunk: the whole (compressed) tensor.
      assert read > 0.8 * kernel.nbytes, read
  assert not hooks.open_donor(paths['chunked']).chunked(
      'params/Dense_0/bias')  # 1 KiB: one chunk.


def test_parts_read_count_in_the_digest_in_any_order_and_form(kernels):
  _, paths = kernels
  chunked, whole, packed = (hooks.open_donor(paths[name])
                            for name in ('chunked', 'whole', 'packed'))
  chunked.read_slices(KERNEL, PARTS)
  whole.read_slices(KERNEL, PARTS[::-1])
  packed.read_slices(KERNEL, PARTS)
  assert chunked.digest() == whole.digest() == packed.digest()
  assert chunked.provenance()['keys_read'] == [KERNEL]
  one = hooks.open_donor(paths['whole'])
  one.read_slices(KERNEL, PARTS[:1])
  assert one.digest() != whole.digest()  # Other parts read.
  one.read([KERNEL])
  assert one.digest() not in (whole.digest(), hooks.open_donor(
      paths['whole']).digest())  # The whole tensor now.
  with pytest.raises(hooks.DonorError, match=r"no key\(s\):\n  params/Dense_0/kernal"):
    whole.read_slices('params/Dense_0/kernal', PARTS)


def test_an_nnx_state_view_reads_parts_under_the_target_names(kernels):
  kernel, paths = kernels
  reader = hooks.open_donor(paths['nnx'])
  assert reader.form == nnx_donor.FORM
  view = nnx_donor.view(reader, {'Dense_0/kernel': [KERNEL]})
  assert view.chunked(KERNEL) is False
  part, = view.read_slices(KERNEL, PARTS[1:])
  np.testing.assert_array_equal(part, kernel[384:, 128:], strict=True)
  assert reader.provenance()['keys_read'] == ['Dense_0/kernel/value']


@pytest.mark.parametrize('use_ocdbt, use_zarr3', [(False, False), (True, True),
                                                  (False, True)])
def test_every_orbax_storage_reads_whole_and_in_parts(tmp_path, use_ocdbt,
                                                      use_zarr3):
  """A zarr directory per array (older orbax) and zarr3, besides the default."""
  kernel = np.random.default_rng(1).normal(size=(512, 256)).astype(np.float32)
  tree = {'params': {'Dense_0': {'kernel': kernel}}, 'step': np.int32(2)}
  save_args = {'params': {'Dense_0': {'kernel': ocp.SaveArgs(
      chunk_byte_size=64 * 1024)}}, 'step': ocp.SaveArgs()}
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt,
                                        use_zarr3=use_zarr3)
  ocp.Checkpointer(handler).save(tmp_path / 'item', args=ocp.args.PyTreeSave(
      tree, save_args=save_args))
  reader = hooks.open_donor(str(tmp_path / 'item'))
  out = reader.read([KERNEL, 'step'])
  np.testing.assert_array_equal(out[KERNEL], kernel, strict=True)
  assert out['step'] == 2
  assert reader.chunked(KERNEL)
  part, = reader.read_slices(KERNEL, PARTS[1:])
  np.testing.assert_array_equal(part, kernel[384:, 128:], strict=True)
