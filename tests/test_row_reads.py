"""Host lookups of a table on disk: concurrent per-row reads give the sequential bits, the
lookup timer is a bounded ring, dropping the caches lets the pages go, and a loaded f-gram set
is memory-mapped with its pages released after each pass."""
import os

import numpy as np
import pytest

from scone_jax import export_reader
from scone_jax import fgrams
from scone_jax import row_reads
from scone_jax import table as table_lib

S, D = 6000, 32


def _rss_file_mb():
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('RssFile:'):
        return int(line.split()[1]) / 1024
  raise AssertionError('no RssFile in /proc/self/status')


@pytest.fixture(scope='module')
def rows_SxD():
  return np.random.default_rng(0).standard_normal((S, D)).astype(np.float16)


def _save_synced(path, arr):
  """np.save, flushed to disk: a dirty page cannot be dropped from the page cache."""
  np.save(path, arr)
  fd = os.open(path, os.O_RDONLY)
  os.fsync(fd)
  os.close(fd)


def _tables(tmp_path, rows_SxD):
  """The same rows as an mmap table, an int8 mmap table and a tensorstore table."""
  npy = str(tmp_path / 'rows.npy')
  _save_synced(npy, table_lib.as_bits(rows_SxD))
  mapped = np.asarray(np.load(npy, mmap_mode='r')).view(np.float16)
  q, scales = table_lib.quantize_rows(rows_SxD)
  _save_synced(str(tmp_path / 'q.npy'), q)
  layout = table_lib.make_layout(S, D, 'float16', rows_per_chunk=64, chunks_per_shard=4)
  store = table_lib.open_table(str(tmp_path / 'table'), layout, create=True)
  store[:].write(rows_SxD).result()
  store = table_lib.open_table(str(tmp_path / 'table'), cache_bytes=64 * D * 2 * 3)
  return {'mmap': table_lib.Table(mapped, storage='mmap'),
          'mmap_int8': table_lib.Table(np.load(str(tmp_path / 'q.npy'), mmap_mode='r'),
                                       storage='mmap', scales=scales),
          'tensorstore': table_lib.Table(store=store, storage='tensorstore',
                                         cache_bytes=64 * D * 2 * 3)}


def test_concurrent_lookups_equal_sequential_ones(tmp_path, rows_SxD):
  rng = np.random.default_rng(1)
  tables = _tables(tmp_path, rows_SxD)
  # By default mmap reads a lookup's rows concurrently; tensorstore in one batched read
  # (per-row futures were no faster for it at 10M or 100M rows).
  assert tables['mmap'].lookup_concurrent and tables['mmap_int8'].lookup_concurrent
  assert not tables['tensorstore'].lookup_concurrent
  for name, table in tables.items():
    for n in (2, 16, 17, 64, 300):
      ids = rng.integers(0, S, n)
      ids[n // 2:] = ids[:n - n // 2]  # duplicates
      table.lookup_concurrent = False
      want = table.lookup(ids)
      table.lookup_concurrent = True
      table.drop_cache()  # the rows come from disk: mmap's thread pool copies them
      got = table.lookup(ids)
      assert got.dtype == want.dtype and got.shape == (n, D), name
      np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
      if name != 'mmap_int8':
        np.testing.assert_array_equal(got, rows_SxD[ids], err_msg=name)
      # Through the compiled step's host lookup: unmatched ids (-1) are zero rows.
      fid = np.where(rng.random(n) < 0.3, -1, ids)
      rows = export_reader.host_gather(table, fid)
      np.testing.assert_array_equal(rows[fid >= 0].view(np.uint8),
                                    table.lookup(fid[fid >= 0]).view(np.uint8))
      assert not rows[fid < 0].any()


def test_lookup_times_keep_the_latest_in_a_bounded_ring(tmp_path, rows_SxD):
  times = row_reads.LookupTimes(capacity=8)
  for i in range(20):
    times.record(i / 1000, 16 if i % 2 else 40)
  assert times.seconds().size == 8  # the ring, not a growing list
  assert sorted(times.seconds(num_ids=16) * 1000) == pytest.approx([13, 15, 17, 19])
  p = times.percentiles_ms(num_ids=16)
  assert p['count'] == 4 and p['p50_ms'] == pytest.approx(16.0)
  assert 18.9 < p['p99_ms'] <= 19.0
  times.reset()
  assert times.percentiles_ms() == {'count': 0, 'p50_ms': None, 'p99_ms': None}
  # host_gather records each call with the number of ids it was asked for.
  table = _tables(tmp_path, rows_SxD)['tensorstore']
  before = table.host_lookup_seconds
  for _ in range(3):
    export_reader.host_gather(table, np.array([1, -1, 5, 7]))
  assert table.lookup_times.seconds(num_ids=4).size == 3
  assert table.lookup_times.rows(num_ids=4).tolist() == [3, 3, 3]  # -1 is not read
  assert table.host_lookup_seconds > before


def test_drop_cache_releases_the_mapping_and_the_tensorstore_cache(tmp_path):
  big = np.random.default_rng(2).standard_normal((1 << 16, 128)).astype(np.float16)  # 16 MB
  tables = _tables(tmp_path, big[:S, :D])
  npy = str(tmp_path / 'big.npy')
  np.save(npy, table_lib.as_bits(big))
  table = table_lib.Table(np.asarray(np.load(npy, mmap_mode='r')).view(np.float16),
                          storage='mmap')
  ids = np.arange(0, 1 << 16, 7)
  table.lookup(ids)  # touches every page
  touched = _rss_file_mb()
  table.drop_cache()
  assert touched - _rss_file_mb() > 8, (touched, _rss_file_mb())
  np.testing.assert_array_equal(table.lookup(ids), big[ids])
  ts_table = tables['tensorstore']
  old = ts_table._store  # pylint: disable=protected-access
  ts_table.drop_cache()
  assert ts_table._store is not old  # pylint: disable=protected-access
  np.testing.assert_array_equal(ts_table.lookup([3, 2, 3]), big[:S, :D][[3, 2, 3]])


def test_loaded_fgram_set_is_mapped_and_passes_release_its_pages(tmp_path):
  n = 1 << 20  # 24 MB of arrays
  toks = np.zeros((n, 4), np.int32)
  toks[:, 0], toks[:, 1] = np.arange(n) // 4096, np.arange(n) % 4096
  fs = fgrams.FGramSet(toks, np.full(n, 2, np.int32), np.arange(n, 0, -1), 4)
  path = str(tmp_path / 'set.npz')
  fs.save(path)
  with np.load(path) as z:  # still an .npz numpy reads
    np.testing.assert_array_equal(z['tokens_padded'], fs.tokens_padded)
  base = _rss_file_mb()
  got = fgrams.FGramSet.load(path)  # checks every row and the fingerprint
  assert row_reads.mapping_of(got.tokens_padded)[0] is not None
  assert got.fingerprint == fs.fingerprint
  assert _rss_file_mb() - base < 8, 'the load kept the pages it read'
  assert int(got.tokens_padded[:, 1].sum()) == int(fs.tokens_padded[:, 1].sum())
  assert _rss_file_mb() - base > 12
  got.release_pages()
  assert _rss_file_mb() - base < 8
  assert got.match([5, 17])[0][1] == fs.match([5, 17])[0][1] >= 0
  in_ram = fgrams.FGramSet.load(path, mmap_arrays=False)
  assert row_reads.mapping_of(in_ram.tokens_padded)[0] is None
  assert in_ram.fingerprint == fs.fingerprint


def test_mapped_lookups_copy_resident_rows_and_pool_the_others(tmp_path, rows_SxD):
  table = _tables(tmp_path, rows_SxD)['mmap']
  bits = table_lib.as_bits(table.array)
  ids = np.array([10, 3000, 5999, 10], np.int64)
  out = np.zeros((4, D), np.uint16)
  missing = np.zeros(4, np.int64)
  vec = np.zeros(4, np.uint8)
  table.drop_cache()
  assert row_reads.copy_resident(bits, ids, out, missing, vec) == 4  # none in memory
  assert not out.any()
  np.testing.assert_array_equal(table.lookup(ids), rows_SxD[ids])  # reads them
  assert row_reads.copy_resident(bits, ids, out, missing, vec) == 0
  np.testing.assert_array_equal(out.view(np.float16), rows_SxD[ids])
  # One row missing among resident ones (MADV_RANDOM: a fault reads its own page only).
  table.drop_cache()
  table.lookup([10, 3000])
  one = np.array([10, 5999, 3000], np.int64)
  assert row_reads.copy_resident(bits, one, out[:3], missing, vec) == 1
  table.drop_cache()
  table.lookup([10, 3000])
  np.testing.assert_array_equal(table.lookup(one), rows_SxD[one])
