"""The numpy training `Loader`: batches of a prepared split by step, shuffled per epoch,
multi-host sliced, built ahead in background threads (`ahead`).

Split from `packing.py` (which makes the rows and is all a serving process needs to pack
text the way training does), so serving loads no training input code; `packing.Loader`,
`packing.ahead`, `packing.permute` and `packing.local_batch_size` still name these.
Upstream of nothing in scone_jax: a split is anything with num_tokens, num_bytes and
rows(row_ids, seq_len) (`packing.PreparedSplit`, `token_shards.TokenShards`).
"""
import collections
import concurrent.futures
import itertools
import threading
from typing import Iterator

import numpy as np

_FEISTEL_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a well-mixed 64-bit function of x (uint64, wrapping)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(idx: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """A pseudo-random permutation of [0, n) applied to idx, in O(len(idx)) memory.

  A balanced Feistel network over the smallest even-bit domain 2^(2h) >= n, one round per
  key, is a bijection there; cycle-walking (re-applying it until the value falls below n)
  restricts it to a bijection of [0, n). Nothing of size n is ever built, so a loader's
  memory does not grow with the corpus (a stored permutation costs 8 bytes per row).
  """
  idx = np.asarray(idx, np.int64)
  if n <= 1:
    return np.zeros_like(idx)
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  low = np.uint64((1 << half) - 1)
  shift = np.uint64(half)

  def once(x):
    left, right = x >> shift, x & low
    for k in keys:
      left, right = right, left ^ (_mix(right ^ k) & low)
    return (left << shift) | right

  with np.errstate(over='ignore'):
    out = once(idx.astype(np.uint64))
    todo = out >= np.uint64(n)
    while todo.any():
      out[todo] = once(out[todo])
      todo = out >= np.uint64(n)
  return out.astype(np.int64)


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """Rows of each global batch one process loads; ValueError when they do not split evenly."""
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} does not split over {process_count} '
                     'processes; use a multiple of the process count.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return batch_size // process_count


class Loader:
  """Batches of a split: deterministic, random access by step, multi-host sliced.

  split: a PreparedSplit (in memory) or `token_shards.TokenShards` (prepared files, read
  by row, matched on the fly): anything with num_tokens, num_bytes and rows(row_ids, L).
  Train mode repeats forever, shuffling rows with a fresh permutation per epoch when
  shuffle is set (`permute`, keyed by a numpy Generator seeded by (seed, epoch); computed
  per row, never stored, so memory does not grow with the number of rows). Eval mode makes one
  in-order pass whose last batch is padded with rows of loss_mask 0; `num_bytes` and
  `num_tokens` (prediction targets) of the whole split give bits per byte.
  Each process gets its contiguous slice of each global batch's rows, and reads only those.
  prefetch > 0: iteration builds that many batches ahead in `workers` background threads
  (reading, matching and packing release the GIL), in step order, so building overlaps the
  device step; `state()` counts the batches handed out, not those built ahead.
  """

  def __init__(self, split, *, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True, eval_mode: bool = False, process_index: int = 0,
               process_count: int = 1, prefetch: int = 0, workers: int = 1):
    self.local_batch_size = local_batch_size(batch_size, process_index, process_count)
    if eval_mode and shuffle:
      raise ValueError('eval mode reads the split once in order; pass shuffle=False.')
    if prefetch < 0 or workers < 1:
      raise ValueError(f'prefetch={prefetch} must be >= 0 and workers={workers} >= 1.')
    self.prefetch = int(prefetch)
    self.workers = int(workers)
    self.split = split
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.eval_mode = eval_mode
    self.process_index = process_index
    self.process_count = process_count
    self.num_rows = -(-split.num_tokens // seq_len)   # packing.num_rows
    self._epoch_keys = {}
    self._keys_lock = threading.Lock()
    self._step = 0

  @property
  def num_bytes(self) -> int:
    return self.split.num_bytes

  @property
  def num_tokens(self) -> int:
    return self.split.num_tokens

  @property
  def num_batches(self) -> int:
    """Batches in one pass over the split (the last one padded)."""
    return -(-self.num_rows // self.batch_size)

  @property
  def steps_per_epoch(self) -> float:
    return self.num_rows / self.batch_size

  def __len__(self):
    if not self.eval_mode:
      raise TypeError('a training Loader repeats forever; use steps_per_epoch.')
    return self.num_batches

  def _keys(self, epoch: int) -> np.ndarray:
    with self._keys_lock:   # input threads (prefetch, grain) ask at once
      if epoch not in self._epoch_keys:
        if len(self._epoch_keys) >= 4:
          self._epoch_keys.pop(min(self._epoch_keys))
        rng = np.random.default_rng([self.seed, epoch])
        self._epoch_keys[epoch] = rng.integers(0, 1 << 63, _FEISTEL_ROUNDS, dtype=np.uint64)
      return self._epoch_keys[epoch]

  def global_rows(self, step: int) -> np.ndarray:
    """Row ids of the whole global batch at step (-1 = padding row)."""
    return self.rows_at(step * self.batch_size + np.arange(self.batch_size, dtype=np.int64))

  def rows_at(self, g: np.ndarray) -> np.ndarray:
    """Row ids at global stream slots g (slot step * batch_size + j is row j of the global
    batch at step): the order every input pipeline reads the rows in."""
    g = np.asarray(g, np.int64)
    if self.eval_mode:
      return np.where(g < self.num_rows, g, -1)
    epoch, idx = np.divmod(g, self.num_rows)
    if not self.shuffle:
      return idx
    rows = np.empty_like(idx)
    for e in np.unique(epoch):
      sel = epoch == e
      rows[sel] = permute(idx[sel], self.num_rows, self._keys(int(e)))
    return rows

  def batch_at(self, step: int) -> dict:
    """This process's slice of the global batch at step."""
    if self.eval_mode and not 0 <= step < self.num_batches:
      raise IndexError(f'eval batch {step} out of range [0, {self.num_batches}).')
    rows = self.global_rows(step)
    lo = self.process_index * self.local_batch_size
    return self.split.rows(rows[lo:lo + self.local_batch_size], self.seq_len)

  def state(self) -> dict:
    return {'step': int(self._step)}

  def restore(self, state: dict):
    self._step = int(state['step'])

  def __iter__(self) -> Iterator[dict]:
    if self.eval_mode:
      # Every iteration is a fresh full pass; the loader's step is left alone.
      return self._ahead(range(self.num_batches))
    return self._train_iter()

  def _train_iter(self):
    first = self._step
    for step, batch in zip(itertools.count(first), self._ahead(itertools.count(first))):
      self._step = step + 1
      yield batch

  def _ahead(self, steps) -> Iterator[dict]:
    return ahead(self.batch_at, steps, prefetch=self.prefetch, workers=self.workers)


def ahead(fn, items, *, prefetch: int, workers: int = 1) -> Iterator:
  """fn(item) for each item, in order, with up to `prefetch` calls running ahead in
  `workers` background threads (prefetch 0: in the caller's thread, when asked).

  Bounded: at most `prefetch` results wait. Closing the iterator cancels what has not
  started and waits for what has.
  """
  if not prefetch:
    yield from (fn(x) for x in items)
    return
  items = iter(items)
  pending = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='scone-input') as pool:
    try:
      for x in itertools.islice(items, prefetch):
        pending.append(pool.submit(fn, x))
      while pending:
        result = pending.popleft().result()
        for x in itertools.islice(items, 1):
          pending.append(pool.submit(fn, x))
        yield result
    finally:
      for f in pending:
        f.cancel()
