"""How a host lookup reads table rows that may sit on disk, and how long each lookup took.

- `LookupTimes`: a fixed-size ring of the latest host lookups' durations (and how many ids
  each asked for), so a long-running server keeps bounded memory and a benchmark can read
  the per-step p50 / p99.
- Concurrent reads: a decode step waits on its batch's rows; when they are not in memory each
  row is a disk read, and reading them one after another adds the latencies up. A memory-
  mapped table copies the rows whose pages are in memory at once (mincore says which) and
  hands the others to a small persistent thread pool (each thread takes a few rows, so their
  page faults are in flight together); a tensorstore table issues one read future per row
  and then waits on them all. Either returns the same bits as a sequential read.
- Cache control for cold-cache measurements: releasing a mapping's pages and reopening a
  tensorstore with an empty cache.
"""
import concurrent.futures
import ctypes
import mmap
import os
import threading
from typing import Optional

import numba
import numpy as np
import tensorstore as ts

# Threads copying rows of a memory-mapped table at once: enough disk reads in flight for a
# batch of 16 (one row each), few enough to be cheap to keep.
POOL_THREADS = 16
DEFAULT_TIMES = 4096  # lookups the ring keeps (a few hundred decode steps of every batch)

_pool = None
_pool_lock = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
  """The process's row-copy thread pool, made on first use."""
  global _pool
  if _pool is None:
    with _pool_lock:
      if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS,
                                                      thread_name_prefix='scone-table-rows')
  return _pool


class LookupTimes:
  """Durations of the latest `capacity` host lookups, each with the number of ids it asked
  for (a decode step asks for its batch; a prefill for batch x width) and how many of them
  were rows to read (matched: id >= 0)."""

  def __init__(self, capacity: int = DEFAULT_TIMES):
    self._seconds = np.zeros(capacity, np.float64)
    self._num_ids = np.zeros(capacity, np.int64)
    self._num_rows = np.zeros(capacity, np.int64)
    self._count = 0
    self._lock = threading.Lock()

  def record(self, seconds: float, num_ids: int, num_rows: int = -1):
    with self._lock:
      i = self._count % self._seconds.size
      self._seconds[i], self._num_ids[i] = seconds, num_ids
      self._num_rows[i] = num_ids if num_rows < 0 else num_rows
      self._count += 1

  def rows(self, num_ids: Optional[int] = None) -> np.ndarray:
    """The rows read by each kept lookup (all, or those of lookups of num_ids ids)."""
    with self._lock:
      n = min(self._count, self._seconds.size)
      r, k = self._num_rows[:n].copy(), self._num_ids[:n].copy()
    return r if num_ids is None else r[k == num_ids]

  def reset(self):
    with self._lock:
      self._count = 0

  def seconds(self, num_ids: Optional[int] = None) -> np.ndarray:
    """The kept durations (all, or those of lookups of exactly num_ids ids), a copy."""
    with self._lock:
      n = min(self._count, self._seconds.size)
      s, k = self._seconds[:n].copy(), self._num_ids[:n].copy()
    return s if num_ids is None else s[k == num_ids]

  def percentiles_ms(self, num_ids: Optional[int] = None) -> dict:
    """{'count', 'p50_ms', 'p99_ms'} of the kept durations (None when there are none)."""
    return percentiles_ms(self.seconds(num_ids))


def percentiles_ms(seconds) -> dict:
  s = np.asarray(seconds, np.float64)
  if not s.size:
    return {'count': 0, 'p50_ms': None, 'p99_ms': None}
  return {'count': int(s.size), 'p50_ms': float(np.percentile(s, 50) * 1e3),
          'p99_ms': float(np.percentile(s, 99) * 1e3)}


# ----------------------------------------------------------------------------- reads


def gather_concurrent(kernel, rows_SxW, ids_N, out_NxW, threads: int = POOL_THREADS):
  """kernel(rows, ids, out) over min(N, threads) slices of the ids at once (the pool runs all
  but the first, which runs here); kernel must release the GIL (numba nogil)."""
  n = ids_N.shape[0]
  groups = min(n, threads)
  cuts = [n * g // groups for g in range(groups + 1)]
  futures = [pool().submit(kernel, rows_SxW, ids_N[a:b], out_NxW[a:b])
             for a, b in zip(cuts[1:-1], cuts[2:])]
  kernel(rows_SxW, ids_N[:cuts[1]], out_NxW[:cuts[1]])
  for f in futures:
    f.result()


_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int
PAGE = mmap.PAGESIZE


@numba.njit(nogil=True)
def copy_resident(table_SxW, ids_N, out_NxW, missing_N, vec) -> int:
  """Copies the rows whose pages are in memory (mincore: the page cache, mapped here or
  not) and lists the others in missing_N (positions in ids_N) -> how many are missing.
  vec: a uint8 scratch of at least row bytes / PAGE + 2 entries."""
  base = table_SxW.ctypes.data
  row_bytes = table_SxW.shape[1] * table_SxW.itemsize
  k = 0
  for i in range(ids_N.shape[0]):
    addr = base + ids_N[i] * row_bytes
    start = addr - addr % PAGE
    ok = _mincore(start, addr + row_bytes - start, vec.ctypes.data) == 0
    for j in range((addr + row_bytes - start + PAGE - 1) // PAGE):
      ok = ok and (vec[j] & 1) == 1
    if ok:
      out_NxW[i, :] = table_SxW[ids_N[i], :]
    else:
      missing_N[k] = i
      k += 1
  return k


def gather_mapped(kernel, rows_SxW, ids_N, out_NxW):
  """kernel(rows, ids, out) for a memory-mapped table: the rows in memory are copied here
  (a thread pool costs ~0.1 ms a call, more than copying them), the others, when more than
  one, by the pool at once (`gather_concurrent`), so their disk reads overlap."""
  n = ids_N.shape[0]
  missing = np.empty(n, np.int64)
  vec = np.empty(out_NxW.shape[1] * out_NxW.itemsize // PAGE + 2, np.uint8)
  k = copy_resident(rows_SxW, ids_N, out_NxW, missing, vec)
  if k == 1:
    i = int(missing[0])
    kernel(rows_SxW, ids_N[i:i + 1], out_NxW[i:i + 1])  # slices: views the kernel writes
  elif k > 1:
    got = np.empty((k, out_NxW.shape[1]), out_NxW.dtype)
    gather_concurrent(kernel, rows_SxW, np.ascontiguousarray(ids_N[missing[:k]]), got)
    out_NxW[missing[:k]] = got


def read_rows_concurrent(store, ids_N: np.ndarray) -> np.ndarray:
  """Rows [N, d] of a tensorstore, one read future per row, all issued before any wait."""
  futures = [store[int(i)].read() for i in ids_N]
  return np.stack([f.result() for f in futures])


# ----------------------------------------------------------------------------- caches


def mapping_of(arr) -> tuple:
  """(the mmap.mmap under a numpy array, its file name) or (None, None) if not mapped."""
  mapped, filename = None, None
  a = arr
  while a is not None:
    if isinstance(a, np.memmap) and filename is None:
      filename = a.filename
    if isinstance(a, mmap.mmap):
      mapped = a
      break
    a = getattr(a, 'base', None)
  return mapped, filename


def advise(arr, advice: int) -> bool:
  """madvise(advice) over the whole mapping under arr (False when arr is not mapped)."""
  mapped, _ = mapping_of(arr)
  if mapped is None or mapped.closed:
    return False
  mapped.madvise(advice)
  return True


def release_pages(arr) -> bool:
  """Drops this process's mapping of arr's file pages (they stay in the page cache for the
  next reader, but no longer count in this process's RSS and can be evicted)."""
  return advise(arr, mmap.MADV_DONTNEED)


def drop_file_cache(path: str):
  """posix_fadvise(DONTNEED) on a file: its clean pages leave the page cache (those still
  mapped by a process stay; release them first)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def reopen_store(store, cache_bytes: int):
  """The same tensorstore opened again with an empty cache pool of cache_bytes."""
  context = ts.Context({'cache_pool': {'total_bytes_limit': int(cache_bytes)}})
  return ts.open(store.spec(minimal_spec=True), open=True, context=context).result()
