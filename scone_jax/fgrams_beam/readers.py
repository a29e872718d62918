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
from scone_jax.fgrams_beam._common import write_file

# 'auto': each file's format by its name (corpus.file_format); 'tokens': .npz token shards.
INPUT_FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord', 'arrow', 'auto', 'tokens')


def expand_input_patterns(input_patterns: Sequence[str]) -> list[str]:
  """Sorted unique paths of the files the patterns match; error if a pattern matches none."""
  paths = set()
  for pat in input_patterns:
    matched = [m.path for m in FileSystems.match([pat])[0].metadata_list]
    if not matched:
      raise ValueError(f'input pattern {pat!r} matches no file; check the path / glob')
    paths.update(matched)
  return sorted(paths)


def read_documents(p, paths: Sequence[str], input_format: str, text_field: str = 'text'):
  """The pipeline's first stage: (id, text) documents, or int32 LE token bytes ('tokens').
  One file is read by one worker, as a stream."""
  files = p | 'InputFiles' >> beam.Create(paths) | 'Open' >> fileio.ReadMatches()
  if input_format == 'tokens':
    return files | 'ReadTokenShards' >> beam.FlatMap(_read_token_shard)
  return files | 'ReadDocuments' >> beam.FlatMap(_read_file, input_format, text_field)


def _open(path: str):
  return FileSystems.open(path, mime_type='application/octet-stream',
                          compression_type=CompressionTypes.UNCOMPRESSED)


def read_text_documents(path: str) -> list[str]:
  """The documents of one text file (any Beam filesystem), as the 'text' pipeline reads them."""
  return [d.text for d in corpus.iter_file_documents(path, open_fn=_open, fmt='text')]


def _read_file(readable_file, input_format: str, text_field: str = 'text',
               decode_errors: str = 'strict') -> Iterator[tuple[str, str]]:
  """(id, text) of one file's documents: `corpus.iter_file_documents`, the in-process
  reader itself (same documents, same ids), streamed through Beam's FileSystems."""
  fmt = '' if input_format == 'auto' else input_format
  for d in corpus.iter_file_documents(readable_file.metadata.path, text_field=text_field,
                                      decode_errors=decode_errors, open_fn=_open, fmt=fmt):
    yield d.id, d.text


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
