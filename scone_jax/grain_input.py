"""input_pipeline=grain: the token shards as a grain `RandomAccessDataSource`.

Records are this process's rows of the training stream in the order every input pipeline
reads them (`packing.Loader.rows_at`: a keyed permutation per epoch, each process its
contiguous slice of every global batch), so a grain batch at step s is, row for row, the
shards input's `Loader.batch_at(s)` (tests/test_grain_input.py). Grain adds its own
machinery on top: `MapDataset` random access by step, threaded read-ahead
(`grain.ReadOptions`) and a checkpointable iterator (`get_state` / `set_state`, saved
with the loader's state so a resumed run continues at the same record).
"""
import threading
from typing import Iterator

import grain
import numpy as np

from scone_jax import packing
from scone_jax import token_shards

# A training loader repeats forever; grain datasets have a length: this many steps.
_MAX_STEPS = 1 << 36


class ShardRowsSource:
  """grain RandomAccessDataSource: record k = row k % B of this process's slice of the
  global batch at step k // B (B = the local batch size), built from the token shards."""

  def __init__(self, shards: 'token_shards.TokenShards', order: 'packing.Loader'):
    self._shards = shards
    self._order = order
    self._local = order.local_batch_size
    self._lo = order.process_index * order.local_batch_size

  def __len__(self) -> int:
    return _MAX_STEPS * self._local

  def __getitem__(self, k: int) -> dict:
    step, j = divmod(int(k), self._local)
    row = self._order.rows_at([step * self._order.batch_size + self._lo + j])
    out = self._shards.rows(row, self._order.seq_len)
    return {key: v[0] for key, v in out.items()}

  def __repr__(self):
    return (f'ShardRowsSource({self._shards.directory}, process {self._order.process_index}/'
            f'{self._order.process_count})')


class GrainLoader:
  """The training loader over token shards, through grain; the `packing.Loader` interface
  (`batch_at`, `state`, `restore`, iteration) with grain's iterator state in `state()`."""

  def __init__(self, shards: 'token_shards.TokenShards', *, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, prefetch: int = 4, workers: int = 1):
    self._order = packing.Loader(shards, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                 shuffle=shuffle, process_index=process_index,
                                 process_count=process_count)
    self.split = shards
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.local_batch_size = self._order.local_batch_size
    self.num_rows = self._order.num_rows
    self.eval_mode = False
    self.source = ShardRowsSource(shards, self._order)
    self.dataset = grain.MapDataset.source(self.source).batch(self.local_batch_size)
    self._read_options = grain.ReadOptions(num_threads=max(1, workers),
                                           prefetch_buffer_size=max(1, prefetch))
    self._iter = None
    self._lock = threading.Lock()
    self._step = 0

  num_bytes = property(lambda self: self.split.num_bytes)
  num_tokens = property(lambda self: self.split.num_tokens)
  steps_per_epoch = property(lambda self: self.num_rows / self.batch_size)

  def batch_at(self, step: int) -> dict:
    """This process's slice of the global batch at step (grain random access)."""
    return {k: np.asarray(v, np.int32) for k, v in self.dataset[int(step)].items()}

  def state(self) -> dict:
    """{'step': batches handed out, 'grain': the grain iterator's state (when iterating)}."""
    with self._lock:
      out = {'step': int(self._step)}
      if self._iter is not None:
        out['grain'] = self._iter.get_state()
      return out

  def restore(self, state: dict):
    with self._lock:
      self._step = int(state['step'])
      self._iter = None
      if 'grain' in state:
        self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
        self._iter.set_state(state['grain'])
        if int(state['grain'].get('next_index', self._step)) != self._step:
          raise ValueError(f'loader state {state} is inconsistent: grain is at batch '
                           f'{state["grain"]} but the step is {self._step}.')

  def __iter__(self) -> Iterator[dict]:
    with self._lock:
      if self._iter is None:
        self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
        self._iter.set_state({'next_index': self._step})
      it = self._iter
    for batch in it:
      with self._lock:
        self._step += 1
      yield {k: np.asarray(v, np.int32) for k, v in batch.items()}
