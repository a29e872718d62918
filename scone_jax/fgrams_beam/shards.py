"""Token shards from the pipeline: tokenized documents -> the files `token_shards` defines.

Each document is keyed by shard `doc_key(id) % N` and grouped per shard (every shard gets a
group, so an empty shard is an empty file); one worker builds a shard's bytes with
`token_shards.shard_contents` (the writer the in-process path uses too) and writes them
under the shard's deterministic name, plus its stats in the temp directory. The launcher
then writes index.json from the stats (last: a directory without one is unfinished).
"""
import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np

from scone_jax import paths as paths_lib
from scone_jax import token_shards
from scone_jax.fgrams_beam._common import read_file
from scone_jax.fgrams_beam._common import write_file

STATS_GLOB = 'token-shard-*.json'


def _shard_element(doc: token_shards.ShardDocument, num_shards: int):
  return doc.key % num_shards, doc


class _WriteTokenShardFn(beam.DoFn):
  """(shard, its ShardDocuments) -> the shard's .bin and a stats JSON.

  None values are the placeholders that give every shard, even an empty one, a group and
  so a file.
  """

  def __init__(self, out_dir: str, stats_dir: str, num_shards: int, dtype: str, eos_id: int):
    self._out_dir = out_dir
    self._stats_dir = stats_dir
    self._num_shards = num_shards
    self._dtype = dtype
    self._eos_id = eos_id

  def process(self, shard_and_docs):
    shard, docs = shard_and_docs
    docs = (d._replace(ids=np.frombuffer(d.ids, '<i4')) for d in docs if d is not None)
    data, stats = token_shards.shard_contents(docs, self._eos_id, self._dtype)
    write_file(FileSystems.join(self._out_dir, token_shards.shard_name(shard, self._num_shards)),
               data)
    stats['shard'] = shard
    write_file(FileSystems.join(self._stats_dir, f'token-shard-{shard:05d}.json'),
               json.dumps(stats).encode('utf-8'), mime_type='application/json')
    yield stats


def write_token_shards(docs, out_dir: str, stats_dir: str, num_shards: int, dtype: str,
                       eos_id: int):
  """Tokenized documents -> token shard files in out_dir (every shard, empty ones too)."""
  keyed = docs | 'ShardKey' >> beam.Map(_shard_element, num_shards)
  every_shard = (docs.pipeline
                 | 'EveryShard' >> beam.Create([(s, None) for s in range(num_shards)]))
  return ((keyed, every_shard)
          | 'WithEmptyShards' >> beam.Flatten()
          | 'GroupShards' >> beam.GroupByKey()
          | 'WriteTokenShards' >> beam.ParDo(
              _WriteTokenShardFn(out_dir, stats_dir, num_shards, dtype, eos_id)))


def start_token_shards(directory: str) -> None:
  """Makes the directory and removes an old index: while we write, it is unfinished."""
  paths_lib.makedirs(directory)
  index_path = paths_lib.join(directory, token_shards.INDEX)
  if paths_lib.exists(index_path):
    paths_lib.remove(index_path)


def write_token_index(directory: str, stats_dir: str, num_shards: int, tokenizer,
                      request: dict) -> dict:
  """The token shards' index.json, from the writers' per-shard stats (written last)."""
  stats = {}
  for m in FileSystems.match([FileSystems.join(stats_dir, STATS_GLOB)])[0].metadata_list:
    one = json.loads(read_file(m.path, 'application/json').decode('utf-8'))
    stats[one.pop('shard')] = one
  missing = sorted(set(range(num_shards)) - set(stats))
  if missing:
    raise RuntimeError(f'the pipeline finished but wrote no stats for token shards {missing[:10]}'
                       f' (of {num_shards}) in {stats_dir}; the runner lost output')
  dtype = token_shards.token_dtype(tokenizer.vocab_size)
  index = token_shards.write_index(
      directory, dtype=dtype.str, eos_id=int(tokenizer.eos_id), num_shards=num_shards,
      shard_stats=[stats[s] for s in range(num_shards)], tokenizer=tokenizer.fingerprint,
      request=request, writer='beam')
  logging.info('fgrams_beam: token shards in %s: %d documents, %d tokens in %d shards',
               directory, index['num_docs'], index['num_tokens'], num_shards)
  return index
