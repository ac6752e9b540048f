"""The stored values of an orbax PyTree item, checked before a restore.

For the trainer's resume (orbax reads every array at once) and for donor
reads (``hooks.orbax_donor``): a tensorstore read of a damaged item can
succeed (a warm start from a donor with its largest data file cut in half
did, in tests/trainer/test_damaged.py), so the raw bytes of what is read are
checked first. Reads of parts of a tensor (``read_slices``, for
sharded targets) are not checked this way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ['check_values']


def _is_ocdbt(item_dir: str) -> bool:
  # The manifest may be the missing file: the data directories say it too.
  names = os.listdir(item_dir) if os.path.isdir(item_dir) else []
  return any(n == 'manifest.ocdbt' or n == 'd' or n.startswith('ocdbt.process_')
             for n in names)


def check_values(item_dir: str, keys: Sequence[str] | None = None) -> None:
  """Reads the stored bytes of ``keys`` (default all) one value at a time.

  A PyTree item is an OCDBT database (a manifest, b-tree nodes, data
  files). Reading each stored value on its own finds a truncated or missing
  data file before orbax's restore, which reads every array at once and,
  when one read fails, leaves the others to fail against a closed event loop
  (tracebacks at exit). Only raw stored bytes are read (no decoding), in
  about the time of the restore; an item that is not OCDBT is not checked.

  Args:
    item_dir: A PyTree item directory (e.g. ``<step>/state``).
    keys: Flat keys (``params/Dense_0/kernel``) whose values to check.

  Raises:
    FileNotFoundError: No stored values, or a value whose file is missing.
    ValueError: tensorstore's error for a truncated or unreadable file.
  """
  if not _is_ocdbt(item_dir):
    return
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  store = ts.KvStore.open({'driver': 'ocdbt',
                           'base': f'file://{item_dir}/'}).result()
  stored = store.list().result()
  if not stored:
    raise FileNotFoundError(f'{item_dir} lists no stored values '
                            '(manifest.ocdbt missing or empty)')
  if keys is not None:  # Orbax names a leaf's values '<a>.<b>.<c>/...'.
    names = tuple(key.replace('/', '.') + '/' for key in keys)
    stored = [k for k in stored if k.decode().startswith(names)]
  for key in stored:
    if not store.read(key).result().value:  # A missing data file reads empty.
      raise FileNotFoundError(f'the data of {key.decode()} under {item_dir} '
                              'is missing (a data file was deleted)')
