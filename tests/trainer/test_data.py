"""Data: the embedded split, class selection, batch order and the TFDS path."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from trainer import data
from trainer.errors import DataError


@pytest.fixture(scope='module')
def embedded():
  return data.load('embedded', '/nonexistent', tuple(range(10)))


def test_embedded_split_is_fixed_and_stratified(embedded):
  assert embedded.source == 'embedded'
  assert (embedded.train.size, embedded.test.size) == (4000, 1000)
  np.testing.assert_array_equal(np.bincount(embedded.train.labels), [400] * 10)
  np.testing.assert_array_equal(np.bincount(embedded.test.labels), [100] * 10)
  assert embedded.train.images.shape == (4000, 28, 28, 1)
  assert embedded.train.images.dtype == np.float32
  assert 0.0 <= embedded.train.images.min() < embedded.train.images.max() <= 1.0
  again = data.load('embedded', '/nonexistent', tuple(range(10)))
  np.testing.assert_array_equal(again.test.images, embedded.test.images)


def test_classes_are_selected_and_remapped_in_order(embedded):
  five = data.load('embedded', '/nonexistent', (7, 2, 9))
  assert five.train.size == 1200 and five.test.size == 300
  # Digit 7 becomes label 0, digit 2 label 1, digit 9 label 2.
  sevens = embedded.test.images[embedded.test.labels == 7]
  np.testing.assert_array_equal(five.test.images[five.test.labels == 0], sevens)


def test_auto_without_prepared_tfds_uses_embedded(tmp_path):
  loaded = data.load('auto', str(tmp_path / 'absent'), (0, 1))
  assert loaded.source == 'embedded'
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert data.load('auto', str(empty), (0, 1)).source == 'embedded'


def test_train_batches_depend_only_on_seed_and_step(embedded):
  split = data.select_classes(embedded.train, tuple(range(10)))
  per_epoch = data.steps_per_epoch(split, 128)
  assert per_epoch == 31
  from_zero = list(itertools.islice(data.train_batches(split, 128, 3), 40))
  resumed = list(itertools.islice(data.train_batches(split, 128, 3, 29), 11))
  for a, b in zip(from_zero[29:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = next(data.train_batches(split, 128, 4))
  assert not np.array_equal(other_seed['label'], from_zero[0]['label'])
  # One epoch visits distinct examples.
  seen = np.concatenate([b['image'].reshape(128, -1)[:, 300]
                         for b in from_zero[:per_epoch]])
  assert seen.shape == (per_epoch * 128,)


def test_eval_batches_pad_and_mask_the_last_batch(embedded):
  batches = list(data.eval_batches(embedded.test, 300))
  assert [b['image'].shape[0] for b in batches] == [300] * 4
  assert [int(b['mask'].sum()) for b in batches] == [300, 300, 300, 100]
  np.testing.assert_array_equal(batches[-1]['image'][100:], 0)


def test_tfds_source_reads_through_tensorflow_datasets(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    loaded = data.load('tfds', str(tmp_path), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
  assert loaded.source == 'tfds'
  assert loaded.train.size == 64 and loaded.test.size == 64
  assert loaded.train.images.dtype == np.float32
  assert loaded.train.images.shape[1:] == (28, 28, 1)
  assert loaded.train.images.max() <= 1.0


def test_tfds_without_data_or_network_says_how_to_prepare(tmp_path,
                                                          monkeypatch):
  def no_network(self, *args, **kwargs):
    raise ConnectionError('Network is unreachable')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  with pytest.raises(DataError, match=r'(?s)not prepared.*manual_dir.*'
                     r'data_source=embedded'):
    data.load('tfds', str(tmp_path), (0, 1))
