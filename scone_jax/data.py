"""Input pipelines: documents -> tokenized, f-gram-matched, packed batches.

Two paths give identical batches (tests/test_data.py checks it):
  * `Loader` (numpy, no TensorFlow): the training default and what serving hosts use;
    random access by step, so resuming a run replays exactly the batches it would have seen.
  * seqio Tasks (`register_tasks`, `seqio_batches`): tokenize -> append EOS -> match ->
    `SconeFeatureConverter`, for users whose input stack is seqio/tf.data.

Packing rule (both paths):
  1. Each document is tokenized and EOS is appended: x_0 .. x_{n-1} (x_{n-1} = EOS).
  2. F-grams are matched per document, before packing, so no match crosses a document
     boundary; m_j is the longest f-gram ending at x_j.
  3. The document becomes n (input, target) pairs: inputs = [BOS, x_0 .. x_{n-2}],
     targets = [x_0 .. x_{n-1}], fgram_ids = [-1, m_0 .. m_{n-2}] (the f-gram ending at
     each input token). BOS is id 0 (the pad id), as in seqio's decoder feature converter.
     Every token of every document, EOS included, is a target exactly once, and no
     target is predicted across documents.
  4. The pairs of all documents, in order, form one stream cut into rows of seq_len;
     the last row is padded. A long document continues into the next row.
  4b. Same visible context as the baseline: the f-gram used at a position may only hold
     input tokens the main model attends to there (its segment within the row). Near
     the start of a row that continues a document, a longer match is replaced by the
     longest f-gram ending there within the row (`limit_to_row`), or by none.
  5. Per row: segment_ids number the documents in the row from 1 (0 = padding),
     positions restart at 0 at each segment start (also at the start of a row that
     continues a document), loss_mask = segment_ids > 0. Padding: inputs/targets 0,
     fgram_ids -1, fgram_lengths 1.
Training visits rows in a fresh seeded permutation each epoch; the row stream runs on
across epochs (global row g = step * batch_size + j, epoch g // num_rows). Multi-host:
process p takes rows [p * B/P, (p+1) * B/P) of each global batch.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Iterator, Optional

import numpy as np

BOS_ID = 0
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask', 'fgram_ids',
              'fgram_lengths')
_PAD_VALUES = {'inputs': 0, 'targets': 0, 'segment_ids': 0, 'positions': 0, 'loss_mask': 0,
               'fgram_ids': -1, 'fgram_lengths': 1}
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- prepared splits


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
  """A split tokenized (EOS after each document) and matched, as flat arrays."""
  tokens: np.ndarray         # int32 [T]: each document's tokens followed by EOS
  offsets: np.ndarray        # int64 [N+1]: document d is tokens[offsets[d]:offsets[d+1]]
  fgram_ids: np.ndarray      # int32 [T]: longest f-gram ending at each token, -1 if none
  fgram_lengths: np.ndarray  # int32 [T]: its length, 1 if none
  num_bytes: int             # UTF-8 bytes of the documents' text
  tokenizer_fingerprint: str
  fgram_fingerprint: str     # '' without f-grams
  # The set the split was matched with: rows re-match their first positions against it.
  fgram_set: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def num_docs(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    """Tokens including one EOS per document: the number of prediction targets."""
    return int(self.tokens.shape[0])

  def document(self, i: int, with_eos: bool = False) -> np.ndarray:
    end = self.offsets[i + 1] - (0 if with_eos else 1)
    return self.tokens[self.offsets[i]:end]


def documents_digest(docs) -> str:
  """sha256 over the documents' ids and texts (keys the prepared-split cache)."""
  h = hashlib.sha256()
  for d in docs:
    h.update(d.id.encode('utf-8'))
    h.update(b'\0')
    h.update(d.text.encode('utf-8'))
    h.update(b'\0')
  return h.hexdigest()


def _save_npz(path: str, **arrays):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A per-process temporary name, then an atomic rename: several hosts may write at once.
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _load_npz(path: str, meta: dict) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path) as z:
      if json.loads(str(z['meta'])) != meta:
        return None
      return {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('ignoring unreadable cache %s (%s)', path, e)
    return None


def _tokenize(docs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  ids = tokenizer.encode_batch([d.text for d in docs])
  lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
  offsets = np.zeros(len(docs) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  tokens = np.empty(int(offsets[-1]), dtype=np.int32)
  eos = np.int32(tokenizer.eos_id)
  for d, x in enumerate(ids):
    tokens[offsets[d]:offsets[d + 1] - 1] = x
    tokens[offsets[d + 1] - 1] = eos
  return tokens, offsets


def match_split(tokens: np.ndarray, offsets: np.ndarray,
                fgram_set) -> tuple[np.ndarray, np.ndarray]:
  """(fgram_ids, fgram_lengths) per token, matched within each document; -1/1 without a set."""
  if fgram_set is None:
    return np.full(tokens.shape, -1, np.int32), np.ones(tokens.shape, np.int32)
  ids, lengths = fgram_set.match_flat(tokens, offsets)
  return np.asarray(ids, np.int32), np.asarray(lengths, np.int32)


def prepare_split(docs, tokenizer, fgram_set=None, *, cache_dir: Optional[str] = None,
                  name: str = 'split') -> PreparedSplit:
  """Tokenizes and matches documents once; cached in cache_dir as .npz when given.

  The cache is keyed by the documents, the tokenizer fingerprint and the f-gram set
  fingerprint: tokens are reused when only the f-gram set changes, and everything is
  recomputed when the tokenizer or the documents change.
  """
  if not docs:
    raise ValueError(f'split {name!r} has no documents.')
  fgram_fp = fgram_set.fingerprint if fgram_set is not None else ''
  digest = documents_digest(docs)
  tok_meta = {'version': _CACHE_VERSION, 'docs': digest, 'tokenizer': tokenizer.fingerprint}
  full_meta = dict(tok_meta, fgrams=fgram_fp)
  tok_key = hashlib.sha256(json.dumps(tok_meta, sort_keys=True).encode()).hexdigest()[:16]
  full_key = hashlib.sha256(json.dumps(full_meta, sort_keys=True).encode()).hexdigest()[:16]
  tok_path = full_path = None
  if cache_dir:
    tok_path = os.path.join(cache_dir, f'{name}-tokens-{tok_key}.npz')
    full_path = os.path.join(cache_dir, f'{name}-matched-{full_key}.npz')
    cached = _load_npz(full_path, full_meta)
    if cached is not None:
      logging.info('%s: %d documents, %d tokens from cache %s', name, len(docs),
                   len(cached['tokens']), full_path)
      return PreparedSplit(cached['tokens'], cached['offsets'], cached['fgram_ids'],
                           cached['fgram_lengths'], int(cached['num_bytes']),
                           tokenizer.fingerprint, fgram_fp, fgram_set)
  cached = _load_npz(tok_path, tok_meta) if tok_path else None
  if cached is not None:
    tokens, offsets, num_bytes = cached['tokens'], cached['offsets'], int(cached['num_bytes'])
  else:
    t0 = time.time()
    tokens, offsets = _tokenize(docs, tokenizer)
    num_bytes = sum(len(d.text.encode('utf-8')) for d in docs)
    seconds = time.time() - t0
    logging.info('%s: tokenized %d documents, %d tokens (%.1fs, %.0f tokens/s)', name,
                 len(docs), len(tokens), seconds, len(tokens) / max(seconds, 1e-9))
    if tok_path:
      _save_npz(tok_path, tokens=tokens, offsets=offsets, num_bytes=np.int64(num_bytes),
                meta=np.array(json.dumps(tok_meta)))
  t0 = time.time()
  fgram_ids, fgram_lengths = match_split(tokens, offsets, fgram_set)
  if fgram_set is not None:
    seconds = time.time() - t0
    logging.info('%s: matched %d tokens against %d f-grams (%.2fs, %.0f tokens/s); %.1f%% '
                 'matched', name, len(tokens), len(fgram_set), seconds,
                 len(tokens) / max(seconds, 1e-9), 100.0 * np.mean(fgram_ids >= 0))
  if full_path:
    _save_npz(full_path, tokens=tokens, offsets=offsets, fgram_ids=fgram_ids,
              fgram_lengths=fgram_lengths, num_bytes=np.int64(num_bytes),
              meta=np.array(json.dumps(full_meta)))
  return PreparedSplit(tokens, offsets, fgram_ids, fgram_lengths, num_bytes,
                       tokenizer.fingerprint, fgram_fp, fgram_set)


# ----------------------------------------------------------------------------- numpy rows


def num_rows(split: PreparedSplit, seq_len: int) -> int:
  return -(-split.num_tokens // seq_len)


def limit_to_row(rows: dict, fgram_set) -> dict:
  """Rule 4b: caps each position's f-gram to the input tokens visible there, in place.

  rows: int32 arrays [..., L] with inputs, positions, fgram_ids, fgram_lengths. At a
  position p of a segment (positions restart at each segment and at the row start) the
  main model sees the segment's inputs at columns p - positions .. p, so a match longer
  than positions + 1 is replaced by the longest f-gram within those columns. Only the
  first max_len - 2 columns of a row that continues a document can change.
  """
  lens = rows['fgram_lengths']
  over = lens > rows['positions'] + 1
  if fgram_set is None or not over.any():
    if over.any():
      raise ValueError('rows hold f-gram matches but no f-gram set was given to cap them to '
                       'the row; prepare the split with its FGramSet.')
    return rows
  inputs = rows['inputs'].reshape(-1, lens.shape[-1])
  flat = np.flatnonzero(over.reshape(-1))
  r, c = np.divmod(flat, lens.shape[-1])
  k = fgram_set.max_len
  cols_NxK = c[:, None] + np.arange(1 - k, 1)
  ctx_NxK = np.where(cols_NxK >= 0, inputs[r[:, None], np.maximum(cols_NxK, 0)], 0)
  visible_N = rows['positions'].reshape(-1)[flat] + 1
  ids_N, lens_N = fgram_set.match_last_batch(ctx_NxK, visible_N)
  np.put(rows['fgram_ids'], flat, ids_N)
  np.put(rows['fgram_lengths'], flat, lens_N)
  return rows


def make_rows(split: PreparedSplit, seq_len: int, row_ids: np.ndarray) -> dict:
  """Rows row_ids of the packed stream (module docstring) as int32 [len(row_ids), seq_len].

  Row ids outside [0, num_rows) give padding rows.
  """
  row_ids = np.asarray(row_ids, np.int64).reshape(-1)
  total = split.num_tokens
  col_L = np.arange(seq_len, dtype=np.int64)
  pos_BxL = row_ids[:, None] * seq_len + col_L
  valid_BxL = (row_ids[:, None] >= 0) & (pos_BxL < total)
  pos_BxL = np.where(valid_BxL, pos_BxL, 0)
  doc_BxL = np.searchsorted(split.offsets, pos_BxL, side='right') - 1
  start_BxL = split.offsets[doc_BxL]
  first_BxL = pos_BxL == start_BxL
  prev_BxL = np.maximum(pos_BxL - 1, 0)
  out = {
      'inputs': np.where(first_BxL, BOS_ID, split.tokens[prev_BxL]),
      'targets': split.tokens[pos_BxL],
      'segment_ids': doc_BxL - doc_BxL[:, :1] + 1,
      'positions': pos_BxL - np.maximum(start_BxL, pos_BxL[:, :1]),
      'loss_mask': np.ones_like(pos_BxL),
      'fgram_ids': np.where(first_BxL, -1, split.fgram_ids[prev_BxL]),
      'fgram_lengths': np.where(first_BxL, 1, split.fgram_lengths[prev_BxL]),
  }
  out = {k: np.where(valid_BxL, v, _PAD_VALUES[k]).astype(np.int32) for k, v in out.items()}
  return limit_to_row(out, split.fgram_set)


def padding_rows(num: int, seq_len: int) -> dict:
  return {k: np.full((num, seq_len), _PAD_VALUES[k], np.int32) for k in BATCH_KEYS}


class Loader:
  """Batches of a PreparedSplit: deterministic, random access by step, multi-host sliced.

  Train mode repeats forever, shuffling rows with a fresh permutation per epoch
  (numpy Generator seeded by (seed, epoch)) when shuffle is set. Eval mode makes one
  in-order pass whose last batch is padded with rows of loss_mask 0; `num_bytes` and
  `num_tokens` (prediction targets) of the whole split give bits per byte.
  Each process gets its contiguous slice of each global batch's rows.
  """

  def __init__(self, split: PreparedSplit, *, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True, eval_mode: bool = False, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} does not split over {process_count} '
                       'processes; use a multiple of the process count.')
    if eval_mode and shuffle:
      raise ValueError('eval mode reads the split once in order; pass shuffle=False.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
    self.split = split
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed = seed
    self.shuffle = shuffle
    self.eval_mode = eval_mode
    self.process_index = process_index
    self.process_count = process_count
    self.num_rows = num_rows(split, seq_len)
    self._perms = {}
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

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 4:
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.num_rows)
    return self._perms[epoch]

  def global_rows(self, step: int) -> np.ndarray:
    """Row ids of the whole global batch at step (-1 = padding row)."""
    g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    if self.eval_mode:
      return np.where(g < self.num_rows, g, -1)
    epoch, idx = np.divmod(g, self.num_rows)
    if not self.shuffle:
      return idx
    rows = np.empty_like(idx)
    for e in np.unique(epoch):
      sel = epoch == e
      rows[sel] = self._perm(int(e))[idx[sel]]
    return rows

  def batch_at(self, step: int) -> dict:
    """This process's slice of the global batch at step."""
    if self.eval_mode and not 0 <= step < self.num_batches:
      raise IndexError(f'eval batch {step} out of range [0, {self.num_batches}).')
    rows = self.global_rows(step)
    lo = self.process_index * self.local_batch_size
    return make_rows(self.split, self.seq_len, rows[lo:lo + self.local_batch_size])

  def state(self) -> dict:
    return {'step': int(self._step)}

  def restore(self, state: dict):
    self._step = int(state['step'])

  def __iter__(self) -> Iterator[dict]:
    if self.eval_mode:
      # Every iteration is a fresh full pass; the loader's step is left alone.
      return (self.batch_at(i) for i in range(self.num_batches))
    return self._train_iter()

  def _train_iter(self):
    while True:
      batch = self.batch_at(self._step)
      self._step += 1
      yield batch


# ----------------------------------------------------------------------------- seqio path
# TensorFlow and seqio are imported inside these functions: the module stays TF-free.


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
        pad = {k: tf.fill([num_pad], _PAD_VALUES[k]) for k in BATCH_KEYS}
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


def seqio_dataset(task_name: str, *, seq_len: int, split: Optional[str] = None):
  """The task's packed rows (one tf.data element per row, keys BATCH_KEYS), one pass."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  split = split or list(task.splits)[0]
  # Documents must not be trimmed to seq_len: rows are cut from the whole stream.
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                        trim_output_features=False)
  converter = feature_converter(fgram_set=task_fgram_set(task))
  return converter(ds, {k: seq_len for k in ('targets', 'fgram_ids', 'fgram_lengths')})


def seqio_batches(task_name: str, *, seq_len: int, batch_size: int,
                  split: Optional[str] = None, shuffle: bool = False, seed: int = 0,
                  eval_mode: bool = False, num_epochs: Optional[int] = None,
                  shuffle_buffer_rows: int = 16384, cache=False, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """numpy batches from a seqio task, sliced for this process like `Loader.batch_at`.

  With shuffle off these equal Loader's batches (train mode: rows repeat across epochs;
  eval mode: one pass, last batch padded). shuffle=True shuffles rows with a tf.data
  buffer: deterministic per seed, but not the Loader's permutation.
  cache: True keeps the packed rows in memory after the first epoch (~28 bytes per
  token), a path caches them in files there; later epochs then skip tokenization, which
  is what limits this pipeline (matching costs far less, see experiments/bench_data.py).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} does not split over {process_count} processes.')
  local = batch_size // process_count
  lo = process_index * local
  ds = seqio_dataset(task_name, seq_len=seq_len, split=split)
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
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} does not split over {process_count} '
                       'processes; use a multiple of the process count.')
    self.task_name = task_name
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
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

