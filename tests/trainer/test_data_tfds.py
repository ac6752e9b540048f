"""TFDS's own MNIST builder, run for real on the full idx files.

The DataError's manual_dir recipe is taken from the message and executed as it
stands, so the recipe users are given is the one tested. Preparing 70,000
examples dominates this module's run time.
"""

import hashlib
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import download as tfds_download
from tensorflow_datasets.core.download import download_manager

from tests.trainer.test_data import FULL_TEST_COUNTS
from tests.trainer.test_data import FULL_TRAIN_COUNTS
from tests.trainer.test_data import SHARED_MNIST
from trainer import data
from trainer.errors import DataError


def _record_without_validating(self, url, url_info, path):
  """Replaces only DownloadManager._register_or_validate_checksums.

  The shared files are recompressed: their decompressed bytes are the
  standard ones, but the .gz bytes differ from the download whose checksums
  TFDS registers, and no supported option gets past that:
  - `force_checksums_validation=False` (the default) only concerns URLs
    without a registered checksum; a mismatch still raises
    NonMatchingChecksumError (test_no_supported_option_passes_a_mismatch);
  - `register_checksums=True` writes the builder's checksums file, which for
    MNIST lies inside the installed package (url_checksums/mnist.txt): it
    rewrites it to test write access, then records the new checksums there
    (the same test stops it at that first write and checks the path).
  This method is the one place where the size and sha256 that TFDS computed
  for a file are compared with the registered ones. Everything else runs:
  manual_dir lookup, size and sha256 of each file, gzip extraction, MNIST's
  own parser and the writing of the prepared dataset; the computed info is
  recorded exactly as TFDS records it when it does not validate.
  """
  del path
  self._recorded_url_infos[url] = url_info


def _recipe(message: str) -> str:
  """The manual_dir recipe that the DataError gives, as Python code."""
  found = re.findall(r'`python -c "([^"]*manual_dir=\'M\'[^"]*)"`', message)
  assert len(found) == 1, message
  return found[0]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A TFDS data_dir where the DataError's recipe prepared full MNIST."""
  if not os.path.isdir(SHARED_MNIST):
    pytest.skip(f'full MNIST idx files are not at {SHARED_MNIST}')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as patch:
    def no_network(self, *args, **kwargs):
      raise ConnectionError('Network is unreachable')
    patch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                  no_network)
    with pytest.raises(DataError) as raised:
      data.load('tfds', data_dir, (0, 1))
  code = _recipe(str(raised.value)).replace("manual_dir='M'",
                                            f'manual_dir={SHARED_MNIST!r}')
  assert f"data_dir='{data_dir}'" in code
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager,
                  '_register_or_validate_checksums',
                  _record_without_validating)
    exec(code, {})  # pylint: disable=exec-used
  return data_dir


@pytest.fixture(scope='module')
def auto_loaded(prepared):
  return data.load('auto', prepared, tuple(range(10)))


def test_recipe_prepares_full_mnist_and_auto_picks_it(prepared, auto_loaded):
  builder = tfds.builder('mnist', data_dir=prepared)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  assert auto_loaded.source == 'tfds'
  np.testing.assert_array_equal(np.bincount(auto_loaded.train.labels),
                                FULL_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(auto_loaded.test.labels),
                                FULL_TEST_COUNTS)


def _digests(split: data.Split) -> list[bytes]:
  """One digest per example (image and label), sorted: order-free content."""
  return sorted(
      hashlib.sha1(image.tobytes() + label.tobytes()).digest()
      for image, label in zip(split.images, split.labels))


def test_tfds_and_idx_sources_give_the_same_examples(auto_loaded):
  via_idx = data.load('idx', SHARED_MNIST, tuple(range(10)))
  # TFDS shuffles examples when it writes them; the content is identical.
  for a, b in ((auto_loaded.train, via_idx.train),
               (auto_loaded.test, via_idx.test)):
    assert a.images.dtype == b.images.dtype == np.float32
    assert _digests(a) == _digests(b)


def test_no_supported_option_passes_a_mismatch(tmp_path, monkeypatch):
  if not os.path.isdir(SHARED_MNIST):
    pytest.skip(f'full MNIST idx files are not at {SHARED_MNIST}')
  builder = tfds.builder('mnist', data_dir=str(tmp_path))
  with pytest.raises(download_manager.NonMatchingChecksumError,
                     match='has wrong checksum'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=SHARED_MNIST, force_checksums_validation=False))
  assert not builder.is_prepared()
  # register_checksums=True first checks that it may write the checksums
  # file; stop it there and see which file that is.
  targets = []
  def stop(path):
    targets.append(os.path.realpath(path))
    raise InterruptedError('stopped before writing')
  monkeypatch.setattr(tfds_download, 'validate_checksums_path', stop)
  with pytest.raises(InterruptedError):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=SHARED_MNIST, register_checksums=True))
  package = os.path.realpath(os.path.dirname(tfds.__file__))
  assert targets == [os.path.join(package, 'url_checksums', 'mnist.txt')]
