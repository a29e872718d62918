"""The `FGramSet`: an ordered set of f-grams (id = rank), its ranking and its matcher.

F-grams of all lengths are ranked together by (count desc, token tuple asc in Python tuple
order, so (1, 2) < (1, 2, 3) < (1, 3)); `select_top` ranks candidates (from `extract` or
the Beam pipeline in `fgrams_beam.py`) and keeps the first `num_fgrams`.

`FGramSet.match*` find, for each position, the longest f-gram ending there, with the
compiled hash table of `kernels.py` (built lazily on first use, never saved).
"""
import hashlib
import mmap
import os
import struct
import threading
import zipfile
import time
from typing import Iterable, Optional, Sequence

from absl import logging
import numpy as np

from scone_jax import paths
from scone_jax.fgrams import kernels

FORMAT_VERSION = 1
_MAGIC = 'scone_jax.FGramSet'
_FINGERPRINT_TAG = b'scone_jax.fgrams'
MAX_TOKEN = 2**31 - 1  # tokens are stored as int32
_CHECK_BLOCK = 1 << 20  # rows validated, hashed or written at a time
_MMAP_MIN_BYTES = 1 << 20  # smaller .npz members are read, larger ones memory-mapped

# ---------------------------------------------------------------------------
# Ranking shared by `extract` and the Beam pipeline.


def _smallest_rows(rows_NxK: np.ndarray, r: int) -> np.ndarray:
  """Indices of the r lexicographically smallest rows, without sorting them all."""
  n = rows_NxK.shape[0]
  if r >= n:
    return np.arange(n)
  if r <= 0:
    return np.zeros(0, np.int64)
  undecided = np.arange(n)
  chosen = []
  for col in range(rows_NxK.shape[1]):
    vals = rows_NxK[undecided, col]
    v = np.partition(vals, r - 1)[r - 1]
    less = vals < v
    chosen.append(undecided[less])
    r -= int(less.sum())
    undecided = undecided[vals == v]
    if len(undecided) <= r:
      break
  chosen.append(undecided[:r])  # all of them, unless rows repeat
  return np.concatenate(chosen)


def rank_order(rows_NxK: np.ndarray, counts_N: np.ndarray) -> np.ndarray:
  """Indices sorting n-grams by (count desc, token tuple asc); rows are padded with -1.

  The order of np.lexsort over (columns, -counts), computed as stable LSD radix passes
  per column (much faster for millions of rows).
  """
  n = rows_NxK.shape[0]
  order = np.arange(n, dtype=np.int64)
  if n <= 1:
    return order
  for col in range(rows_NxK.shape[1] - 1, -1, -1):
    # Padding -1 sorts first; int64 so that MAX_TOKEN + 1 cannot wrap.
    keys = (rows_NxK[order, col].astype(np.int64, copy=False) + 1).astype(np.uint32)
    order = kernels.radix_sort(keys, order, int(keys.max()).bit_length(), True)[1]
  keys = (counts_N.max() - counts_N[order]).astype(np.uint64)
  return kernels.radix_sort(keys, order, int(keys.max()).bit_length(), True)[1]


def select_top(ngrams_NxK, counts_N, *, max_len: int, num_fgrams: int) -> 'FGramSet':
  """Ranks candidate n-grams by (count desc, tuple asc) and keeps the first `num_fgrams`.

  Args:
    ngrams_NxK: all candidate n-grams (distinct), int, K = max_len, each row left-aligned
      and padded with -1 after its length (2 <= length <= max_len, tokens >= 0).
    counts_N: their exact counts, already filtered to >= min_count.
    max_len: K.
    num_fgrams: how many to keep.

  Returns:
    The FGramSet; f-gram id = rank.
  """
  if max_len < 2:
    raise ValueError(f'max_len={max_len}: f-grams have length >= 2; pass max_len >= 2.')
  if num_fgrams < 1:
    raise ValueError(f'num_fgrams={num_fgrams}: pass num_fgrams >= 1.')
  rows = np.asarray(ngrams_NxK)
  counts = np.asarray(counts_N)
  if rows.ndim != 2 or rows.shape[1] != max_len:
    raise ValueError(f'ngrams_NxK has shape {rows.shape}; expected [N, max_len={max_len}] '
                     'rows padded with -1.')
  if counts.shape != (rows.shape[0],):
    raise ValueError(f'counts_N has shape {counts.shape}; expected ({rows.shape[0]},), one '
                     'count per n-gram row.')
  if rows.size and not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f'ngrams_NxK has dtype {rows.dtype}; pass integer token ids.')
  if counts.size and not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f'counts_N has dtype {counts.dtype}; pass integer counts.')
  rows = rows.astype(np.int64, copy=False)
  counts = counts.astype(np.int64, copy=False)
  if rows.size and rows.max() > MAX_TOKEN:
    raise ValueError(f'ngrams_NxK has token id {rows.max()} > {MAX_TOKEN}; token ids must '
                     'fit in int32.')
  _check_rows(rows, (rows >= 0).sum(axis=1), 'ngrams_NxK (padding -1)', pad=-1)
  if counts.size and counts.min() < 1:
    raise ValueError(f'counts_N has a count of {counts.min()}; pass counts >= 1 '
                     '(candidates already filtered to >= min_count).')
  n = rows.shape[0]
  if n > num_fgrams:
    # Select by count first so the tuple sort only sees the top S and the tied boundary.
    threshold = np.partition(counts, n - num_fgrams)[n - num_fgrams]
    above = np.flatnonzero(counts > threshold)
    tied = np.flatnonzero(counts == threshold)
    tied = tied[_smallest_rows(rows[tied], num_fgrams - len(above))]
    keep = np.concatenate([above, tied])
    rows, counts = rows[keep], counts[keep]
  order = rank_order(rows, counts)
  rows, counts = rows[order], counts[order]
  lengths = (rows >= 0).sum(axis=1).astype(np.int32)
  tokens_padded = np.where(rows >= 0, rows, 0)
  return FGramSet(tokens_padded.astype(np.int32), lengths, counts, max_len)


def union(sets: Sequence['FGramSet']) -> 'FGramSet':
  """All f-grams of several sets, each once, ranked as `select_top` ranks.

  An f-gram's count is the sum of the counts the sets record for it: its count in the
  sets' corpora together where each set kept it (a set that did not keep it adds 0, so a
  domain set's f-grams rank by their domain count plus the training count where both have
  them). Ties break by token tuple (asc), so the order, and hence ids and the fingerprint,
  do not depend on the order of `sets`. max_len is the largest of the sets'. One set is
  returned as it is.
  """
  sets = list(sets)
  if not sets:
    raise ValueError('union of no f-gram sets; pass at least one FGramSet.')
  if len(sets) == 1:
    return sets[0]
  k = max(s.max_len for s in sets)
  rows = []
  for s in sets:
    r = np.full((len(s), k), -1, np.int64)
    inside = np.arange(s.max_len)[None, :] < s.lengths[:, None]
    r[:, :s.max_len] = np.where(inside, s.tokens_padded, -1)
    rows.append(r)
  rows_NxK = np.concatenate(rows)
  counts_N = np.concatenate([s.counts for s in sets]).astype(np.int64)
  unique_UxK, inverse_N = np.unique(rows_NxK, axis=0, return_inverse=True)
  counts_U = np.zeros(unique_UxK.shape[0], np.int64)
  np.add.at(counts_U, inverse_N.reshape(-1), counts_N)
  order = rank_order(unique_UxK, counts_U)
  unique_UxK, counts_U = unique_UxK[order], counts_U[order]
  lengths_U = (unique_UxK >= 0).sum(axis=1).astype(np.int32)
  return FGramSet(np.where(unique_UxK >= 0, unique_UxK, 0).astype(np.int32), lengths_U,
                  counts_U, k)


def _check_rows(rows_SxK, lengths_S, what, pad, release=None):
  """Rows must hold `length` tokens >= 0 then only `pad`, with 2 <= length <= K.
  release(): called after each block (a memory-mapped set drops the pages it read)."""
  if not rows_SxK.size:
    return
  k = rows_SxK.shape[1]
  if lengths_S.min() < 2 or lengths_S.max() > k:
    raise ValueError(f'{what}: f-gram lengths must be in [2, {k}], got '
                     f'[{lengths_S.min()}, {lengths_S.max()}].')
  # By blocks of rows: the masks of a whole 100M-row set would be gigabytes.
  for lo in range(0, rows_SxK.shape[0], _CHECK_BLOCK):
    rows, lens = rows_SxK[lo:lo + _CHECK_BLOCK], lengths_S[lo:lo + _CHECK_BLOCK]
    inside = np.arange(k)[None, :] < lens[:, None]
    bad = np.flatnonzero(((rows < 0) & inside).any(1) | ((rows != pad) & ~inside).any(1))
    if release is not None:
      release()
    if bad.size:
      raise ValueError(f'{what}: row {lo + bad[0]} = {rows[bad[0]].tolist()} is not tokens '
                       f'>= 0 followed by padding {pad}.')


# ---------------------------------------------------------------------------
# The .npz file: streamed out, memory-mapped in.


def _release(arr) -> None:
  """madvise(DONTNEED) on the file mapping under arr, if it has one."""
  a = arr
  while a is not None and not isinstance(a, mmap.mmap):
    a = getattr(a, 'base', None)
  if a is not None and not a.closed:
    a.madvise(mmap.MADV_DONTNEED)


def _write_npz(f, arrays: dict, release) -> None:
  """What np.savez writes (stored members `name.npy`), large arrays written by blocks of
  rows with release() after each (a memory-mapped set's pages do not pile up)."""
  fmt = np.lib.format
  with zipfile.ZipFile(f, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, arr in arrays.items():
      with zf.open(name + '.npy', 'w', force_zip64=True) as out:
        if arr.ndim == 0 or arr.nbytes < _MMAP_MIN_BYTES:
          fmt.write_array(out, np.asanyarray(arr), allow_pickle=False)
          continue
        fmt.write_array_header_1_0(out, fmt.header_data_from_array_1_0(arr))
        for lo in range(0, arr.shape[0], _CHECK_BLOCK):
          block = np.ascontiguousarray(arr[lo:lo + _CHECK_BLOCK])
          out.write(block.reshape(-1).view(np.uint8))
          release()


def _mapped_npz(path: str):
  """{name: array} of an .npz whose members are all stored uncompressed: members of at least
  _MMAP_MIN_BYTES memory-mapped at their offsets in the file, the others read; None when a
  member is compressed or not a plain .npy (the caller reads the file whole)."""
  fmt = np.lib.format
  readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
  data = {}
  if not zipfile.is_zipfile(path):
    return None  # the whole read says what it is instead
  with zipfile.ZipFile(path) as zf, open(path, 'rb') as f:
    for info in zf.infolist():
      if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith('.npy'):
        return None
      f.seek(info.header_offset)
      local = f.read(30)
      if len(local) < 30 or local[:4] != b'PK\x03\x04':
        return None
      name_len, extra_len = struct.unpack('<HH', local[26:30])
      f.seek(info.header_offset + 30 + name_len + extra_len)
      version = fmt.read_magic(f)
      if version not in readers:
        return None
      shape, fortran, dtype = readers[version](f)
      name = info.filename[:-4]
      nbytes = int(np.prod(shape)) * dtype.itemsize
      if dtype.hasobject or fortran:
        return None
      if nbytes < _MMAP_MIN_BYTES or not shape:
        with zf.open(info.filename) as member:
          data[name] = fmt.read_array(member, allow_pickle=False)
      else:
        data[name] = np.memmap(path, dtype=dtype, mode='r', offset=f.tell(), shape=shape)
  return data


# ---------------------------------------------------------------------------
# FGramSet


class _Table:
  """The lazily built hash table: a flat int32 array of `width`-int slots, 64-byte aligned."""

  def __init__(self, flat, width, shift, entries):
    self.flat = flat
    self.width = width
    self.shift = shift
    self.entries = entries


# The most entries per slot the match table holds: linear probing stays short (a miss
# probes ~3.6 slots, about two cache lines), and the power-of-two table is 1.7-3.3x the
# entries. It was sized from an upper bound of the entries (all suffixes distinct), which
# at 10M f-grams left it 23% full: 2.1 GB instead of 1.1 GB.
_MAX_LOAD = 0.6


def _build_table(tokens_padded, lengths, max_len, max_load=_MAX_LOAD):
  """The match table; built at the size the f-gram count calls for, doubled while the
  f-grams' suffixes do not fit (each try stops as soon as they overflow)."""
  width = 8 if max_len + 2 <= 8 else 16 * ((max_len + 2 + 15) // 16)
  nslots = 16
  while nslots * max_load < max(len(lengths), 1):
    nslots *= 2
  while True:
    # Align the first slot to a cache line so a 32/64-byte slot never straddles two.
    buf = np.zeros(nslots * width + 16, np.int32)
    off = (-buf.ctypes.data % 64) // 4
    flat = buf[off:off + nslots * width]
    shift = np.uint64(64 - (nslots.bit_length() - 1))
    entries, dup = kernels.insert_fgrams(tokens_padded, lengths, flat, width, shift,
                                         int(nslots * max_load))
    if dup != -2:
      break
    del buf, flat
    nslots *= 2
  if dup >= 0:
    raise ValueError(f'f-gram {dup} = {tuple(tokens_padded[dup, :lengths[dup]].tolist())} '
                     'appears twice in the set; f-grams must be distinct.')
  return _Table(flat, width, shift, entries)


def _as_tokens(x, what='tokens'):
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f'{what} has shape {arr.shape}; pass one 1-D array of token ids.')
  if arr.dtype == np.int32 or arr.dtype == np.int64:
    return np.ascontiguousarray(arr)
  if arr.size == 0:
    return np.zeros(0, np.int32)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'{what} has dtype {arr.dtype}; pass integer token ids.')
  if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
    arr = np.where(arr > MAX_TOKEN, np.uint64(MAX_TOKEN) + 1, arr)  # never match
  return arr.astype(np.int64)


def _owned(x, dtype):
  a = np.ascontiguousarray(x, dtype=dtype)
  if isinstance(x, np.ndarray) and np.may_share_memory(a, x):
    a = a.copy()
  return a


class FGramSet:
  """An ordered set of f-grams (id = rank) with counts and a compiled longest-match lookup.

  Attributes:
    max_len: K, the longest f-gram length the set allows.
    tokens_padded: int32 [S, max_len]; row i is f-gram i left-aligned, padded with 0
      after `lengths[i]` tokens (0 is also a real token: always use `lengths`).
    lengths: int32 [S].
    counts: int64 [S], corpus counts (0 where unknown, e.g. `from_ngrams` without counts).
    fingerprint: hex sha256 of max_len and the ordered f-gram list (not counts, not path).
  """

  def __init__(self, tokens_padded, lengths, counts, max_len: int, *, copy: bool = True):
    """copy=False adopts the arrays when their dtypes already fit (the caller hands them
    over and must not change them): `load` does, so a loaded set is not held twice."""
    max_len = int(max_len)
    if max_len < 2:
      raise ValueError(f'max_len={max_len}: pass max_len >= 2.')
    # Private read-only copies: the set is immutable, and callers' arrays stay writable.
    own = _owned if copy else np.ascontiguousarray
    tokens_padded = own(tokens_padded, np.int32)
    lengths = own(lengths, np.int32)
    counts = own(counts, np.int64)
    s = lengths.shape[0] if lengths.ndim == 1 else -1
    if tokens_padded.shape != (s, max_len) or counts.shape != (s,):
      raise ValueError(f'FGramSet arrays disagree: tokens_padded {tokens_padded.shape}, '
                       f'lengths {lengths.shape}, counts {counts.shape}, max_len {max_len}; '
                       'expected [S, max_len], [S], [S].')
    self._tokens_padded = tokens_padded
    self._lengths = lengths
    self._counts = counts
    _check_rows(tokens_padded, lengths, 'tokens_padded (padding 0)', pad=0,
                release=self.release_pages)
    for a in (tokens_padded, lengths, counts):
      a.flags.writeable = False
    self._max_len = max_len
    self._fingerprint = None
    self._table = None
    self._lock = threading.Lock()

  # -- construction, persistence ------------------------------------------

  @classmethod
  def from_ngrams(cls, ngrams: Sequence[Sequence[int]], counts=None,
                  max_len: Optional[int] = None) -> 'FGramSet':
    """A set from an already ranked list of token tuples (id = position in the list)."""
    ngrams = [tuple(int(t) for t in g) for g in ngrams]
    if max_len is None:
      max_len = max([2] + [len(g) for g in ngrams])
    if any(len(g) > max_len for g in ngrams):
      raise ValueError(f'an n-gram is longer than max_len={max_len}; raise max_len.')
    if any(t < 0 or t > MAX_TOKEN for g in ngrams for t in g):
      raise ValueError(f'token ids must be in [0, {MAX_TOKEN}].')
    tokens = np.zeros((len(ngrams), max_len), np.int32)
    for i, g in enumerate(ngrams):
      tokens[i, :len(g)] = g
    lengths = np.array([len(g) for g in ngrams], np.int32)
    counts = np.zeros(len(ngrams), np.int64) if counts is None else np.asarray(counts)
    return cls(tokens, lengths, counts, max_len)

  def save(self, path) -> None:
    """Writes an .npz (no pickle) atomically; the match table is not stored.

    Streamed to the file (a temporary beside it, renamed into place; on gs:// one upload,
    atomic by itself), never assembled in memory: at 100M f-grams that was 3.2 GB twice.
    The members are stored uncompressed, so `load` can memory-map them.
    """
    path = paths.check(path)
    arrays = dict(magic=np.array(_MAGIC), format_version=np.array(FORMAT_VERSION, np.int64),
                  max_len=np.array(self._max_len, np.int64), tokens_padded=self._tokens_padded,
                  lengths=self._lengths, counts=self._counts,
                  fingerprint=np.array(self.fingerprint))
    if paths.is_cloud(path):
      with paths.open(path, 'wb') as f:
        np.savez(f, **arrays)
      return
    tmp = f'{path}.tmp{os.getpid()}'
    try:
      with open(tmp, 'wb') as f:
        _write_npz(f, arrays, self.release_pages)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path, *, mmap_arrays: bool = True) -> 'FGramSet':
    """Reads a file written by `save`; ValueError naming the path if it is not one.

    mmap_arrays: a local file's arrays are memory-mapped, not read (at 100M f-grams 3.2 GB
    stay in the page cache, not in the process's own memory; `release_pages` lets them go);
    a file on gs:// or with compressed members is read whole."""
    path = paths.check(path)
    if not paths.isfile(path):
      raise FileNotFoundError(f'{path}: no such FGramSet file.')
    try:
      data = _mapped_npz(path) if mmap_arrays and not paths.is_cloud(path) else None
      if data is None:
        with paths.open(path, 'rb') as f:
          z = np.load(f, allow_pickle=False)
          if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError('it holds a single array, not an .npz archive')
          with z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # np.load raises many kinds for foreign or truncated files
      raise ValueError(f'{path}: not a readable FGramSet file ({type(e).__name__}: {e}); '
                       'write it with FGramSet.save or re-run extraction.') from e
    try:
      s = cls._from_arrays(data)
    except (ValueError, TypeError) as e:
      raise ValueError(f'{path}: {e}') from e
    stored = str(data['fingerprint'])
    if stored != s.fingerprint:
      raise ValueError(f'{path}: stored fingerprint {stored[:12]}… does not match the '
                       f'content ({s.fingerprint[:12]}…); the file is damaged or was edited, '
                       're-run extraction.')
    return s

  @classmethod
  def _from_arrays(cls, data) -> 'FGramSet':
    magic = data.get('magic')
    if magic is None or magic.shape != () or str(magic) != _MAGIC:
      raise ValueError(f'not an FGramSet file (no {_MAGIC!r} marker); write it with '
                       'FGramSet.save.')
    version = data.get('format_version')
    if version is None or version.shape != () or version.dtype.kind not in 'iu':
      raise ValueError('FGramSet file has no valid format_version; it is damaged.')
    if int(version) > FORMAT_VERSION:
      raise ValueError(f'FGramSet format version {int(version)} is newer than this '
                       f'scone_jax reads ({FORMAT_VERSION}); upgrade scone_jax.')
    if int(version) != FORMAT_VERSION:
      raise ValueError(f'unknown FGramSet format version {int(version)}.')
    missing = {'max_len', 'tokens_padded', 'lengths', 'counts', 'fingerprint'} - set(data)
    if missing:
      raise ValueError(f'FGramSet file lacks {sorted(missing)}; it is damaged, re-run '
                       'extraction.')
    if data['max_len'].shape != () or data['max_len'].dtype.kind not in 'iu':
      raise ValueError('damaged FGramSet file: max_len is not an integer scalar.')
    for name in ('tokens_padded', 'lengths', 'counts'):
      if data[name].dtype.kind not in 'iu':
        raise ValueError(f'damaged FGramSet file: {name} has dtype {data[name].dtype}.')
    try:
      return cls(data['tokens_padded'], data['lengths'], data['counts'], int(data['max_len']),
                 copy=False)
    except ValueError as e:
      raise ValueError(f'damaged FGramSet file: {e}') from e

  def __getstate__(self):  # pickling (Beam, multiprocessing) leaves the table behind
    return {'tokens_padded': self._tokens_padded, 'lengths': self._lengths,
            'counts': self._counts, 'max_len': self._max_len}

  def __setstate__(self, state):
    self.__init__(state['tokens_padded'], state['lengths'], state['counts'], state['max_len'],
                  copy=False)

  # -- accessors -----------------------------------------------------------

  def __len__(self) -> int:
    return int(self._lengths.shape[0])

  def __repr__(self) -> str:
    return (f'FGramSet(num_fgrams={len(self)}, max_len={self._max_len}, '
            f'fingerprint={self.fingerprint[:12]})')

  @property
  def max_len(self) -> int:
    return self._max_len

  @property
  def tokens_padded(self) -> np.ndarray:
    return self._tokens_padded

  @property
  def lengths(self) -> np.ndarray:
    return self._lengths

  @property
  def counts(self) -> np.ndarray:
    return self._counts

  def release_pages(self) -> None:
    """For a memory-mapped set (`load`): drops this process's mapping of the pages read so
    far (they stay in the page cache, out of its RSS), so passes over every f-gram keep the
    process's memory flat; a no-op for a set in memory."""
    for a in (self._tokens_padded, self._lengths, self._counts):
      _release(a)

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      h = hashlib.sha256()
      h.update(_FINGERPRINT_TAG)
      h.update(np.array([self._max_len, len(self)], '<i8').tobytes())
      # The arrays' own buffers where they are already little-endian: no copy of the set;
      # by blocks, so a memory-mapped set drops each block's pages once hashed.
      for arr in (self._lengths, self._tokens_padded):
        for lo in range(0, max(len(self), 1), _CHECK_BLOCK):
          h.update(np.ascontiguousarray(arr[lo:lo + _CHECK_BLOCK]).astype('<i4',
                                                                          copy=False).data)
          self.release_pages()
      self._fingerprint = h.hexdigest()
    return self._fingerprint

  def top(self, n: int) -> 'FGramSet':
    """The first n f-grams (ids 0..n-1): what extraction with num_fgrams=n would return,
    since ids are ranks. Sweeps over S extract once at the largest S and cut."""
    n = int(n)
    if n < 1:
      raise ValueError(f'top({n}): pass n >= 1.')
    if n >= len(self):
      return self
    return FGramSet(self._tokens_padded[:n], self._lengths[:n], self._counts[:n],
                    self._max_len)

  def ngram(self, i: int) -> tuple:
    """The token tuple of f-gram i."""
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'f-gram id {i} out of range for a set of {len(self)}.')
    return tuple(int(t) for t in self._tokens_padded[i, :self._lengths[i]])

  def index(self, ngram: Sequence[int]) -> int:
    """The id of `ngram`, or -1 if it is not an f-gram."""
    g = np.asarray(ngram, np.int64)
    if g.ndim != 1 or not 2 <= g.size <= self._max_len:
      return -1
    fid, flen = self.match_last(g)
    return fid if flen == g.size else -1

  # -- matching ------------------------------------------------------------

  @property
  def table(self) -> _Table:
    """The hash table used for matching, built on first use (~0.2 s per million f-grams)."""
    if self._table is None:
      with self._lock:
        if self._table is None:
          t0 = time.time()
          table = _build_table(self._tokens_padded, self._lengths, self._max_len)
          logging.debug('f-gram table: %d f-grams, %d entries, %.1f MB, %.2fs', len(self),
                        table.entries, table.flat.nbytes / 1e6, time.time() - t0)
          self._table = table
    return self._table

  def match(self, tokens):
    """Longest f-gram ending at each position of ONE document -> (ids, lengths), int32.

    No match: id -1, length 1. Only tokens at or before a position are used (causal).
    """
    tokens = _as_tokens(tokens)
    return self._match_flat(tokens, np.array([0, tokens.size], np.int64))

  def match_flat(self, tokens, offsets):
    """`match` over concatenated documents; `offsets` = [0, end_0, end_1, ..., len(tokens)].

    No match crosses an offset boundary.
    """
    tokens = _as_tokens(tokens)
    offsets = np.asarray(offsets)
    if (offsets.ndim != 1 or offsets.size < 1 or
        (offsets.size and not np.issubdtype(offsets.dtype, np.integer))):
      raise ValueError(f'offsets {offsets.shape} {offsets.dtype}: pass a 1-D int array '
                       '[0, end_0, ..., len(tokens)].')
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != tokens.size or (np.diff(offsets) < 0).any():
      raise ValueError(f'offsets must start at 0, end at len(tokens)={tokens.size} and not '
                       f'decrease; got {offsets[:3].tolist()}…{offsets[-1]}.')
    return self._match_flat(tokens, offsets)

  def _match_flat(self, tokens, offsets):
    ids = np.empty(tokens.size, np.int32)
    lens = np.empty(tokens.size, np.int32)
    t = self.table
    kernels.match_flat(tokens, offsets, t.flat, t.width, t.shift, self._max_len, ids, lens)
    return ids, lens

  def match_many(self, documents: Iterable) -> list:
    """`match` for many documents in one compiled call -> list of (ids, lengths)."""
    docs = [_as_tokens(d, 'a document') for d in documents]
    if not docs:
      return []
    sizes = np.array([d.size for d in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    dtype = np.int64 if any(d.dtype == np.int64 for d in docs) else np.int32
    ids, lens = self._match_flat(np.concatenate(docs).astype(dtype, copy=False), offsets)
    cuts = offsets[1:-1]
    return list(zip(np.split(ids, cuts), np.split(lens, cuts)))

  def match_last(self, context):
    """Incremental match for decoding: `context` = the last <= max_len tokens of the current
    document ending with the newest one -> (id, length) of the longest f-gram ending there.
    """
    if not (isinstance(context, np.ndarray) and context.ndim == 1 and
            (context.dtype == np.int32 or context.dtype == np.int64)):
      context = _as_tokens(context, 'context')
    t = self._table if self._table is not None else self.table
    fid, flen = kernels.match_last(context, t.flat, t.width, t.shift, self._max_len)
    return int(fid), int(flen)

  def match_last_batch(self, context_BxK, valid_B):
    """`match_last` for a batch: rows right-aligned (last column = newest token), valid_B =
    how many trailing tokens of each row belong to the current document.
    """
    ctx = np.asarray(context_BxK)
    valid = np.asarray(valid_B)
    if ctx.ndim != 2 or valid.shape != (ctx.shape[0],):
      raise ValueError(f'context_BxK {ctx.shape} / valid_B {valid.shape}: pass [B, K] and [B].')
    if ctx.dtype != np.int32 and ctx.dtype != np.int64:
      if ctx.size and not np.issubdtype(ctx.dtype, np.integer):
        raise ValueError(f'context_BxK has dtype {ctx.dtype}; pass integer token ids.')
      ctx = ctx.astype(np.int64)
    ctx = np.ascontiguousarray(ctx)
    valid = valid.astype(np.int64)
    ids = np.empty(ctx.shape[0], np.int32)
    lens = np.empty(ctx.shape[0], np.int32)
    t = self.table
    kernels.match_last_batch(ctx, valid, t.flat, t.width, t.shift, self._max_len, ids, lens)
    return ids, lens


