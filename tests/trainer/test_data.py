"""Data: the embedded split, class selection, batch order, TFDS and idx."""

import gzip
import itertools
import os

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
  with pytest.raises(DataError, match=r'(?s)not prepared.*ConnectionError.*'
                     r'--config.data_source=idx --config.data_dir=M.*'
                     r'manual_dir.*data_source=embedded'):
    data.load('tfds', str(tmp_path), (0, 1))


# The idx source: the four standard MNIST files, raw or gzipped.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'mnist')
# Per-digit counts of full MNIST (shared/data/mnist/README.md).
FULL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FULL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(array: np.ndarray) -> bytes:
  """An idx file of unsigned bytes: 0, 0, 0x08, ndim, big-endian dims, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, '>u4').tobytes()
  return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder, arrays, gz):
  folder.mkdir(parents=True, exist_ok=True)
  for key, name in data.IDX_FILES.items():
    raw = _idx_bytes(arrays[key])
    if gz:
      (folder / (name + '.gz')).write_bytes(gzip.compress(raw))
    else:
      (folder / name).write_bytes(raw)
  return folder


@pytest.fixture
def idx_arrays():
  rng = np.random.default_rng(0)
  return {
      ('train', 'images'): rng.integers(0, 256, (30, 28, 28), np.uint8),
      ('train', 'labels'): np.arange(30, dtype=np.uint8) % 10,
      ('test', 'images'): rng.integers(0, 256, (7, 28, 28), np.uint8),
      ('test', 'labels'): np.array([9, 0, 1, 2, 3, 4, 5], np.uint8),
  }


@pytest.mark.parametrize('gz', [False, True], ids=['raw', 'gz'])
def test_idx_source_reads_the_four_files(tmp_path, idx_arrays, gz):
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz)
  loaded = data.load('idx', str(folder), tuple(range(10)))
  assert loaded.source == 'idx'
  for split, name in ((loaded.train, 'train'), (loaded.test, 'test')):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    # Scaled exactly as the tfds source scales its uint8 images.
    np.testing.assert_array_equal(
        split.images,
        (idx_arrays[(name, 'images')][..., None] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(split.labels, idx_arrays[(name, 'labels')])
  # auto takes a folder that holds the four files.
  assert data.load('auto', str(folder), (0, 1)).source == 'idx'
  three = data.load('idx', str(folder), (9, 0, 5))
  np.testing.assert_array_equal(three.test.labels, [0, 1, 2])


def test_idx_prefers_the_raw_file_when_both_are_there(tmp_path, idx_arrays):
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz=True)
  other = dict(idx_arrays)
  other[('test', 'labels')] = np.zeros(7, np.uint8)
  _write_idx_folder(folder, other, gz=False)  # torchvision keeps both.
  np.testing.assert_array_equal(
      data.load('idx', str(folder), tuple(range(10))).test.labels, [0] * 7)


def _damage(folder, name, change):
  path = folder / name
  path.write_bytes(change(path.read_bytes()))
  return str(path)


@pytest.mark.parametrize('gz,name,change,message', [
    (False, 'train-images-idx3-ubyte', lambda b: b[:-100],
     r'needs 23536: the file is truncated'),
    (True, 'train-images-idx3-ubyte.gz', lambda b: b[:len(b) // 2],
     r'not a complete gzip file'),
    (False, 't10k-labels-idx1-ubyte', lambda b: b + b'\x00',
     r'longer than its header says'),
    (False, 'train-images-idx3-ubyte', lambda b: bytes([0, 0, 8, 1]) + b[4:],
     r'not an idx file of MNIST images \(magic number 0x00000801, '
     r'expected 0x00000803\)'),
    (True, 't10k-labels-idx1-ubyte.gz',
     lambda b: gzip.compress(bytes([0, 0, 0x0d, 1]) + gzip.decompress(b)[4:]),
     r'magic number 0x00000d01, expected 0x00000801'),
    (False, 't10k-images-idx3-ubyte', lambda b: b[:10],
     r'idx header is cut short \(10 bytes\)'),
], ids=['truncated', 'truncated-gz', 'trailing', 'bad-magic', 'float-gz',
        'short-header'])
def test_damaged_idx_file_is_named_with_the_fix(tmp_path, idx_arrays, gz,
                                               name, change, message):
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz)
  path = _damage(folder, name, change)
  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  with pytest.raises(DataError, match=message) as raised:
    data.load('idx', str(folder), tuple(range(10)))
  assert str(raised.value).startswith(path + ': ')
  assert 'replace it with an intact copy' in str(raised.value)
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_truncated_idx_file_says_how_many_bytes(tmp_path, idx_arrays):
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz=False)
  path = _damage(folder, 'train-labels-idx1-ubyte', lambda b: b[:-5])
  with pytest.raises(DataError) as raised:
    data.load('idx', str(folder), tuple(range(10)))
  assert str(raised.value) == (
      f'{path}: 33 bytes (decompressed), but its header (30,) needs 38: the '
      'file is truncated; replace it with an intact copy (compare its size or '
      'checksum with the source it came from).')


@pytest.mark.parametrize('key,array,message', [
    (('test', 'labels'), np.zeros(6, np.uint8),
     r't10k-images-idx3-ubyte\.gz holds 7 images but .*'
     r't10k-labels-idx1-ubyte\.gz holds 6 labels'),
    (('train', 'labels'), np.full(30, 10, np.uint8),
     r'train-labels-idx1-ubyte\.gz: label 10 is not a digit 0\.\.9'),
    (('train', 'images'), np.zeros((30, 32, 32), np.uint8),
     r'train-images-idx3-ubyte\.gz: images of \(32, 32\) pixels, MNIST has '
     r'28x28'),
], ids=['count-mismatch', 'label-range', 'image-shape'])
def test_idx_content_checks(tmp_path, idx_arrays, key, array, message):
  idx_arrays[key] = array
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz=True)
  with pytest.raises(DataError, match=message):
    data.load('idx', str(folder), tuple(range(10)))


def test_missing_idx_files_are_listed_with_the_fix(tmp_path, idx_arrays):
  folder = _write_idx_folder(tmp_path / 'mnist', idx_arrays, gz=True)
  (folder / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(DataError) as raised:
    data.load('idx', str(folder), (0, 1))
  assert str(raised.value) == (
      f"data_source=idx: {str(folder)!r} lacks t10k-labels-idx1-ubyte (raw "
      "or .gz); it holds ['t10k-images-idx3-ubyte.gz', "
      "'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']. Set "
      "--config.data_dir to the folder of the four MNIST idx files (e.g. "
      "torchvision's MNIST/raw).")
  # Three of four files are not enough for auto.
  assert data.load('auto', str(folder), (0, 1)).source == 'embedded'
  with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte, .*"
                     r"nothing \(no such folder\)"):
    data.load('idx', str(tmp_path / 'absent'), (0, 1))


def test_idx_source_on_the_full_shared_files():
  if not os.path.isdir(SHARED_MNIST):
    pytest.skip(f'full MNIST idx files are not at {SHARED_MNIST}')
  loaded = data.load('idx', SHARED_MNIST, tuple(range(10)))
  assert loaded.train.images.shape == (60000, 28, 28, 1)
  assert loaded.test.images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(loaded.train.labels),
                                FULL_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(loaded.test.labels),
                                FULL_TEST_COUNTS)
  assert loaded.train.images.min() == 0.0 and loaded.train.images.max() == 1.0
