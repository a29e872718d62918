"""Input readers: files -> (id, text) documents, or token documents for 'tokens' input.

Every reader gives the documents and ids the in-process corpus reader gives for the same
file (tests/test_fgrams_beam.py checks it); see the package docstring for each format.
"""
import io
import os
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
import numpy as np

from scone_jax import corpus
from scone_jax import paths as paths_lib
from scone_jax.fgrams_beam._common import basename
from scone_jax.fgrams_beam._common import write_file

INPUT_FORMATS = ('text', 'jsonl', 'tokens')


def expand_input_patterns(input_patterns: Sequence[str]) -> list[str]:
  """Sorted unique paths of the files the patterns match; error if a pattern matches none."""
  paths = set()
  for pat in input_patterns:
    matched = [m.path for m in FileSystems.match([pat])[0].metadata_list]
    if not matched:
      raise ValueError(f'input pattern {pat!r} matches no file; check the path / glob')
    paths.update(matched)
  return sorted(paths)


def read_documents(p, paths: Sequence[str], input_format: str):
  """The pipeline's first stage: (id, text) documents, or int32 LE token bytes ('tokens')."""
  files = p | 'InputFiles' >> beam.Create(paths) | 'Open' >> fileio.ReadMatches()
  if input_format == 'tokens':
    return files | 'ReadTokenShards' >> beam.FlatMap(_read_token_shard)
  reader = _read_jsonl_file if input_format == 'jsonl' else _read_text_file
  return files | 'ReadDocuments' >> beam.FlatMap(reader)


def _text_documents(f, path: str) -> list[str]:
  # corpus's rule, so in-process and Beam extraction see the same documents
  # (tests/test_fgrams_beam.py checks that the two readers agree).
  try:
    text = f.read().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not valid UTF-8 ({e}); text inputs must be UTF-8') from e
  return corpus.split_text_documents(text)


def read_text_documents(path: str) -> list[str]:
  """The documents of one text file (any Beam filesystem), as the 'text' pipeline reads them."""
  with FileSystems.open(path, mime_type='application/octet-stream') as f:
    return _text_documents(f, path)


def _read_text_file(readable_file) -> Iterator[tuple[str, str]]:
  """(id, text) of one text file's documents, ids '<basename>#<n>' as corpus assigns them."""
  # Whole file at once: the split rule is a regex over the file's text (keep files to a
  # size a worker holds comfortably; many files parallelize, one file does not).
  path = readable_file.metadata.path
  base = basename(path)
  with readable_file.open(mime_type='application/octet-stream') as f:
    for i, text in enumerate(_text_documents(f, path)):
      yield f'{base}#{i}', text


def _read_jsonl_file(readable_file) -> Iterator[tuple[str, str]]:
  """(id, text) of one .jsonl file's records, as corpus.read_text_documents reads them:
  id = the record's "id" (as str) or '<basename>#<lineno>'; whitespace-only texts skipped."""
  # Line by line (one file per worker, streamed): line numbers need the file read in
  # order, which a splittable text source cannot give.
  path = readable_file.metadata.path
  base = basename(path)
  with readable_file.open(mime_type='application/octet-stream') as f:
    for lineno, raw in enumerate(iter(f.readline, b''), 1):
      where = f'{path}:{lineno}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{where} is not valid UTF-8 ({e}); text inputs must be UTF-8') from e
      record = corpus.parse_jsonl_record(line, where)
      if record is None or not record['text'].strip():
        continue
      yield str(record.get('id', f'{base}#{lineno}')), record['text']


def _load_token_shard(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(io.BytesIO(data)) as z:
    if 'tokens' not in z or 'offsets' not in z:
      raise ValueError(f'{path}: a token shard needs arrays "tokens" and "offsets" '
                       f'(found {sorted(z.files)}); write shards with write_token_shards')
    tokens, offsets = z['tokens'], z['offsets'].astype(np.int64)
  if (tokens.ndim != 1 or offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0
      or offsets[-1] != tokens.size or np.any(np.diff(offsets) < 0)):
    raise ValueError(f'{path}: offsets must be 1-D, nondecreasing, start at 0 and end at '
                     f'len(tokens)={tokens.size}; got {offsets.size} offsets')
  if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
    raise ValueError(f'{path}: token ids must be int32 >= 0')
  return tokens.astype('<i4'), offsets


def _read_token_shard(readable_file) -> Iterator[bytes]:
  path = readable_file.metadata.path
  with readable_file.open(mime_type='application/octet-stream',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
    tokens, offsets = _load_token_shard(f.read(), path)
  for start, end in zip(offsets[:-1], offsets[1:]):
    yield tokens[start:end].tobytes()


def write_token_shards(documents: Iterable[Sequence[int]], out_prefix: str,
                       num_shards: int) -> list[str]:
  """Writes documents as `{out_prefix}-SSSSS-of-NNNNN.npz` token shards; returns paths.

  Documents are split into `num_shards` contiguous groups (the last ones may be empty);
  each shard holds `tokens` (int32, concatenated) and `offsets` (int64, docs + 1).
  `out_prefix` may be any Beam filesystem path (local, gs://, ...).
  """
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  docs = [np.asarray(d, dtype=np.int64) for d in documents]
  for i, d in enumerate(docs):
    if d.ndim != 1 or (d.size and (d.min() < 0 or d.max() > np.iinfo(np.int32).max)):
      raise ValueError(f'document {i}: token ids must be a 1-D sequence of int32 >= 0')
  parent = os.path.dirname(out_prefix)
  if parent and '://' not in out_prefix:
    paths_lib.makedirs(parent)
  bounds = np.linspace(0, len(docs), num_shards + 1).round().astype(np.int64)
  paths = []
  for s in range(num_shards):
    group = docs[bounds[s]:bounds[s + 1]]
    offsets = np.zeros(len(group) + 1, np.int64)
    offsets[1:] = np.cumsum([d.size for d in group])
    tokens = (np.concatenate(group) if group else np.zeros(0)).astype(np.int32)
    buf = io.BytesIO()
    np.savez(buf, tokens=tokens, offsets=offsets)
    path = f'{out_prefix}-{s:05d}-of-{num_shards:05d}.npz'
    write_file(path, buf.getvalue())
    paths.append(path)
  return paths
