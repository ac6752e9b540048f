"""Tests for hooks.stored_arrays: tensorstore reads into buffers XLA adopts."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hooks import stored_arrays


@pytest.mark.parametrize('shape, dtype', [((), np.int32), ((0, 3), np.float32),
                                          ((7, 5), np.float16),
                                          ((3, 64, 9), np.float32)])
def test_aligned_empty_starts_on_64_bytes(shape, dtype):
  for _ in range(5):  # Whatever offset numpy's own buffer has.
    out = stored_arrays.aligned_empty(shape, dtype)
    assert (out.shape, out.dtype) == (shape, np.dtype(dtype))
    assert out.flags.c_contiguous and out.flags.writeable
    assert out.ctypes.data % 64 == 0 or not out.size


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU only')
def test_xla_cpu_adopts_an_aligned_host_buffer():
  """What the memory of a warm start relies on: no copy to the device."""
  host = stored_arrays.aligned_empty((256, 256), np.float32)
  host[...] = 1.5
  device = jax.device_put(host)
  assert device.unsafe_buffer_pointer() == host.ctypes.data
  donated = jax.jit(lambda x: x * 2, donate_argnums=0)(device)
  np.testing.assert_array_equal(host, 1.5)  # The host buffer stays its own.
  np.testing.assert_array_equal(donated, 3.0)


def test_reads_whole_or_parts_in_the_stored_dtype(tmp_path):
  tree = {'a': np.arange(24, dtype=np.int16).reshape(4, 6),
          'b': np.float32(2.5)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'item', tree)
  checkpointer.wait_until_finished()
  arrays = stored_arrays.StoredArrays(str(tmp_path / 'item'), use_zarr3=False)
  whole, = arrays.read('a')
  np.testing.assert_array_equal(whole, tree['a'], strict=True)
  assert whole.ctypes.data % 64 == 0
  left, corner = arrays.read('a', [((0, 4), (0, 3)), ((2, 4), (4, 6))])
  np.testing.assert_array_equal(left, tree['a'][:, :3], strict=True)
  np.testing.assert_array_equal(corner, tree['a'][2:, 4:], strict=True)
  scalar, = arrays.read('b')
  assert scalar.shape == () and scalar == np.float32(2.5)
  with pytest.raises(ValueError,
                     match=r'NOT_FOUND: .*"c/.zarray" .* does not exist'):
    arrays.read('c')
