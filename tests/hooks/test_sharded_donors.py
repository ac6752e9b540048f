"""warm_start into sharded targets: each device gets its shard, each process
reads its shards (benchmarks.donor_shards runs the processes).

The donors are saved as users save them: ``ocp.StandardCheckpointer`` (every
tensor one chunk), a ``CheckpointManager`` step with ``StandardSave`` and
``SaveArgs(chunk_byte_size=...)``, and ``ocp.StandardCheckpointer`` called
by every process of a sharded run.
"""

import pytest

from benchmarks import donor_shards

WHOLE_NOTE = ('tensor(s) copied into sharded leaves are stored as one chunk '
              'each (e.g. params/Conv_0/kernel), so each process reads them '
              'whole: ')


@pytest.fixture(scope='module')
def donors(tmp_path_factory):
  directory = tmp_path_factory.mktemp('donors')
  donor_shards.write_donors(str(directory))
  return str(directory)


def _check_leaves(record):
  for name, donor in record['donors'].items():
    for key, leaf in donor['leaves'].items():
      where = (record['process_index'], name, key)
      assert leaf['same_sharding'], where
      assert leaf['shard_shapes'] == [leaf['shard_shape']] * len(
          leaf['shard_shapes']), where
      assert leaf['equal'], where


def test_four_devices_each_receive_their_shard(donors, tmp_path):
  record, = donor_shards.launch(donors, str(tmp_path), processes=1, devices=4)
  assert (record['device_count'], record['process_count']) == (4, 1)
  _check_leaves(record)
  kernel = record['donors']['chunked']['leaves']['params/Dense_0/kernel']
  assert kernel['shard_shapes'] == [[1024, 512]] * 4
  for donor in record['donors'].values():
    # One process holds every shard: reading whole tensors wastes nothing.
    assert donor['notes'] == []
    assert donor['ratio'] <= 1.1


def test_two_processes_read_only_their_shards(donors, tmp_path):
  records = donor_shards.launch(donors, str(tmp_path), processes=2,
                                devices=2)
  assert [r['process_index'] for r in records] == [0, 1]
  for record in records:
    assert (record['device_count'], record['process_count']) == (4, 2)
    _check_leaves(record)
    kernel = record['donors']['sharded']['leaves']['params/Dense_0/kernel']
    assert kernel['shard_shapes'] == [[1024, 512]] * 2  # Its 2 of 4.
    for name in ('chunked', 'sharded'):
      donor = record['donors'][name]
      assert donor['ratio'] <= 1.1, (name, donor['rchar'], donor['own_bytes'])
      assert donor['notes'] == [], name
    whole = record['donors']['one_chunk']
    assert whole['ratio'] > 1.5, whole  # The other process's shards too.
    note, = whole['notes']
    assert f'3 {WHOLE_NOTE}' in note
    assert note.endswith('save the donor with orbax SaveArgs('
                         'chunk_byte_size=...) of at most a shard to read '
                         'only the shards.')
