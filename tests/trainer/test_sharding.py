"""config.mesh and config.partition_rules: sharded params, slots, checkpoints.

The runs on 4 forced CPU devices happen in one subprocess
(`tests.trainer.sharding_runs`, JAX started once); the tests here read what
it left. The checks of the rules' form run here, on one device.
"""

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.trainer import runs
from trainer import checkpoint
from trainer import distributed
from trainer.errors import ConfigError

FOUR_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
# What sharding_runs.RULES give on the 2 x 2 (data x model) mesh: spec,
# shard shape.
SHARDED = {
    'Conv_1/kernel': [[None, None, None, 'data'], [3, 3, 32, 32]],
    'Dense_0/kernel': [[None, 'model'], [3136, 128]],
    'Dense_0/bias': [['model'], [128]],
    'Dense_1/bias': [['model'], [5]],
}


@pytest.fixture(scope='module')
def out(tmp_path_factory):
  path = tmp_path_factory.mktemp('sharding')
  result = subprocess.run(
      [sys.executable, '-m', 'tests.trainer.sharding_runs', str(path)],
      cwd=runs.REPO, env=runs.env(**FOUR_DEVICES), capture_output=True,
      text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return path


@pytest.fixture(scope='module')
def record(out):
  with open(out / 'record.json') as f:
    return json.load(f)


# A param, or its SGD momentum slot (under hooks.freeze's partition when a
# phase freezes some params).
PARAM_OR_SLOT = re.compile(r'(?:params|opt_state/(?:inner_states/trainable/'
                           r'inner_state/)?inner_state/0/trace)/(.*)')


def _expected(key):
  """[spec, shard shape] of a param or momentum slot in SHARDED, or None."""
  match = PARAM_OR_SLOT.fullmatch(key)
  return SHARDED.get(match.group(1)) if match else None


# Stage, its slots, its sharded leaves: in the first phase the Conv layers
# are frozen (no slots: Conv_1/kernel's sharded slot is missing).
@pytest.mark.parametrize('stage, slots, sharded', [
    ('abstract', 4, 7), ('fresh', 4, 7), ('entered', 8, 8), ('stepped', 8, 8),
    ('restored', 8, 8)])
def test_params_and_slots_take_the_rules_shardings(record, stage, slots,
                                                   sharded):
  layout = record[stage]
  assert len([k for k in layout if k.startswith('params/')]) == 8
  assert len([k for k in layout if k.endswith(('/kernel', '/bias'))
              and k.startswith('opt_state/')]) == slots
  assert len([k for k in layout if _expected(k)]) == sharded
  for key, spec_and_shard in layout.items():
    want = _expected(key)
    if want is None:  # Other params, the step, counts: replicated.
      assert spec_and_shard[0] == [], key
    else:
      assert spec_and_shard == want, key


def test_each_device_holds_only_its_shard(record):
  shards = record['stepped_shards']
  assert shards['params/Dense_0/kernel'] == [[3136, 128]]
  assert shards['opt_state/inner_state/0/trace/Dense_0/kernel'] == [[3136, 128]]
  assert shards['params/Conv_1/kernel'] == [[3, 3, 32, 32]]
  assert shards['params/Dense_1/kernel'] == [[256, 10]]  # Replicated.
  assert all(spec == [] for spec, _ in record['metrics'].values())


def _close(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


def test_sharded_training_matches_the_replicated_run(out):
  replicated = runs.final_state(str(out / 'replicated'))
  sharded = runs.final_state(str(out / 'sharded'))
  assert int(sharded['step']) == 6
  _close(replicated, sharded)


def test_a_sharded_run_resumes_bitwise(out):
  with open(out / 'resumed' / 'summary.json') as f:
    assert json.load(f)['steps_this_run'] == 3  # Resumed at step 3.
  runs.assert_bitwise_equal(runs.final_state(str(out / 'resumed')),
                            runs.final_state(str(out / 'sharded')))


def _chunks(item_dir):
  """Flat key -> (shape, chunk shape, itemsize) of each stored array."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  store = ts.KvStore.open({'driver': 'ocdbt',
                           'base': f'file://{item_dir}/'}).result()
  out = {}
  for name in store.list().result():
    name = name.decode()
    if name.endswith('/.zarray'):
      meta = json.loads(store.read(name).result().value)
      out[name[:-len('/.zarray')].replace('.', '/')] = (
          tuple(meta['shape']), tuple(meta['chunks']),
          np.dtype(meta['dtype']).itemsize)
  return out


def test_sharded_checkpoints_are_chunked_at_most_one_shard(out, record):
  stored = _chunks(out / 'sharded' / 'checkpoints' / '6' / 'state')
  assert sorted(stored) == sorted(record['restored'])
  for key, (shape, chunks, itemsize) in stored.items():
    shard = record['restored'][key][1]
    assert all(s % c == 0 for s, c in zip(shard, chunks)), key
    assert math.prod(chunks) <= math.prod(shard), key
    assert math.prod(chunks) * itemsize <= checkpoint.CHUNK_BYTES, key
  # A model shard of Dense_0, split between its two data replicas.
  assert stored['params/Dense_0/kernel'][1] == (1568, 128)


def test_a_shard_larger_than_chunk_bytes_is_stored_in_chunks(tmp_path):
  big = jnp.ones((3136, 256), jnp.float32)  # 3.2 MB on one device.
  state = {'params': {'big': big, 'small': jnp.ones((256,))},
           'step': jnp.int32(0)}
  assert checkpoint.chunk_byte_size(big) == checkpoint.CHUNK_BYTES
  assert checkpoint.chunk_byte_size(state['params']['small']) is None
  manager = checkpoint.writer(str(tmp_path), keep=1)
  checkpoint.save(manager, 0, state, config={}, meta={})
  manager.close()
  stored = _chunks(tmp_path / 'checkpoints' / '0' / 'state')
  assert stored['params/big'] == ((3136, 256), (784, 256), 4)
  assert stored['params/small'] == ((256,), (256,), 4)
  np.testing.assert_array_equal(
      checkpoint.read_raw(checkpoint.directory(str(tmp_path)), 0)[
          'params']['big'], np.ones((3136, 256), np.float32))


def test_mesh_and_rules_that_do_not_fit_the_devices_fail_up_front(record):
  errors = record['errors']
  assert errors['head_over_four'] == (
      "config.partition_rules[0]=('Dense_1/kernel', (None, 'model')) splits "
      "dimension 1 of param 'Dense_1/kernel' (shape (256, 10)) over mesh axes "
      "('model',) of size 4, which does not divide 10; shard another "
      'dimension, or change config.mesh.shape so that the axes divide it.')
  assert errors['batch_over_data'] == (
      "batch_size (33) must be divisible by the size of the mesh axis 'data' "
      '(2 of the 4 devices, config.mesh.shape=(2, 2)); choose a multiple of '
      '2.')
  assert errors['batch_over_data_only'] is None  # 34 = 2 x 17 rows.
  assert errors['mesh_does_not_fit'].startswith(
      "config.mesh.shape=(3, -1) over axes ('data', 'model') does not fit "
      'the 4 devices')


@pytest.mark.parametrize('axes, shape, devices, want', [
    (('data', 'model'), (-1, 1), 4, (4, 1)),
    (('data', 'model'), (2, -1), 4, (2, 2)),
    (('model', 'data'), (2, 2), 4, (2, 2)),
    (('data',), (-1,), 1, (1,)),
])
def test_mesh_shape_resolves_minus_one(axes, shape, devices, want):
  assert distributed.mesh_shape(axes, shape, devices) == want


@pytest.mark.parametrize('axes, shape, message', [
    (('model',), (-1,), "name distinct axes, one of them 'data'"),
    (('data', 'data'), (2, 2), 'name distinct axes'),
    (('data', 'model'), (-1, -1), 'or -1 for one of them'),
    (('data', 'model'), (4,), 'give one size > 0 per axis'),
    (('data', 'model'), (2, 3), 'the sizes must multiply to 4'),
])
def test_bad_meshes_are_config_errors(axes, shape, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    distributed.mesh_shape(axes, shape, 4)


@pytest.mark.parametrize('rules, message', [
    ('Dense_0/kernel', 'give a list of (regex, spec) pairs'),
    ([('Dense_0/kernel', 'model')],
     "config.partition_rules[0]=('Dense_0/kernel', 'model') is not allowed: "
     'write (regex, spec)'),
    ([('Dense_0/kernel', (None, 'modle'))],
     "names mesh axes ['modle'] that config.mesh.axes=('data', 'model') "
     'does not have'),
    ([('Dense_0/kernel', ('model', 'model'))], 'uses a mesh axis twice'),
    ([('Dense_0/kernel', (None, 3))], 'spec entry 3 is not allowed'),
    ([('Dense_0/(kernel', (None,))], 'is not a valid regex'),
])
def test_malformed_rules_are_config_errors(rules, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    distributed.parse_rules(rules, ('data', 'model'))


def test_a_rule_must_match_a_param():
  topology = distributed.topology(
      ('data', 'model'), (-1, 1),
      [('Dense_0/kernel', (None, 'model')), ('Dense_2/.*', ('data',))])
  params = {'Dense_0/kernel': jax.ShapeDtypeStruct((8, 4), jnp.float32),
            'Dense_1/kernel': jax.ShapeDtypeStruct((4, 2), jnp.float32)}
  with pytest.raises(ConfigError, match=re.escape(
      "config.partition_rules[1]=('Dense_2/.*', ('data',)) matches no param "
      "of the model: Key pattern 'Dense_2/.*' matches none of the 2 keys.")):
    topology.check(params)


def test_the_first_matching_rule_wins_and_slots_follow_their_param():
  topology = distributed.topology(
      ('data', 'model'), (-1, 1),
      [('Dense_0/kernel', (None, 'model')), ('Dense_.*', ('data',))])
  flat = {'params/Dense_0/kernel': jnp.zeros((8, 4)),
          'params/Dense_1/kernel': jnp.zeros((4, 2)),
          'opt_state/0/mu/Dense_0/kernel': jnp.zeros((8, 4)),
          'opt_state/0/count/Dense_0/kernel': jnp.zeros((1, 4)),
          'opt_state/0/count': jnp.zeros(())}
  specs = {k: tuple(v) for k, v in topology.specs(flat).items()}
  assert specs == {'params/Dense_0/kernel': (None, 'model'),
                   'params/Dense_1/kernel': ('data',),
                   'opt_state/0/mu/Dense_0/kernel': (None, 'model')}
  placed = topology.place(flat)
  assert placed['opt_state/0/count'].sharding == topology.replicated
