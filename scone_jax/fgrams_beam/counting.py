"""Counting: the K-1 pass algorithm as transforms over token documents (int32 LE bytes).

Pass 1 counts tokens; pass n counts, per document, the n-grams whose (n-1)-prefix and
(n-1)-suffix pass filter_{n-1} (a side input), sums them per key shard and keeps
count >= min_count. Each frequent batch of passes 2..K is written as one .npz holding its
own top `num_fgrams` (`write_frequent`), which the launcher reads back (`read_frequent`).
"""
import io

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from scone_jax import fgrams
from scone_jax.fgrams_beam._common import METRICS_NAMESPACE
from scone_jax.fgrams_beam._common import read_file
from scone_jax.fgrams_beam._common import write_file
from scone_jax.fgrams_beam.filters import BuildFilterFn
from scone_jax.fgrams_beam.filters import hash_rows
from scone_jax.fgrams_beam.filters import key_rows

FREQUENT_GLOB = 'frequent-*.npz'


def write_frequent(frequent: dict, out_dir: str, max_len: int, num_fgrams: int) -> None:
  """Each frequent batch of passes 2..K -> one .npz of its top num_fgrams in out_dir."""
  for n in range(2, max_len + 1):
    _ = frequent[n] | f'Write{n}' >> beam.ParDo(_WriteShardFn(n, out_dir, max_len, num_fgrams))


def read_frequent(shard_dir: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates the `frequent-*.npz` shards of a run: (ngrams_MxK int32, counts_M)."""
  paths = sorted(m.path for m in
                 FileSystems.match([FileSystems.join(shard_dir, FREQUENT_GLOB)])[0].metadata_list)
  rows, counts = [np.zeros((0, max_len), np.int32)], [np.zeros(0, np.int64)]
  for path in paths:
    with np.load(io.BytesIO(read_file(path))) as z:
      rows.append(z['ngrams'])
      counts.append(z['counts'])
  return np.concatenate(rows), np.concatenate(counts)


def candidate_rows(tokens_L: np.ndarray, n: int, prev_filter=None) -> np.ndarray:
  """The n-grams of one document whose (n-1)-prefix and (n-1)-suffix pass `prev_filter`
  (all n-grams when n == 1), one row per occurrence: int32 [M, n]."""
  if tokens_L.size < n:
    return np.zeros((0, n), np.int32)
  win_MxN = sliding_window_view(tokens_L, n)
  if n > 1:
    ok_P = prev_filter.contains(hash_rows(sliding_window_view(tokens_L, n - 1)))
    win_MxN = win_MxN[ok_P[:-1] & ok_P[1:]]
  return win_MxN


def _unique_counts(keys_M: np.ndarray, counts_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sums the counts of equal keys; returns (unique keys, their total counts)."""
  uniq_U, inverse_M = np.unique(keys_M, return_inverse=True)
  # float64 weights are exact for any count below 2**53.
  return uniq_U, np.bincount(inverse_M.ravel(), weights=counts_M,
                             minlength=uniq_U.size).astype(np.int64)


def _split_by_shard(keys_M: np.ndarray, counts_M: np.ndarray, n: int, num_shards: int):
  """Yields (shard, (keys, counts)) with shard = hash(n-gram) % num_shards."""
  if not keys_M.size:
    return
  shard_M = hash_rows(key_rows(keys_M, n)) % np.uint64(num_shards)
  order_M = np.argsort(shard_M, kind='stable')
  shard_M, keys_M, counts_M = shard_M[order_M], keys_M[order_M], counts_M[order_M]
  starts = np.flatnonzero(np.r_[True, shard_M[1:] != shard_M[:-1]])
  ends = np.r_[starts[1:], shard_M.size]
  for a, b in zip(starts, ends):
    yield int(shard_M[a]), (keys_M[a:b], counts_M[a:b])


class _CountCandidatesFn(beam.DoFn):
  """One pass: the bundle's candidate n-grams counted in numpy, emitted in key shards.

  Elements are (shard, (keys, counts)) batches, not one per n-gram: Python Beam spends
  microseconds per element, more than counting an n-gram costs.
  """

  def __init__(self, n: int, num_key_shards: int, max_buffered_rows: int):
    self._n = n
    self._num_key_shards = num_key_shards
    self._max_buffered_rows = max_buffered_rows
    self._rows = None
    self._num_rows = 0
    self._occurrences = Metrics.counter(METRICS_NAMESPACE, f'pass{n}_candidate_occurrences')

  def start_bundle(self):
    self._rows, self._num_rows = [], 0

  def _flush(self):
    if not self._num_rows:
      return
    rows_MxN = np.concatenate(self._rows).astype('<i4', copy=False)
    self._rows, self._num_rows = [], 0
    keys_M = np.ascontiguousarray(rows_MxN).view(f'V{4 * self._n}').ravel()
    keys_U, counts_U = np.unique(keys_M, return_counts=True)
    yield from _split_by_shard(keys_U, counts_U.astype(np.int64), self._n,
                               self._num_key_shards)

  def process(self, doc: bytes, prev_filter=None):
    rows_MxN = candidate_rows(np.frombuffer(doc, dtype='<i4'), self._n, prev_filter)
    if rows_MxN.shape[0]:
      self._occurrences.inc(rows_MxN.shape[0])
      self._rows.append(rows_MxN)
      self._num_rows += rows_MxN.shape[0]
      if self._num_rows >= self._max_buffered_rows:
        yield from self._flush()

  def finish_bundle(self):
    for kv in self._flush():
      yield beam.transforms.window.GlobalWindows.windowed_value(kv)


class _SumCountsFn(beam.CombineFn):
  """Per key shard: sums the (keys, counts) batches into one (unique keys, counts)."""

  def __init__(self, n: int, max_pending_rows: int):
    self._n = n
    self._max_pending_rows = max_pending_rows

  # Accumulator: [list of (keys, counts) batches, rows in them, rows after last compact].
  def create_accumulator(self):
    return [[], 0, 0]

  def compact(self, acc):
    if len(acc[0]) > 1:
      keys_M = np.concatenate([k for k, _ in acc[0]])
      counts_M = np.concatenate([c for _, c in acc[0]])
      acc[0] = [_unique_counts(keys_M, counts_M)]
      acc[1] = acc[2] = acc[0][0][0].size
    return acc

  def add_input(self, acc, keys_and_counts):
    acc[0].append(keys_and_counts)
    acc[1] += keys_and_counts[0].size
    # Compact when the new rows outnumber both the limit and the compacted rows, so the
    # total sorting work stays O(rows log rows) however many batches arrive.
    if acc[1] - acc[2] >= max(self._max_pending_rows, acc[2]):
      self.compact(acc)
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for acc in accs:
      out[0].extend(acc[0])
      out[1] += acc[1]
    return self.compact(out)

  def extract_output(self, acc):
    acc = self.compact(acc)
    if not acc[0]:
      return np.zeros(0, f'V{4 * self._n}'), np.zeros(0, np.int64)
    return acc[0][0]


class _KeepFrequentFn(beam.DoFn):
  """(shard, (keys, counts)) -> the same with only count >= min_count (dropped if none)."""

  def __init__(self, n: int, min_count: int):
    self._min_count = min_count
    self._frequent = Metrics.counter(METRICS_NAMESPACE, f'pass{n}_frequent')

  def process(self, shard_and_batch):
    shard, (keys_M, counts_M) = shard_and_batch
    keep_M = counts_M >= self._min_count
    if keep_M.any():
      self._frequent.inc(int(keep_M.sum()))
      yield shard, (keys_M[keep_M], counts_M[keep_M])


class _WriteShardFn(beam.DoFn):
  """(shard, (keys, counts)) of length n -> one .npz of the shard's top `keep` f-grams."""

  def __init__(self, n: int, out_dir: str, max_len: int, keep: int):
    self._n = n
    self._out_dir = out_dir
    self._max_len = max_len
    self._keep = keep

  def process(self, shard_and_batch):
    shard, (keys_M, counts_M) = shard_and_batch
    ngrams_MxK = np.full((keys_M.size, self._max_len), -1, np.int32)
    ngrams_MxK[:, :self._n] = key_rows(keys_M, self._n)
    order_M = fgrams.rank_order(ngrams_MxK, counts_M)[:self._keep]
    buf = io.BytesIO()
    np.savez(buf, ngrams=ngrams_MxK[order_M], counts=counts_M[order_M])
    # A deterministic name: a retried bundle overwrites the file with the same rows.
    path = FileSystems.join(self._out_dir, f'frequent-n{self._n}-{shard:05d}.npz')
    write_file(path, buf.getvalue())
    yield path


class CountFrequentNGrams(beam.PTransform):
  """Documents (int32 LE bytes) -> {n: PCollection of (shard, (keys, counts))}, n = 1..K.

  keys are void-dtype arrays of n int32 LE tokens, counts int64, all >= min_count; every
  frequent n-gram appears in exactly one element.
  """

  def __init__(self, *, max_len: int, min_count: int, prune_filter: str = 'hashes',
               bloom_bits_log2: int = 30, bloom_num_hashes: int = 4,
               num_key_shards: int = 256, max_buffered_rows: int = 1 << 22):
    super().__init__()
    self._max_len = max_len
    self._min_count = min_count
    self._prune_filter = prune_filter
    self._bloom_bits_log2 = bloom_bits_log2
    self._bloom_num_hashes = bloom_num_hashes
    self._num_key_shards = num_key_shards
    self._max_buffered_rows = max_buffered_rows

  def expand(self, docs):
    frequent = {}
    prev_filter = None
    for n in range(1, self._max_len + 1):
      count_fn = _CountCandidatesFn(n, self._num_key_shards, self._max_buffered_rows)
      side = {} if n == 1 else {'prev_filter': beam.pvalue.AsSingleton(prev_filter)}
      frequent[n] = (docs
                     | f'Pass{n}Candidates' >> beam.ParDo(count_fn, **side)
                     | f'Pass{n}Sum' >> beam.CombinePerKey(
                         _SumCountsFn(n, self._max_buffered_rows))
                     | f'Pass{n}MinCount' >> beam.ParDo(_KeepFrequentFn(n, self._min_count)))
      if n < self._max_len:
        prev_filter = (frequent[n]
                       | f'Pass{n}Batches' >> beam.Values()
                       | f'Pass{n}Filter' >> beam.CombineGlobally(BuildFilterFn(
                           n, self._prune_filter, self._bloom_bits_log2,
                           self._bloom_num_hashes)))
    return frequent
