"""Packing: documents -> tokenized, f-gram-matched rows (the numpy `Loader` over them is in
`loader.py`, reachable here as `packing.Loader`).

TF-free and training-free, so serving's evaluation packs text exactly as training does.
Two input paths give identical rows (tests/test_data.py checks it):
  * `Loader` (numpy, no TensorFlow): the training default and what serving uses;
    random access by step, so resuming a run replays exactly the batches it would have seen.
  * seqio Tasks (`seqio_tasks.py`): tokenize -> append EOS -> match ->
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
import hashlib
import io
import json
import logging
import time
from typing import Optional

import numpy as np

from scone_jax import paths

BOS_ID = 0
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask', 'fgram_ids',
              'fgram_lengths')
PAD_VALUES = {'inputs': 0, 'targets': 0, 'segment_ids': 0, 'positions': 0, 'loss_mask': 0,
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

  def rows(self, row_ids, seq_len: int) -> dict:
    """Rows row_ids of the packed stream (`make_rows`)."""
    return make_rows(self, seq_len, row_ids)


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
  paths.makedirs(paths.dirname(paths.abspath(path)))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.atomic_write(path, buf.getvalue())


def _load_npz(path: str, meta: dict) -> Optional[dict]:
  if not paths.isfile(path):
    return None
  try:
    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
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
    tok_path = paths.join(cache_dir, f'{name}-tokens-{tok_key}.npz')
    full_path = paths.join(cache_dir, f'{name}-matched-{full_key}.npz')
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
  out = {k: np.where(valid_BxL, v, PAD_VALUES[k]).astype(np.int32) for k, v in out.items()}
  return limit_to_row(out, split.fgram_set)


def padding_rows(num: int, seq_len: int) -> dict:
  return {k: np.full((num, seq_len), PAD_VALUES[k], np.int32) for k in BATCH_KEYS}


# The training loader lives in `loader.py`, so a serving process that packs text (this
# module) loads no training input code; its names stay reachable here, loaded on first use.
_LOADER_NAMES = ('Loader', 'ahead', 'permute', 'local_batch_size')


def __getattr__(name):
  if name in _LOADER_NAMES:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module('scone_jax.loader'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
