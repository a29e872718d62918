"""seqio Tasks over documents with on-the-fly f-gram matching, and their packed batches.

Two kinds of Task, both ending in the f-gram matching preprocessor; `SconeFeatureConverter`
then packs the stream into rows by the rule in packing.py:
  * `register_document_task`: in-memory documents -> tokenize -> append EOS -> match.
    Same rows as `packing.Loader` over `packing.prepare_split` of those documents.
  * `register_shard_task`: a token-shard directory (token_shards.py; local or gs://), one
    example per document, EOS already there, in stream order -> match. Same rows as
    `packing.Loader` over `token_shards.TokenShards` of that directory.
tests/test_data.py checks both equalities.

seqio's offline cache tool runs on the shard Task: this module registers one on import when
SCONE_SEQIO_WORKDIR is set (see `register_from_env`):

  SCONE_SEQIO_WORKDIR=/path/to/run python -m seqio.scripts.cache_tasks_main \
      --module_import=scone_jax.seqio_tasks --tasks=scone_train_shards \
      --output_cache_dir=/path/to/seqio_cache

The cache holds the documents' tokens (the placeholder is before matching, so f-grams are
still matched on the fly); read it with `seqio_dataset(..., use_cached=True)` after
`seqio.add_global_cache_dirs`. The tool shuffles documents as it writes, so cached rows hold
the same documents packed in another order, not the rows of `TokenShards`.
TensorFlow and seqio are imported inside the functions: importing this module is cheap
(unless SCONE_SEQIO_WORKDIR is set).
"""
import functools
import hashlib
import logging
import os
from typing import Iterator, Optional

import numpy as np

from scone_jax import fgrams
from scone_jax import paths
from scone_jax import token_shards
from scone_jax.packing import PAD_VALUES
from scone_jax.packing import BATCH_KEYS
from scone_jax.packing import BOS_ID
from scone_jax.packing import documents_digest
from scone_jax.packing import limit_to_row
from scone_jax.packing import local_batch_size
from scone_jax.packing import padding_rows

@functools.lru_cache(maxsize=None)
def _converter_class():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  spec = seqio.FeatureConverter.FeatureSpec

  class SconeFeatureConverter(seqio.FeatureConverter):
    """Per-document targets + f-gram matches -> packed rows with the batch keys.

    Task feature lengths are all seq_len. Documents are longer than a row, so the input
    length check is off by default; rows get static shape [seq_len].
    """
    TASK_FEATURES = {'targets': spec(dtype=tf.int32), 'fgram_ids': spec(dtype=tf.int32),
                     'fgram_lengths': spec(dtype=tf.int32)}
    MODEL_FEATURES = {k: spec(dtype=tf.int32) for k in BATCH_KEYS}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, apply_length_check: bool = False, fgram_set=None, **kwargs):
      super().__init__(pack=True, apply_length_check=apply_length_check, **kwargs)
      self._fgram_set = fgram_set

    def _convert_features(self, ds, task_feature_lengths):
      seq_len = task_feature_lengths['targets']
      length = tf.constant(seq_len, tf.int64)

      # Segment ids and positions depend only on where a document starts in the stream,
      # so they are computed per document (a scan carries the start and the segment
      # number there) and rows are plain slices of the stream: no per-row work.
      def place(state, ex):
        start, segment = state
        end = start + tf.cast(tf.shape(ex['targets'])[0], tf.int64)
        same_row = end // length == start // length
        next_segment = tf.where(same_row, segment + 1,
                                tf.where(end % length == 0, 1, 2))
        return (end, next_segment), dict(ex, start=start, segment=segment)

      def pairs(ex):
        t = ex['targets']
        n = tf.shape(t)[0]
        j = tf.range(n, dtype=tf.int64)
        p = ex['start'] + j
        in_first_row = p // length == ex['start'] // length
        out = {
            'inputs': tf.concat([[BOS_ID], t[:-1]], 0),
            'targets': t,
            'segment_ids': tf.where(in_first_row, ex['segment'], 1),
            'positions': tf.cast(tf.where(in_first_row, j, p % length), tf.int32),
            'loss_mask': tf.ones([n], tf.int32),
            'fgram_ids': tf.concat([[-1], ex['fgram_ids'][:-1]], 0),
            'fgram_lengths': tf.concat([[1], ex['fgram_lengths'][:-1]], 0),
        }
        # The end-of-stream marker becomes the padding that completes the last row.
        num_pad = tf.cast((length - ex['start'] % length) % length, tf.int32)
        pad = {k: tf.fill([num_pad], PAD_VALUES[k]) for k in BATCH_KEYS}
        return {k: tf.cond(ex['end'], lambda k=k: pad[k], lambda k=k: out[k])
                for k in BATCH_KEYS}

      ds = ds.map(lambda ex: {'targets': ex['targets'], 'fgram_ids': ex['fgram_ids'],
                              'fgram_lengths': ex['fgram_lengths'], 'end': False})
      marker = tf.data.Dataset.from_tensors({
          'targets': tf.zeros([1], tf.int32), 'fgram_ids': tf.zeros([1], tf.int32),
          'fgram_lengths': tf.zeros([1], tf.int32), 'end': True})
      ds = ds.concatenate(marker)
      ds = ds.scan((tf.constant(0, tf.int64), tf.constant(1, tf.int32)), place)
      ds = ds.map(pairs, num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.rebatch(seq_len, drop_remainder=True)
      if self._fgram_set is None:
        return ds
      fgram_set = self._fgram_set

      def np_limit(inputs, positions, ids, lens):
        rows = {'inputs': inputs, 'positions': positions, 'fgram_ids': ids.copy(),
                'fgram_lengths': lens.copy()}
        limit_to_row(rows, fgram_set)
        return rows['fgram_ids'], rows['fgram_lengths']

      def limit(row):
        ids, lens = tf.numpy_function(
            np_limit, [row['inputs'], row['positions'], row['fgram_ids'],
                       row['fgram_lengths']], [tf.int32, tf.int32], stateful=False)
        ids.set_shape([seq_len])
        lens.set_shape([seq_len])
        return dict(row, fgram_ids=ids, fgram_lengths=lens)

      # Rule 4b, by the same function as the numpy Loader (rows are whole here).
      return ds.map(limit, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
      return {k: task_feature_lengths['targets'] for k in BATCH_KEYS}

  return SconeFeatureConverter


def feature_converter(**kwargs):
  """A SconeFeatureConverter (a seqio.FeatureConverter emitting BATCH_KEYS)."""
  return _converter_class()(**kwargs)


def task_fgram_set(task):
  """The FGramSet a task's matching preprocessor was registered with (None: no matching)."""
  for p in task.preprocessors:
    if getattr(p, 'func', None) is match_fgrams_preprocessor:
      return p.keywords.get('fgram_set')
  return None


def match_fgrams_preprocessor(dataset, fgram_set):
  """seqio preprocessor: adds fgram_ids / fgram_lengths for each document's targets."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if fgram_set is None:
    def no_match(ex):
      n = tf.shape(ex['targets'])
      return dict(ex, fgram_ids=tf.fill(n, -1), fgram_lengths=tf.ones(n, tf.int32))
    return dataset.map(no_match, num_parallel_calls=tf.data.AUTOTUNE)

  def np_match(tokens):
    ids, lengths = fgram_set.match(tokens)
    return np.asarray(ids, np.int32), np.asarray(lengths, np.int32)

  def match(ex):
    # One call per document: documents are long, so the call overhead is amortized.
    ids, lengths = tf.numpy_function(np_match, [ex['targets']], [tf.int32, tf.int32],
                                     stateful=False)
    ids.set_shape([None])
    lengths.set_shape([None])
    return dict(ex, fgram_ids=ids, fgram_lengths=lengths)

  return dataset.map(match, num_parallel_calls=tf.data.AUTOTUNE)


def register_document_task(name: str, docs, tokenizer, fgram_set=None, *,
                           split: str = 'train') -> str:
  """Registers (or replaces) a seqio Task over in-memory documents; returns its name.

  Preprocessors: tokenize -> append EOS -> match f-grams per document. Feed the task
  to `seqio_batches` (or SconeFeatureConverter) for packed batches.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not docs:
    raise ValueError(f'task {name!r}: no documents.')
  texts = [d.text for d in docs]
  ids = [d.id for d in docs]

  def dataset_fn(split, shuffle_files, seed=None):
    del split
    ds = tf.data.Dataset.from_tensor_slices({'targets': texts, 'doc_id': ids})
    if shuffle_files:
      ds = ds.shuffle(len(texts), seed=seed)
    return ds

  source = seqio.FunctionDataSource(dataset_fn, splits=[split],
                                    num_input_examples={split: len(docs)})
  vocab = tokenizer.seqio_vocabulary()
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      output_features={'targets': seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
      preprocessors=[
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.preprocessors.append_eos,
          functools.partial(match_fgrams_preprocessor, fgram_set=fgram_set),
      ])
  return name


def register_tasks(cfg, tokenizer, fgram_set=None, *, train_docs=None,
                   heldout_docs=None) -> tuple[str, str]:
  """Registers the configured corpus's train and held-out seqio Tasks; returns their names.

  Documents are those of corpus.load_documents (pass them to skip reloading). Names
  carry a hash of corpus, tokenizer and f-gram set, so runs with different settings
  do not collide in seqio's global registry.
  """
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  if train_docs is None:
    train_docs = corpus.load_documents(cfg.corpus, 'train')
  if heldout_docs is None:
    heldout_docs = corpus.load_documents(cfg.corpus, 'heldout')
  names = []
  for split, docs in (('train', train_docs), ('heldout', heldout_docs)):
    key = hashlib.sha256('|'.join([
        documents_digest(docs), tokenizer.fingerprint,
        fgram_set.fingerprint if fgram_set is not None else '']).encode()).hexdigest()[:12]
    names.append(register_document_task(f'scone_{cfg.corpus.name}_{split}_{key}', docs,
                                        tokenizer, fgram_set, split=split))
  return names[0], names[1]


def shard_document_chunks(shards: token_shards.TokenShards, shard: int,
                          chunk_tokens: int = 1 << 22) -> Iterator[tuple]:
  """One shard's documents, in order, as (tokens, ends) per read of ~chunk_tokens tokens.

  tokens (int32) holds whole documents, each ending in EOS; ends are their exclusive ends.
  A document cut by a chunk boundary is carried into the next chunk, so memory is bounded
  by chunk_tokens plus the longest document, not by the shard.
  """
  starts = np.concatenate([[0], np.cumsum(shards.index['shard_tokens'], dtype=np.int64)])
  lo, hi = int(starts[shard]), int(starts[shard + 1])
  carry = []  # reads since the last EOS: a document longer than a read is copied once
  for a in range(lo, hi, chunk_tokens):
    chunk = shards.read(a, min(a + chunk_tokens, hi))
    ends = np.flatnonzero(chunk == shards.eos_id) + 1
    if not ends.size:
      carry.append(chunk)
      continue
    head = sum(c.size for c in carry)
    yield np.concatenate(carry + [chunk[:ends[-1]]]), ends + head
    carry = [chunk[ends[-1]:]]
  if any(c.size for c in carry):
    raise ValueError(f'{shards.directory}: shard {shard} does not end with EOS '
                     f'(id {shards.eos_id}); the shards are damaged. Delete the directory to '
                     'prepare them again.')


def _shard_source(shards: token_shards.TokenShards, split: str, chunk_tokens: int):
  """A seqio FileDataSource over the shard files: {'targets': document tokens with EOS}.

  One shard at a time (cycle_length 1), in shard order, so an unshuffled read is the
  packed stream; seqio's cache tool reads one shard per worker. Files are read through
  TokenShards (paths.py, as training reads them), not tf.io.gfile.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_shards = shards.index['num_shards']
  files = [paths.join(shards.directory, token_shards.shard_name(s, num_shards))
           for s in range(num_shards)]
  shard_of = {f: s for s, f in enumerate(files)}
  spec = (tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int64))

  def read(file):
    chunks = tf.data.Dataset.from_generator(
        lambda f: shard_document_chunks(shards, shard_of[f.decode()], chunk_tokens),
        args=(file,), output_signature=spec)
    return chunks.flat_map(lambda tokens, ends: tf.data.Dataset.from_tensor_slices(
        {'targets': tf.RaggedTensor.from_row_limits(tokens, ends)}))

  return seqio.FileDataSource(read, {split: files},
                              num_input_examples={split: shards.num_docs},
                              cycle_length=1, block_length=1)


def register_shard_task(name: str, shards_dir: str, fgram_set, tokenizer, *,
                        split: str = 'train', chunk_tokens: int = 1 << 22) -> str:
  """Registers (or replaces) a seqio Task over a token-shard directory; returns its name.

  fgram_set: an FGramSet, the path of one (FGramSet.save), or None (no matching).
  tokenizer: the corpus.Tokenizer the shards were made with (checked against their index);
  it gives the Task's vocabulary. Examples are documents with their EOS, in stream order
  unshuffled, so the Task has no tokenize or append_eos step (the feature's add_eos is
  False and nothing adds a second EOS). Preprocessors: cache placeholder -> match f-grams.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if isinstance(fgram_set, (str, os.PathLike)):
    fgram_set = fgrams.FGramSet.load(fgram_set)
  shards = token_shards.TokenShards(shards_dir)
  token_shards.check_tokenizer(shards.index, tokenizer, shards_dir)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=_shard_source(shards, split, chunk_tokens),
      output_features={'targets': seqio.Feature(tokenizer.seqio_vocabulary(), add_eos=False,
                                                dtype=tf.int32)},
      preprocessors=[
          # Before matching: a cache of this Task holds tokens, f-grams stay on the fly.
          seqio.CacheDatasetPlaceholder(),
          functools.partial(match_fgrams_preprocessor, fgram_set=fgram_set),
      ])
  return name


def shard_task_name(shards_dir: str, fgram_set=None) -> str:
  """A shard Task's name that changes with what its rows depend on (the registry is global)."""
  index = token_shards.read_index(shards_dir)
  if index is None:
    raise FileNotFoundError(f'{shards_dir}: no prepared token shards (no {token_shards.INDEX}).')
  key = hashlib.sha256('|'.join([
      shards_dir, index['docs'], str(index['num_tokens']), index['tokenizer'],
      fgram_set.fingerprint if fgram_set is not None else '']).encode()).hexdigest()
  return f'scone_train_shards_{key[:12]}'


ENV_WORKDIR = 'SCONE_SEQIO_WORKDIR'
ENV_SHARDS = 'SCONE_SEQIO_SHARDS'
ENV_TASK = 'SCONE_SEQIO_TASK'
DEFAULT_SHARD_TASK = 'scone_train_shards'


def register_from_env(environ=None) -> Optional[str]:
  """Registers a run's shard Task from the environment (for seqio's tools); its name or None.

  SCONE_SEQIO_WORKDIR: a run's workdir: its tokenizer.model, fgrams.npz (absent: no
    matching) and data/train-shards; unset: nothing is registered.
  SCONE_SEQIO_SHARDS: shards prepared elsewhere (as config.data.train_shards).
  SCONE_SEQIO_TASK: the Task's name (default scone_train_shards).
  """
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  workdir = environ.get(ENV_WORKDIR, '')
  if not workdir:
    return None
  shards_dir = environ.get(ENV_SHARDS) or paths.join(workdir, artifacts.DATA_DIR,
                                                     artifacts.TRAIN_SHARDS_DIR)
  fgrams_path = paths.join(workdir, artifacts.FGRAMS_FILE)
  return register_shard_task(
      environ.get(ENV_TASK) or DEFAULT_SHARD_TASK, shards_dir,
      fgrams_path if paths.isfile(fgrams_path) else None,
      corpus.Tokenizer(paths.join(workdir, artifacts.TOKENIZER_FILE)))


def seqio_dataset(task_name: str, *, seq_len: int, split: Optional[str] = None,
                  use_cached: bool = False):
  """The task's packed rows (one tf.data element per row, keys BATCH_KEYS), one pass.

  use_cached: read the task's offline cache (seqio's cache tool) instead of its source.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  split = split or list(task.splits)[0]
  # Documents must not be trimmed to seq_len: rows are cut from the whole stream.
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                        trim_output_features=False, use_cached=use_cached)
  converter = feature_converter(fgram_set=task_fgram_set(task))
  return converter(ds, {k: seq_len for k in ('targets', 'fgram_ids', 'fgram_lengths')})


def seqio_batches(task_name: str, *, seq_len: int, batch_size: int,
                  split: Optional[str] = None, shuffle: bool = False, seed: int = 0,
                  eval_mode: bool = False, num_epochs: Optional[int] = None,
                  shuffle_buffer_rows: int = 16384, cache=False, process_index: int = 0,
                  process_count: int = 1, use_cached: bool = False) -> Iterator[dict]:
  """numpy batches from a seqio task, sliced for this process like `Loader.batch_at`.

  With shuffle off these equal Loader's batches (train mode: rows repeat across epochs;
  eval mode: one pass, last batch padded). shuffle=True shuffles rows with a tf.data
  buffer: deterministic per seed, but not the Loader's permutation.
  cache: True keeps the packed rows in memory after the first epoch (~28 bytes per
  token), a path caches them in files there; later epochs then skip tokenization, which
  is what limits this pipeline (matching costs far less, see experiments/bench_seqio.py).
  use_cached: read the task's offline cache (see the module docstring).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  local = local_batch_size(batch_size, process_index, process_count)
  lo = process_index * local
  ds = seqio_dataset(task_name, seq_len=seq_len, split=split, use_cached=use_cached)
  if cache:
    ds = ds.cache('' if cache is True else str(cache))
  if eval_mode:
    ds = ds.batch(batch_size)
  else:
    if shuffle:
      ds = ds.shuffle(shuffle_buffer_rows, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  for batch in ds.as_numpy_iterator():
    rows = batch['inputs'].shape[0]
    if rows < batch_size:
      pad = padding_rows(batch_size - rows, seq_len)
      batch = {k: np.concatenate([batch[k], pad[k]]) for k in BATCH_KEYS}
    yield {k: batch[k][lo:lo + local] for k in BATCH_KEYS}


class SeqioLoader:
  """Training batches straight from a seqio task, with the Loader's step interface.

  The row stream is seqio's packed rows, shuffled by a tf.data buffer seeded by `seed`
  and repeated; batch `step` is rows [step * batch_size, (step + 1) * batch_size) of it,
  so a resumed run (`batch_at(s)` on a fresh loader skips s batches of rows) reads
  exactly what an uninterrupted one would. Each process takes its slice of each global
  batch. Held-out evaluation uses `Loader` (the same rows, tested in test_data.py).
  """

  def __init__(self, task_name: str, *, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True, shuffle_buffer_rows: int = 16384,
               process_index: int = 0, process_count: int = 1):
    self.local_batch_size = local_batch_size(batch_size, process_index, process_count)
    self.task_name = task_name
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.shuffle_buffer_rows = shuffle_buffer_rows
    self.process_index = process_index
    self._iter = None
    self._next = None
    self._step = 0

  def _open(self, step: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ds = seqio_dataset(self.task_name, seq_len=self.seq_len)
    if self.shuffle:
      ds = ds.shuffle(self.shuffle_buffer_rows, seed=self.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().skip(step * self.batch_size).batch(self.batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def batch_at(self, step: int) -> dict:
    """This process's slice of the global batch at step (sequential reads are streamed)."""
    if self._iter is None or step != self._next:
      if self._iter is not None:
        logging.info('seqio loader: repositioning from batch %d to %d', self._next, step)
      self._iter = self._open(step)
    batch = next(self._iter)
    self._next = step + 1
    lo = self.process_index * self.local_batch_size
    return {k: np.asarray(batch[k][lo:lo + self.local_batch_size]) for k in BATCH_KEYS}

  def state(self) -> dict:
    return {'step': int(self._step)}

  def restore(self, state: dict):
    self._step = int(state['step'])


# seqio's tools (cache_tasks_main --module_import=scone_jax.seqio_tasks) find the Task here.
if os.environ.get(ENV_WORKDIR):
  register_from_env()
