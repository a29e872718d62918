"""Prepared token shards: a split tokenized once, read back by global row with bounded memory.

A prepared split is a directory (`<workdir>/data/train-shards/` for a run):

  index.json                    what the shards hold (below) and what made them
  tokens-SSSSS-of-NNNNN.bin     little-endian uint16 (vocab <= 65,536) or uint32 tokens:
                                the shard's documents, each followed by EOS, back to back

Document `d` goes to shard `doc_key(d.id) % N` and, within it, documents are ordered by
(`doc_key`, id). Where a document lands depends only on its id, so the in-process writer
(`write_shards`) and the Beam pipeline (`fgrams_beam`) write the same bytes, and adding
documents moves no other document to a different shard.

The packed stream of `packing.py` (its rule 1-5) is the shards' tokens in shard order, and
row g of it covers stream tokens [g*L, (g+1)*L). A row is built from exactly those tokens
and the one before (its first input), nothing else:
  * a document starts where the previous token is EOS (the tokenizer never emits EOS inside
    a document; the writer checks);
  * f-grams are matched on the fly, per row: under rule 4b the f-gram used at a position
    may only hold inputs of its segment within the row, i.e. it is the longest f-gram
    ending at that input within the row's inputs, segments being cut by BOS (id 0, in no
    f-gram). The rows equal `packing.make_rows` over the same documents
    (tests/test_data.py checks it).

Why fixed token shards rather than ArrayRecord: rows are cut from the stream by arithmetic,
so reading one is a single byte range (`pread`; a ranged GET on gs://) with no record
framing and no per-record index to load, and nothing a reader holds grows with the corpus
except the per-shard token counts. Any tool can read the files (`np.fromfile`).

index.json: {"version", "dtype", "eos_id", "num_shards", "shard_tokens": [...],
"num_tokens", "num_docs", "num_bytes", "tokenizer" (fingerprint), "docs" (`shards_digest`
of the documents), "request" (what made them: `prepare` reuses shards of an equal request),
"writer" ('in-process' or 'beam')}.
"""
import collections
import hashlib
import itertools
import logging
import os
import threading
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from scone_jax import packing
from scone_jax import paths

INDEX = 'index.json'
VERSION = 1
_ROW_KEYS = packing.BATCH_KEYS


def shard_name(shard: int, num_shards: int) -> str:
  return f'tokens-{shard:05d}-of-{num_shards:05d}.bin'


def doc_key(doc_id: str) -> int:
  """A document's place: 64 bits of sha256(id); shard = key % num_shards."""
  return int.from_bytes(hashlib.sha256(doc_id.encode('utf-8')).digest()[:8], 'little')


def document_digest(doc_id: str, text: str) -> bytes:
  """sha256 of one document as `packing.documents_digest` hashes it (id NUL text NUL)."""
  return hashlib.sha256(doc_id.encode('utf-8') + b'\0' + text.encode('utf-8') + b'\0').digest()


def shards_digest(docs, num_shards: int) -> str:
  """The index's `docs` digest: of the documents in shard order, so a distributed writer
  (the Beam pipeline) computes it too. Per shard, sha256 over the `document_digest`s of its
  documents in (doc_key, id) order; then sha256 over the shards' digests in shard order.
  It depends on the set of documents, not on the order they were read in."""
  shards = [[] for _ in range(num_shards)]
  for d in docs:
    key = doc_key(d.id)
    shards[key % num_shards].append((key, d.id, document_digest(d.id, d.text)))
  return combine_shard_digests(
      [hashlib.sha256(b''.join(x[2] for x in sorted(s))).hexdigest() for s in shards])


def combine_shard_digests(digests) -> str:
  return hashlib.sha256(b''.join(bytes.fromhex(d) for d in digests)).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


def document_tokens(ids: Sequence[int], eos_id: int, dtype, where: str) -> np.ndarray:
  """One document's ids followed by EOS, as the shard dtype; ValueError on EOS inside."""
  ids = np.asarray(ids)
  if ids.size and (ids == eos_id).any():
    raise ValueError(f'{where}: the tokenizer emitted EOS (id {eos_id}) inside the document; '
                     'token shards find document starts by EOS.')
  out = np.empty(ids.size + 1, dtype)
  out[:-1] = ids
  out[-1] = eos_id
  return out


ShardDocument = collections.namedtuple('ShardDocument',
                                       ['key', 'id', 'ids', 'num_bytes', 'digest'])
ShardDocument.__doc__ = """A tokenized document on its way into a shard: `doc_key(id)`, the id,
its token ids (without EOS), the UTF-8 byte count of its text and its `document_digest`."""


def shard_document(doc_id: str, text: str, ids) -> ShardDocument:
  return ShardDocument(doc_key(doc_id), doc_id, ids, len(text.encode('utf-8')),
                       document_digest(doc_id, text))


def shard_contents(docs: Iterable[ShardDocument], eos_id: int, dtype) -> tuple[bytes, dict]:
  """The bytes of one shard file and its stats: the one place a shard is built.

  Both writers (`write_shards` in process, the Beam pipeline's shard writer) hand a shard's
  documents here and only put the bytes in a file. Documents are ordered by (doc_key, id),
  each followed by EOS; a repeated id fails naming it. Stats: num_tokens, num_docs,
  num_bytes and `docs` (sha256 over the documents' digests in that order).
  """
  docs = sorted(docs, key=lambda d: (d.key, d.id))
  for a, b in zip(docs, docs[1:]):
    if a.id == b.id:
      raise ValueError(f'document id {a.id!r} appears twice; token shards place documents '
                       'by id, so ids must be unique (give records distinct "id"s, or none: '
                       'then ids are <file>#<n>).')
  dtype = np.dtype(dtype)
  data = b''.join(document_tokens(d.ids, eos_id, dtype, d.id).tobytes() for d in docs)
  stats = {'num_tokens': len(data) // dtype.itemsize, 'num_docs': len(docs),
           'num_bytes': int(sum(d.num_bytes for d in docs)),
           'docs': hashlib.sha256(b''.join(d.digest for d in docs)).hexdigest()}
  return data, stats


def write_index(directory: str, *, shard_stats: Sequence[dict], **fields) -> dict:
  """index.json (written last: a directory without one is unfinished) from the per-shard
  stats of `shard_contents`, in shard order, plus `fields` (dtype, eos_id, tokenizer, ...)."""
  index = dict(version=VERSION, **fields)
  index.update(shard_tokens=[int(s['num_tokens']) for s in shard_stats],
               num_docs=int(sum(s['num_docs'] for s in shard_stats)),
               num_bytes=int(sum(s['num_bytes'] for s in shard_stats)),
               docs=combine_shard_digests([s['docs'] for s in shard_stats]))
  index['num_tokens'] = int(sum(index['shard_tokens']))
  paths.write_json_atomic(paths.join(directory, INDEX), index, indent=1)
  return index


def write_shards(docs, tokenizer, directory: str, *, num_shards: int, request=None,
                 batch_docs: int = 4096) -> dict:
  """Tokenizes documents (objects with .id and .text; any iterable, read once in batches)
  into token shards in `directory`; memory holds the token ids, not the texts.

  In process; `fgrams_beam` writes the same files for corpora beyond one machine.
  `request` (JSON) is recorded in the index: what `prepare` compares to reuse the shards.
  Returns the index. The index is written last, so a directory without one is unfinished.
  """
  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards} must be >= 1.')
  dtype = token_dtype(tokenizer.vocab_size)
  eos = int(tokenizer.eos_id)
  paths.makedirs(directory)
  index_path = paths.join(directory, INDEX)
  if paths.exists(index_path):
    paths.remove(index_path)
  buckets = [[] for _ in range(num_shards)]
  num_docs = 0
  t0 = last = time.time()
  docs = iter(docs)
  while chunk := list(itertools.islice(docs, batch_docs)):
    for d, ids in zip(chunk, tokenizer.encode_batch([d.text for d in chunk])):
      doc = shard_document(d.id, d.text, np.asarray(ids, dtype))
      buckets[doc.key % num_shards].append(doc)
    num_docs += len(chunk)
    if time.time() - last > 10:
      last = time.time()
      logging.info('prepare %s: %d documents tokenized (%.0f docs/s)', directory, num_docs,
                   num_docs / (last - t0))
  stats = []
  for s, bucket in enumerate(buckets):
    data, one = shard_contents(bucket, eos, dtype)
    paths.atomic_write(paths.join(directory, shard_name(s, num_shards)), data)
    stats.append(one)
    bucket.clear()
  index = write_index(directory, dtype=dtype.str, eos_id=eos, num_shards=num_shards,
                      shard_stats=stats, tokenizer=tokenizer.fingerprint, request=request,
                      writer='in-process')
  seconds = time.time() - t0
  logging.info('prepared %s: %d documents, %d tokens in %d shards (%.1fs, %.0f tokens/s)',
               directory, num_docs, index['num_tokens'], num_shards, seconds,
               index['num_tokens'] / max(seconds, 1e-9))
  return index


def prepare(load_docs, tokenizer, directory: str, *, num_shards: int, request) -> dict:
  """The index of `directory`'s shards, written first (from load_docs()) unless shards
  made by the same request (tokenizer, corpus, shard count: JSON) are already there."""
  index = read_index(directory)
  if index is not None and index.get('request') == request:
    logging.info('reusing token shards %s (%d documents, %d tokens)', directory,
                 index['num_docs'], index['num_tokens'])
    return index
  if index is not None:
    logging.info('token shards in %s were made for another request; rewriting', directory)
  return write_shards(load_docs(), tokenizer, directory, num_shards=num_shards, request=request)


def check_tokenizer(index: dict, tokenizer, directory: str):
  if index['tokenizer'] != tokenizer.fingerprint:
    raise ValueError(f'{directory} was tokenized with tokenizer {index["tokenizer"][:12]}, '
                     f'this run uses {tokenizer.fingerprint[:12]}; prepare the shards with this '
                     'run\'s tokenizer (or set tokenizer.path to the one they were made with).')


def read_index(directory: str) -> Optional[dict]:
  """The index of a finished prepared split, or None."""
  path = paths.join(directory, INDEX)
  if not paths.isfile(path):
    return None
  index = paths.read_json(path)
  if index.get('version') != VERSION:
    return None
  return index


# ----------------------------------------------------------------------------- rows


def rows_from_windows(window_BxL1: np.ndarray, valid_BxL: np.ndarray, eos_id: int,
                      fgram_set=None, *, sampling=None, row_ids_B=None) -> dict:
  """Packed rows (packing.py's rule) from stream windows: column 0 = the token before the row.

  window_BxL1: int [B, L+1]; row b's targets are window[b, 1:], its inputs the tokens before
  them. valid_BxL: False past the end of the stream (padding). A row starting the stream
  has EOS (or anything ending a document) in column 0. sampling: an `fgrams.MatchSampling`
  (training's remedies), keyed per row by row_ids_B (the rows' global ids).
  """
  prev_BxL = window_BxL1[:, :-1].astype(np.int32)
  tok_BxL = window_BxL1[:, 1:].astype(np.int32)
  b, l = tok_BxL.shape
  first_BxL = prev_BxL == eos_id
  col_L = np.arange(l, dtype=np.int32)
  start_BxL = np.maximum.accumulate(np.where(first_BxL, col_L, 0), axis=1)
  inputs = np.where(first_BxL, packing.BOS_ID, prev_BxL)
  out = {
      'inputs': inputs,
      'targets': tok_BxL,
      'segment_ids': 1 + np.cumsum(first_BxL, axis=1, dtype=np.int32) - first_BxL[:, :1],
      'positions': col_L - start_BxL,
      'loss_mask': np.ones((b, l), np.int32),
  }
  if fgram_set is None:
    out['fgram_ids'] = np.full((b, l), -1, np.int32)
    out['fgram_lengths'] = np.ones((b, l), np.int32)
  else:
    # Per row, inputs only: BOS (0, in no f-gram) cuts the segments, so the longest f-gram
    # ending at an input within the row is rule 4b's f-gram there.
    flat = np.where(valid_BxL, inputs, 0).reshape(-1)
    offsets = np.arange(0, b * l + 1, l, dtype=np.int64)
    if sampling is None:
      ids, lens = fgram_set.match_flat(flat, offsets)
    else:
      if row_ids_B is None or len(row_ids_B) != b:
        raise ValueError(f'rows_from_windows: sampling needs row_ids_B, one id per row ({b}).')
      ids, lens = sampling.match_flat(fgram_set, flat, offsets, row_ids_B)
    out['fgram_ids'] = np.where(first_BxL, -1, ids.reshape(b, l))
    out['fgram_lengths'] = np.where(first_BxL, 1, lens.reshape(b, l))
  return {k: np.where(valid_BxL, out[k], packing.PAD_VALUES[k]).astype(np.int32)
          for k in _ROW_KEYS}


class TokenShards:
  """A prepared split read by stream position: `read(start, stop)`, `rows(row_ids, L)`.

  Local shards are read with pread on file descriptors kept open (no mmap: resident pages
  of a mapped file would count against the process and grow with what it has touched);
  cloud shards with ranged reads through the IO layer. Thread-safe.
  sampling: an `fgrams.MatchSampling` for training rows (config.fgrams.train_*): row g's
  matches are sampled with key g, so a row read again (a resume, a later epoch) gets the
  same matches.
  """

  def __init__(self, directory: str, fgram_set=None, *, sampling=None):
    index = read_index(directory)
    if index is None:
      raise FileNotFoundError(f'{directory}: no prepared token shards (no {INDEX}); run '
                              '--mode=prepare or train, which prepares them.')
    self.directory = directory
    self.index = index
    self.fgram_set = fgram_set
    if sampling is not None and fgram_set is None:
      raise ValueError('TokenShards: sampling was given without an f-gram set to sample from.')
    self.sampling = sampling
    self.dtype = np.dtype(index['dtype'])
    self.eos_id = int(index['eos_id'])
    counts = np.asarray(index['shard_tokens'], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    self._names = [shard_name(s, index['num_shards']) for s in range(index['num_shards'])]
    self._cloud = paths.is_cloud(directory)
    self._files = {}
    self._lock = threading.Lock()
    for s, name in enumerate(self._names):
      size = paths.getsize(paths.join(directory, name))
      if size != counts[s] * self.dtype.itemsize:
        raise ValueError(f'{paths.join(directory, name)}: {size} bytes, the index says '
                         f'{counts[s]} tokens of {self.dtype.itemsize} bytes; the shards are '
                         'damaged or from another prepare. Delete the directory to redo it.')

  @property
  def num_tokens(self) -> int:
    return int(self._starts[-1])

  @property
  def num_bytes(self) -> int:
    return int(self.index['num_bytes'])

  @property
  def num_docs(self) -> int:
    return int(self.index['num_docs'])

  def _read_shard(self, s: int, lo: int, hi: int) -> bytes:
    offset, size = lo * self.dtype.itemsize, (hi - lo) * self.dtype.itemsize
    if self._cloud:
      with paths.open(paths.join(self.directory, self._names[s]), 'rb') as f:
        f.seek(offset)
        return f.read(size)
    fd = self._files.get(s)
    if fd is None:
      with self._lock:
        fd = self._files.get(s)
        if fd is None:
          fd = os.open(paths.join(self.directory, self._names[s]), os.O_RDONLY)
          self._files[s] = fd
    return os.pread(fd, size, offset)

  def read(self, start: int, stop: int) -> np.ndarray:
    """Stream tokens [start, stop) as int32 (clipped to the stream)."""
    start, stop = max(int(start), 0), min(int(stop), self.num_tokens)
    out = np.empty(max(stop - start, 0), np.int32)
    if stop <= start:
      return out
    first = int(np.searchsorted(self._starts, start, side='right')) - 1
    pos = start
    s = first
    while pos < stop:
      hi = min(stop, int(self._starts[s + 1]))
      if hi > pos:
        data = self._read_shard(s, pos - int(self._starts[s]), hi - int(self._starts[s]))
        out[pos - start:hi - start] = np.frombuffer(data, self.dtype)
      pos = hi
      s += 1
    return out

  def rows(self, row_ids, seq_len: int) -> dict:
    """Rows row_ids of the packed stream, int32 [len(row_ids), seq_len]; ids outside
    [0, num_rows) give padding rows."""
    row_ids = np.asarray(row_ids, np.int64).reshape(-1)
    total = self.num_tokens
    window_BxL1 = np.full((row_ids.size, seq_len + 1), self.eos_id, np.int32)
    valid_BxL = np.zeros((row_ids.size, seq_len), bool)
    for i, g in enumerate(row_ids):
      lo = int(g) * seq_len
      if g < 0 or lo >= total:
        continue
      got = self.read(lo - 1 if lo else 0, lo + seq_len)
      if lo:
        window_BxL1[i, :got.size] = got
      else:
        window_BxL1[i, 1:1 + got.size] = got
      valid_BxL[i, :min(seq_len, total - lo)] = True
    return rows_from_windows(window_BxL1, valid_BxL, self.eos_id, self.fgram_set,
                             sampling=self.sampling, row_ids_B=row_ids)

  def documents(self) -> Iterable[np.ndarray]:
    """Each document's tokens with its EOS, in stream order, one shard in memory at a time."""
    for s in range(len(self._names)):
      tokens = self.read(int(self._starts[s]), int(self._starts[s + 1]))
      ends = np.flatnonzero(tokens == self.eos_id) + 1
      yield from np.split(tokens, ends[:-1]) if tokens.size else ()

  def close(self):
    with self._lock:
      for fd in self._files.values():
        os.close(fd)
      self._files.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
