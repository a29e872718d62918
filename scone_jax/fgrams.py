"""F-grams: exact extraction of frequent n-grams, the `FGramSet`, and a compiled matcher.

An f-gram is a token n-gram, 2 <= n <= `max_len`, that occurs at least `min_count` times
inside the documents of a corpus (overlapping occurrences count, no n-gram crosses a
document boundary). All lengths are ranked together by (count desc, token tuple asc in
Python tuple order, so (1, 2) < (1, 2, 3) < (1, 3)); the first `num_fgrams` are kept and
an f-gram's id is its rank.

`extract` counts with the paper's K-1 passes: pass n only looks at positions where the
(n-1)-gram starting there AND the one starting one token later are frequent. Frequency is
anti-monotone, so the pruning changes cost, never the result. Each n-gram is encoded
exactly (no hashing) as `prefix_id * V + last_token` with dense, order-preserving ids, so
sorting the codes sorts the n-grams in tuple order; codes are counted with a numba radix
sort. Tuples are only rebuilt for the final candidates, and `select_top` (shared with the
Apache Beam pipeline in `fgrams_beam.py`) ranks them.

`FGramSet.match*` find, for each position, the longest f-gram ending there. The matcher is
an exact open-addressing hash table built (in numba, lazily, never saved) from every
f-gram and every proper suffix of length >= 2 of every f-gram (a "marker", id -1 unless
it is itself an f-gram). A slot is one aligned 32- or 64-byte row `[length, id, tokens...]`,
so a probe touches one cache line; probes for n = 2, 3, ... stop at the first miss, and
the slots for upcoming positions are prefetched so that cache misses overlap.
"""
import hashlib
import os
import threading
import time
from typing import Iterable, Optional, Sequence

from absl import logging
from llvmlite import ir
import numba
from numba import types as nb_types
from numba.core import cgutils
from numba.extending import intrinsic
import numpy as np

FORMAT_VERSION = 1
_MAGIC = 'scone_jax.FGramSet'
_FINGERPRINT_TAG = b'scone_jax.fgrams'
MAX_TOKEN = 2**31 - 1  # tokens are stored as int32

# Exact fast path while (#frequent (n-1)-grams) * V fits in a uint64 code; above it a
# (slow, exact) row-wise lexsort takes over. Tests lower it to exercise that path.
_WIDE_KEY_LIMIT = 2**64
# Documents are concatenated in chunks of about this many tokens while reading.
_CHUNK_TOKENS = 1 << 22
# How many positions ahead the matcher prefetches its first hash slots.
_PREFETCH_DISTANCE = 16


# ---------------------------------------------------------------------------
# numba helpers


@intrinsic
def _prefetch(typingctx, arr, idx):  # pylint: disable=unused-argument
  """Emits llvm.prefetch(&arr[idx]) (read, keep in all cache levels); never faults."""
  if not isinstance(arr, nb_types.Array) or arr.ndim != 1:
    return None
  sig = nb_types.void(arr, idx)

  def codegen(context, builder, signature, args):
    aryty, idxty = signature.args
    ary = context.make_array(aryty)(context, builder, args[0])
    i = context.cast(builder, args[1], idxty, nb_types.intp)
    ptr = builder.gep(ary.data, [i])
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    addr = builder.bitcast(ptr, i8p)
    # The intrinsic's mangled name depends on whether this LLVM has opaque pointers.
    name = 'llvm.prefetch.p0' if str(addr.type) == 'ptr' else 'llvm.prefetch.p0i8'
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [addr, i32(0), i32(3), i32(1)])
    return context.get_dummy_value()

  return sig, codegen


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_C0 = np.uint64(0x632BE59BD9B4E019)
_S29 = np.uint64(29)
_S31 = np.uint64(31)


@numba.njit(inline='always')
def _hash_first(t):
  h = (np.uint64(t) ^ _C0) * _M1
  return h ^ (h >> _S31)


@numba.njit(inline='always')
def _hash_step(h, t):
  # The n-gram ending at i is hashed from its last token backwards, so the hash of the
  # (n+1)-gram extends that of the n-gram by one step.
  h = (h ^ np.uint64(t)) * _M1
  return h ^ (h >> _S29)


@numba.njit(inline='always')
def _hash_slot(h, shift):
  return np.intp((h * _M2) >> shift)


@numba.njit(cache=True, nogil=True)
def _count_tokens_kernel(tok, num_values):
  counts = np.zeros(num_values, np.int64)
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      counts[t] += 1
  return counts


@numba.njit(cache=True, nogil=True)
def _densify_lut_kernel(tok, lut):
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      tok[i] = lut[t]


@numba.njit(cache=True, nogil=True)
def _densify_search_kernel(tok, vocab):
  v = vocab.size
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      j = np.searchsorted(vocab, t)
      tok[i] = j if (j < v and vocab[j] == t) else -1


@numba.njit(cache=True, nogil=True)
def _count_candidates_kernel(prev):
  c = 0
  for i in range(prev.size - 1):
    if prev[i] >= 0 and prev[i + 1] >= 0:
      c += 1
  return c


@numba.njit(cache=True, nogil=True)
def _fill_candidates_kernel(prev, tok1, n, num_tokens, keys, pos, with_pos):
  # The (n-1)-gram at i+1 being frequent implies tokens i+1..i+n-1 are frequent tokens of
  # the same document, so tok1[i+n-1] is valid.
  v = np.uint64(num_tokens)
  c = 0
  for i in range(prev.size - 1):
    if prev[i] >= 0 and prev[i + 1] >= 0:
      keys[c] = np.uint64(prev[i]) * v + np.uint64(tok1[i + n - 1])
      if with_pos:
        pos[c] = i
      c += 1


@numba.njit(cache=True, nogil=True)
def _radix_sort_kernel(keys, vals, nbits, with_vals):
  """LSD radix sort of keys (carrying vals when with_vals); returns the sorted arrays."""
  n = keys.size
  npass = max(1, (nbits + 10) // 11)
  dbits = max(1, (nbits + npass - 1) // npass)
  nbuckets = 1 << dbits
  mask = np.uint64(nbuckets - 1)
  hist = np.zeros((npass, nbuckets), np.int64)
  for i in range(n):
    k = np.uint64(keys[i])
    for p in range(npass):
      hist[p, np.intp((k >> np.uint64(p * dbits)) & mask)] += 1
  src_k = keys
  src_v = vals
  dst_k = np.empty_like(keys)
  dst_v = np.empty_like(vals)
  offsets = np.empty(nbuckets, np.int64)
  for p in range(npass):
    s = 0
    skip = False
    for b in range(nbuckets):
      if hist[p, b] == n:
        skip = True
      offsets[b] = s
      s += hist[p, b]
    if skip:  # every key has the same digit here
      continue
    sh = np.uint64(p * dbits)
    for i in range(n):
      k = src_k[i]
      b = np.intp((np.uint64(k) >> sh) & mask)
      j = offsets[b]
      offsets[b] = j + 1
      dst_k[j] = k
      if with_vals:
        dst_v[j] = src_v[i]
    src_k, dst_k = dst_k, src_k
    src_v, dst_v = dst_v, src_v
  return src_k, src_v


@numba.njit(cache=True, nogil=True)
def _scan_runs_kernel(keys, pos, min_count, ids, write_ids):
  """Frequent runs of equal sorted keys -> (keys, counts); ids[pos] = run rank if asked."""
  m = keys.size
  num_frequent = 0
  i = 0
  while i < m:
    j = i + 1
    while j < m and keys[j] == keys[i]:
      j += 1
    if j - i >= min_count:
      num_frequent += 1
    i = j
  fkeys = np.empty(num_frequent, np.uint64)
  fcounts = np.empty(num_frequent, np.int64)
  g = 0
  i = 0
  while i < m:
    j = i + 1
    while j < m and keys[j] == keys[i]:
      j += 1
    if j - i >= min_count:
      fkeys[g] = keys[i]
      fcounts[g] = j - i
      if write_ids:
        for t in range(i, j):
          ids[pos[t]] = g
      g += 1
    i = j
  return fkeys, fcounts


@numba.njit(cache=True, nogil=True)
def _build_table_kernel(tokens_padded, lengths, table, width, shift):
  """Inserts every f-gram and its suffixes; returns (#entries, duplicate id or -1)."""
  nslots = table.size // width
  mask = nslots - 1
  entries = 0
  for f in range(lengths.size):
    length = lengths[f]
    h = _hash_first(tokens_padded[f, length - 1])
    for m in range(2, length + 1):
      first = length - m
      h = _hash_step(h, tokens_padded[f, first])
      s = _hash_slot(h, shift)
      while True:
        base = s * width
        cur = table[base]
        if cur == 0:
          table[base] = m
          table[base + 1] = f if m == length else -1
          for k in range(m):
            table[base + 2 + k] = tokens_padded[f, first + k]
          entries += 1
          break
        if cur == m:
          eq = True
          for k in range(m):
            if table[base + 2 + k] != tokens_padded[f, first + k]:
              eq = False
              break
          if eq:
            if m == length:
              if table[base + 1] >= 0:
                return entries, f
              table[base + 1] = f
            break
        s = (s + 1) & mask
  return entries, -1


@numba.njit(inline='always')
def _longest_ending_at(tokens, i, lim, table, width, shift):
  """(id, length) of the longest f-gram ending at tokens[i] using tokens[i-lim+1..i]."""
  mask = (table.size // width) - 1
  best_id = -1
  best_len = 1
  h = _hash_first(tokens[i])
  for n in range(2, lim + 1):
    h = _hash_step(h, tokens[i - n + 1])
    s = _hash_slot(h, shift)
    found = -2
    while True:
      base = s * width
      cur = table[base]
      if cur == 0:
        break
      if cur == n:
        eq = True
        for k in range(n):
          if table[base + 2 + k] != tokens[i - n + 1 + k]:
            eq = False
            break
        if eq:
          found = table[base + 1]
          break
      s = (s + 1) & mask
    if found == -2:  # no suffix of this length: no longer f-gram can end at i
      break
    if found >= 0:
      best_id = found
      best_len = n
  return best_id, best_len


@numba.njit(cache=True, nogil=True)
def _match_flat_kernel(tokens, offsets, table, width, shift, max_len, ids, lens):
  total = tokens.size
  dist = _PREFETCH_DISTANCE
  for d in range(offsets.size - 1):
    start = offsets[d]
    end = offsets[d + 1]
    for i in range(start, end):
      # Prefetch the 2- and 3-gram slots of a position ahead so their misses overlap with
      # this position's work (ignoring document boundaries: a useless prefetch is harmless).
      j = i + dist
      if j < total and j >= 2:
        h = _hash_step(_hash_first(tokens[j]), tokens[j - 1])
        _prefetch(table, _hash_slot(h, shift) * width)
        h = _hash_step(h, tokens[j - 2])
        _prefetch(table, _hash_slot(h, shift) * width)
      lim = min(max_len, i - start + 1)
      fid, flen = _longest_ending_at(tokens, i, lim, table, width, shift)
      ids[i] = fid
      lens[i] = flen


@numba.njit(cache=True, nogil=True)
def _match_last_kernel(context, table, width, shift, max_len):
  n = context.size
  if n == 0:
    return -1, 1
  return _longest_ending_at(context, n - 1, min(max_len, n), table, width, shift)


@numba.njit(cache=True, nogil=True)
def _match_last_batch_kernel(context_bxk, valid_b, table, width, shift, max_len, ids, lens):
  cols = context_bxk.shape[1]
  for b in range(context_bxk.shape[0]):
    valid = min(valid_b[b], cols)
    if valid <= 0:
      ids[b] = -1
      lens[b] = 1
      continue
    row = context_bxk[b]
    fid, flen = _longest_ending_at(row, cols - 1, min(max_len, valid), table, width, shift)
    ids[b] = fid
    lens[b] = flen


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


def _rank_order(rows_NxK, counts_N):
  """np.lexsort order by (count desc, row asc), as stable LSD radix passes per column."""
  n = rows_NxK.shape[0]
  order = np.arange(n, dtype=np.int64)
  if n <= 1:
    return order
  for col in range(rows_NxK.shape[1] - 1, -1, -1):
    keys = (rows_NxK[order, col] + 1).astype(np.uint32)  # padding -1 sorts first
    order = _radix_sort_kernel(keys, order, int(keys.max()).bit_length(), True)[1]
  keys = (counts_N.max() - counts_N[order]).astype(np.uint64)
  return _radix_sort_kernel(keys, order, int(keys.max()).bit_length(), True)[1]


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
  order = _rank_order(rows, counts)
  rows, counts = rows[order], counts[order]
  lengths = (rows >= 0).sum(axis=1).astype(np.int32)
  tokens_padded = np.where(rows >= 0, rows, 0)
  return FGramSet(tokens_padded.astype(np.int32), lengths, counts, max_len)


def _check_rows(rows_SxK, lengths_S, what, pad):
  """Rows must hold `length` tokens >= 0 then only `pad`, with 2 <= length <= K."""
  if not rows_SxK.size:
    return
  k = rows_SxK.shape[1]
  inside = np.arange(k)[None, :] < lengths_S[:, None]
  if lengths_S.min() < 2 or lengths_S.max() > k:
    raise ValueError(f'{what}: f-gram lengths must be in [2, {k}], got '
                     f'[{lengths_S.min()}, {lengths_S.max()}].')
  bad = np.flatnonzero(((rows_SxK < 0) & inside).any(1) | ((rows_SxK != pad) & ~inside).any(1))
  if bad.size:
    raise ValueError(f'{what}: row {bad[0]} = {rows_SxK[bad[0]].tolist()} is not tokens >= 0 '
                     f'followed by padding {pad}.')


# ---------------------------------------------------------------------------
# FGramSet


class _Table:
  """The lazily built hash table: a flat int32 array of `width`-int slots, 64-byte aligned."""

  def __init__(self, flat, width, shift, entries):
    self.flat = flat
    self.width = width
    self.shift = shift
    self.entries = entries


def _build_table(tokens_padded, lengths, max_len, capacity_hint):
  width = 8 if max_len + 2 <= 8 else 16 * ((max_len + 2 + 15) // 16)
  nslots = 16
  while nslots < 2 * max(capacity_hint, 1):
    nslots *= 2
  # Align the first slot to a cache line so a 32/64-byte slot never straddles two.
  buf = np.zeros(nslots * width + 16, np.int32)
  off = (-buf.ctypes.data % 64) // 4
  flat = buf[off:off + nslots * width]
  shift = np.uint64(64 - (nslots.bit_length() - 1))
  entries, dup = _build_table_kernel(tokens_padded, lengths, flat, width, shift)
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

  def __init__(self, tokens_padded, lengths, counts, max_len: int):
    max_len = int(max_len)
    if max_len < 2:
      raise ValueError(f'max_len={max_len}: pass max_len >= 2.')
    # Private read-only copies: the set is immutable, and callers' arrays stay writable.
    tokens_padded = _owned(tokens_padded, np.int32)
    lengths = _owned(lengths, np.int32)
    counts = _owned(counts, np.int64)
    s = lengths.shape[0] if lengths.ndim == 1 else -1
    if tokens_padded.shape != (s, max_len) or counts.shape != (s,):
      raise ValueError(f'FGramSet arrays disagree: tokens_padded {tokens_padded.shape}, '
                       f'lengths {lengths.shape}, counts {counts.shape}, max_len {max_len}; '
                       'expected [S, max_len], [S], [S].')
    _check_rows(tokens_padded, lengths, 'tokens_padded (padding 0)', pad=0)
    for a in (tokens_padded, lengths, counts):
      a.flags.writeable = False
    self._tokens_padded = tokens_padded
    self._lengths = lengths
    self._counts = counts
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
    """Writes an .npz (no pickle) atomically; the match table is not stored."""
    path = os.fspath(path)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:
      np.savez(f, magic=np.array(_MAGIC), format_version=np.array(FORMAT_VERSION, np.int64),
               max_len=np.array(self._max_len, np.int64), tokens_padded=self._tokens_padded,
               lengths=self._lengths, counts=self._counts,
               fingerprint=np.array(self.fingerprint))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path) -> 'FGramSet':
    """Reads a file written by `save`; ValueError naming the path if it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such FGramSet file.')
    try:
      z = np.load(path, allow_pickle=False)
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
      return cls(data['tokens_padded'], data['lengths'], data['counts'], int(data['max_len']))
    except ValueError as e:
      raise ValueError(f'damaged FGramSet file: {e}') from e

  def __getstate__(self):  # pickling (Beam, multiprocessing) leaves the table behind
    return {'tokens_padded': self._tokens_padded, 'lengths': self._lengths,
            'counts': self._counts, 'max_len': self._max_len}

  def __setstate__(self, state):
    self.__init__(state['tokens_padded'], state['lengths'], state['counts'], state['max_len'])

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

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      h = hashlib.sha256()
      h.update(_FINGERPRINT_TAG)
      h.update(np.array([self._max_len, len(self)], '<i8').tobytes())
      h.update(self._lengths.astype('<i4').tobytes())
      h.update(self._tokens_padded.astype('<i4').tobytes())
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
          upper = int((self._lengths.astype(np.int64) - 1).sum())
          table = _build_table(self._tokens_padded, self._lengths, self._max_len, upper)
          if 4 * table.entries < upper:  # many shared suffixes: shrink to the real size
            table = _build_table(self._tokens_padded, self._lengths, self._max_len,
                                 table.entries)
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
    _match_flat_kernel(tokens, offsets, t.flat, t.width, t.shift, self._max_len, ids, lens)
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
    fid, flen = _match_last_kernel(context, t.flat, t.width, t.shift, self._max_len)
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
    _match_last_batch_kernel(ctx, valid, t.flat, t.width, t.shift, self._max_len, ids, lens)
    return ids, lens


# ---------------------------------------------------------------------------
# Extraction


def _validate_document(doc, index):
  arr = np.asarray(doc)
  if arr.ndim != 1:
    raise ValueError(f'document {index} has shape {arr.shape}; pass 1-D token id arrays.')
  if arr.size == 0:
    return None
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'document {index} has dtype {arr.dtype}; pass integer token ids '
                     '(e.g. tokenizer output as np.int32).')
  lo, hi = arr.min(), arr.max()
  if lo < 0 or hi > MAX_TOKEN:
    raise ValueError(f'document {index} has token ids in [{lo}, {hi}]; ids must be in '
                     f'[0, {MAX_TOKEN}] (remove padding/negative ids before extraction).')
  return arr.astype(np.int32, copy=False)


def _concatenate(documents, log):
  """One int32 array of all documents, each followed by a -1 separator."""
  t0 = time.time()
  sep = np.array([-1], np.int32)
  chunks, parts = [], []
  part_tokens = num_docs = num_tokens = 0
  for index, doc in enumerate(documents):
    arr = _validate_document(doc, index)
    num_docs += 1
    if arr is None:
      continue
    parts += [arr, sep]
    part_tokens += arr.size + 1
    num_tokens += arr.size
    if part_tokens >= _CHUNK_TOKENS:
      chunks.append(np.concatenate(parts))
      parts, part_tokens = [], 0
      if len(chunks) % 25 == 0:
        log('f-grams: read %d documents, %d tokens (%.1fs)', num_docs, num_tokens,
            time.time() - t0)
  if parts:
    chunks.append(np.concatenate(parts))
  tok = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  del chunks
  log('f-grams: read %d documents, %d tokens (%.1fs)', num_docs, num_tokens, time.time() - t0)
  return tok, num_tokens


def _wide_pass(prev, tok1, n, min_count, ids, write_ids):
  """Exact but slow pass for when prefix_id * V would overflow a uint64 code."""
  cand = np.flatnonzero((prev[:-1] >= 0) & (prev[1:] >= 0))
  prefix = prev[cand].astype(np.int64)
  last = tok1[cand + n - 1].astype(np.int64)
  order = np.lexsort((last, prefix))
  prefix, last, pos = prefix[order], last[order], cand[order]
  m = len(pos)
  if m == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0
  brk = np.flatnonzero((prefix[1:] != prefix[:-1]) | (last[1:] != last[:-1])) + 1
  starts = np.concatenate([[0], brk])
  run_counts = np.diff(np.concatenate([starts, [m]]))
  frequent = run_counts >= min_count
  if write_ids:
    run_ids = np.where(frequent, np.cumsum(frequent) - 1, -1)
    ids[pos] = np.repeat(run_ids, run_counts)
  return prefix[starts[frequent]], last[starts[frequent]], run_counts[frequent], m


def extract(documents: Iterable, *, max_len: int, min_count: int, num_fgrams: int,
            progress: bool = True) -> FGramSet:
  """Exact f-gram extraction: n-grams (2 <= n <= max_len) inside documents with count >=
  min_count, ranked by (count desc, tuple asc); the top `num_fgrams` become the set.

  Args:
    documents: iterable of 1-D integer arrays of token ids in [0, 2**31 - 1].
    max_len: K >= 2.
    min_count: >= 1.
    num_fgrams: S >= 1 (the set is smaller if fewer n-grams qualify).
    progress: log per-pass progress at INFO (else DEBUG).

  Returns:
    The FGramSet.
  """
  if not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ValueError(f'max_len={max_len!r}: f-grams have 2 <= n <= max_len; pass an int >= 2 '
                     '(the paper uses 5).')
  if not isinstance(min_count, (int, np.integer)) or min_count < 1:
    raise ValueError(f'min_count={min_count!r}: pass an int >= 1.')
  if not isinstance(num_fgrams, (int, np.integer)) or num_fgrams < 1:
    raise ValueError(f'num_fgrams={num_fgrams!r}: pass an int >= 1.')
  if isinstance(documents, np.ndarray) and documents.ndim == 1 and documents.dtype != object:
    raise ValueError('documents is one flat array; pass an iterable of documents, e.g. '
                     '[tokens] for a single document.')
  max_len, min_count, num_fgrams = int(max_len), int(min_count), int(num_fgrams)
  log = logging.info if progress else logging.debug
  t_start = time.time()

  tok, num_tokens = _concatenate(documents, log)

  # Pass 1: frequent tokens, renumbered densely in increasing order (so that comparing
  # dense ids compares tokens) with -1 for rare tokens and document separators.
  t0 = time.time()
  max_token = int(tok.max()) if tok.size else -1
  if max_token + 1 <= max(1 << 24, 2 * tok.size):
    token_counts = _count_tokens_kernel(tok, max_token + 1)
    vocab = np.flatnonzero(token_counts >= min_count).astype(np.int32)
    lut = np.full(max_token + 1, -1, np.int32)
    lut[vocab] = np.arange(len(vocab), dtype=np.int32)
    _densify_lut_kernel(tok, lut)
    del lut, token_counts
  else:
    values, token_counts = np.unique(tok[tok >= 0], return_counts=True)
    vocab = values[token_counts >= min_count].astype(np.int32)
    _densify_search_kernel(tok, vocab)
    del values, token_counts
  tok1 = tok
  num_vocab = len(vocab)
  log('f-grams pass 1: %d tokens, %d frequent tokens (%.1fs)', num_tokens, num_vocab,
      time.time() - t0)

  # Passes 2..K. Level n keeps, per frequent n-gram (dense id = rank in tuple order among
  # n-grams), the id of its (n-1)-prefix and its last dense token.
  prefix_by_len = {}
  last_by_len = {}
  counts_by_len = {}
  num_prev = num_vocab
  prev = tok1
  for n in range(2, max_len + 1):
    if num_prev == 0 or tok1.size < n:
      break
    t0 = time.time()
    write_ids = n < max_len
    # Pass n overwrites pass n-1's ids (pass 1's are the tokens, which are kept).
    ids = prev if (n > 2 or not write_ids) else np.empty_like(tok1)
    if num_prev * num_vocab <= _WIDE_KEY_LIMIT:
      m = _count_candidates_kernel(prev)
      nbits = max(1, (num_prev * num_vocab - 1).bit_length())
      keys = np.empty(m, np.uint32 if nbits <= 32 else np.uint64)
      pos = np.empty(m if write_ids else 0, np.uint32 if tok1.size < 2**32 else np.int64)
      _fill_candidates_kernel(prev, tok1, n, num_vocab, keys, pos, write_ids)
      keys, pos = _radix_sort_kernel(keys, pos, nbits, write_ids)
      if write_ids:
        ids[:] = -1
      fkeys, fcounts = _scan_runs_kernel(keys, pos, min_count, ids, write_ids)
      del keys, pos
      prefix_by_len[n] = (fkeys // np.uint64(num_vocab)).astype(np.int64)
      last_by_len[n] = (fkeys % np.uint64(num_vocab)).astype(np.int64)
      del fkeys
    else:
      logging.warning('f-grams pass %d: %d x %d codes overflow uint64; using the slow exact '
                      'row sort.', n, num_prev, num_vocab)
      prev_copy = prev.copy() if write_ids else prev
      if write_ids:
        ids[:] = -1
      prefix_by_len[n], last_by_len[n], fcounts, m = _wide_pass(
          prev_copy, tok1, n, min_count, ids, write_ids)
      del prev_copy
    counts_by_len[n] = fcounts
    num_prev = len(fcounts)
    prev = ids
    log('f-grams pass %d: %d candidate positions, %d frequent %d-grams (%.1fs)', n, m,
        num_prev, n, time.time() - t0)
  del prev, tok, tok1

  # Keep only candidates that can make the top S by count (ties at the boundary included),
  # rebuild their tuples, and let select_top rank them.
  t0 = time.time()
  lens_present = sorted(counts_by_len)
  all_counts = (np.concatenate([counts_by_len[n] for n in lens_present])
                if lens_present else np.zeros(0, np.int64))
  if all_counts.size > num_fgrams:
    threshold = np.partition(all_counts, all_counts.size - num_fgrams)[
        all_counts.size - num_fgrams]
  else:
    threshold = min_count
  del all_counts
  rows, counts = [], []
  for n in lens_present:
    cur = np.flatnonzero(counts_by_len[n] >= threshold)
    r = np.full((cur.size, max_len), -1, np.int32)
    counts.append(counts_by_len[n][cur])
    for level in range(n, 1, -1):
      r[:, level - 1] = vocab[last_by_len[level][cur]]
      cur = prefix_by_len[level][cur]
    r[:, 0] = vocab[cur]
    rows.append(r)
  rows = np.concatenate(rows) if rows else np.zeros((0, max_len), np.int32)
  counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
  result = select_top(rows, counts, max_len=max_len, num_fgrams=num_fgrams)
  log('f-grams: %d candidates with count >= %d, kept %d (%.1fs); total %.1fs, %.2fM tokens/s',
      len(rows), threshold, len(result), time.time() - t0, time.time() - t_start,
      num_tokens / max(time.time() - t_start, 1e-9) / 1e6)
  return result
