"""F-gram extraction beyond one machine: the K-1 pass algorithm as an Apache Beam pipeline
(and, from the same pass over the text, the training split's token shards).

The result is the FGramSet `fgrams.extract` builds in process (same n-grams in the same
order, same counts, same fingerprint); only where the counting runs differs. DirectRunner
by default (Beam 2.77's DirectRunner first tries Prism, fetching its binary from GitHub;
offline, `--runner=FnApiRunner` runs the same in process); any runner through standard
Beam options. Arguments the script does not know go to Beam unchanged. Workers must be
able to import `scone_jax` (the DoFns live in this module) and must reach the inputs, the
tokenizer and the shard directory (`--temp_dir`, else `--temp_location`): the launcher
makes a local temporary one only for runners whose workers share this machine's disk.
Paths on gs:// need Beam's GCS filesystem on the launcher and on the workers
(`pip install "apache-beam[gcp]"`; the project's own IO layer has gcsfs already).

  Dataflow  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
            (shards go there too) --setup_file=./pyproject.toml (workers pip-install
            scone_jax with its core dependencies at start-up; or bake them into an image
            and pass --sdk_container_image=REGION-docker.pkg.dev/P/REPO/IMAGE:TAG).
            --worker_machine_type=n2-highmem-8: a worker holds the pruning filter
            (~0.8 GB per 100M frequent (n-1)-grams with 'hashes', fixed with 'bloom') and
            one key shard's distinct candidates; --max_num_workers bounds the autoscaler.
  Flink     --runner=FlinkRunner --flink_master=HOST:8081 --temp_dir=gs://B/tmp (or a
            path every task manager mounts) --parallelism=N. The Python code runs in an
            SDK harness per task manager: --environment_type=DOCKER (default; the
            task managers need Docker and an image with scone_jax installed, named by
            --sdk_container_image), PROCESS (--environment_config='{"command":
            "/path/to/boot"}', scone_jax installed on every task manager), or LOOPBACK
            (the harness is this launching process: a local Flink for tests, no
            parallel Python work). Beam starts a Flink job server from a jar it downloads
            for the cluster's --flink_version (offline: --flink_job_server_jar=PATH).
  Spark     --runner=SparkRunner --spark_master_url=spark://HOST:7077 --temp_dir=...,
            with the same --environment_type choices as Flink; the job server jar comes
            from --spark_version / --spark_job_server_jar. Or start the Spark job server
            yourself and use --runner=PortableRunner --job_endpoint=HOST:8099.
  Dask      --runner=DaskRunner --dask_client_address=HOST:8786 [--dask_npartitions=N]:
            an existing dask.distributed cluster (`pip install -e ".[beam]"` brings
            dask[distributed]). The run goes through `scone_jax.beam_dask`, a fixed copy
            of Beam's DaskRunner (Beam's own drops this pipeline's counts without an
            error; see that module, also for why the Dask runner repeats work and suits
            moderate corpora only). Workers of a scheduler on 127.0.0.1/localhost (or of
            the LocalCluster Beam starts when no address is given) share this disk, so
            --temp_dir may be omitted; a scheduler on another host needs a --temp_dir
            all its workers and this process see (gs://, or a shared mount).

For example:

  python -m scone_jax.fgrams_beam --input='gs://b/train-*.txt' --input_format=text \
    --tokenizer=gs://b/tokenizer.model --output=gs://b/fgrams.npz --max_len=5 \
    --min_count=2 --num_fgrams=10000000 --num_key_shards=1024 \
    --runner=DataflowRunner --project=p --region=r --temp_location=gs://b/tmp \
    --setup_file=./pyproject.toml --worker_machine_type=n2-highmem-8

Inputs (`input_format`), read with the ids `corpus.read_text_documents` gives:
  'text'    UTF-8 files, optionally compressed (.gz/.bz2/... by extension), each read
            whole by one worker. Documents are blocks separated by one or more blank
            lines, split by `corpus.split_text_documents` (the in-process reader's rule):
            '\\r\\n', '\\r' -> '\\n'; a blank line is empty or only ' \\t\\r\\f\\v'; a block
            loses leading/trailing '\\n' and is dropped when only whitespace; inner lines
            are kept as they are. Documents never span files. Ids '<basename>#<n>', n from 0.
  'jsonl'   one JSON object per line, each file streamed line by line by one worker (line
            numbers need the file in order); its "text" field is one document; blank
            lines and whitespace-only texts are skipped (`corpus.parse_jsonl_record`).
            Ids: the record's "id" (as str), else '<basename>#<lineno>', lineno from 1.
            (The in-process reader treats a file as JSONL by its `.jsonl` name: give
            such files --input_format=jsonl for the same documents.)
  'tokens'  `.npz` shards holding `tokens` (int32, all documents concatenated) and
            `offsets` (int64, num_docs + 1); `write_token_shards` writes them. No ids, so
            neither token shards nor a held-out split.
Text is tokenized by SentencePiece (`encode(text)`, ids as encoded, nothing appended),
the model loaded once per DoFn instance in `setup()`.

Held-out documents (`--heldout_fraction=F`, default 0: every document trains): a document
whose `corpus.heldout_score(id) < F` is dropped before tokenizing, so neither the f-gram
counts nor the token shards see it. This is `corpus.split_documents`' rule except for its
guarantee of a non-empty side: in process, when no document scores below F, the lowest-
scoring one is held out anyway (and when all do, the highest-scoring one trains); that
needs a global order over the corpus, which this pipeline does not take. The two agree
whenever at least one document but not all score below F, i.e. on any corpus but a tiny
one or with a tiny F; when none does, the launcher logs a warning.

Token shards (`--shards_output=DIR`, `--num_token_shards=N`, 'text'/'jsonl' input): the
same pipeline also writes the training documents as the token shards training reads
(`scone_jax/token_shards.py`), byte for byte what `token_shards.write_shards` writes in
process for the same documents and tokenizer, so one read and one tokenization of the
text feed both the f-gram counting and the shards. Each tokenized document is keyed by
shard `doc_key(id) % N` and grouped per shard (every shard gets a group, so an empty shard
is an empty file); one worker sorts a shard's documents by (doc_key, id), in memory (pick
N so a shard fits a worker comfortably), and writes `tokens-SSSSS-of-NNNNN.bin` through
FileSystems under its deterministic name (a retried bundle rewrites the same file), plus
its counts in the temp directory. The launcher then writes index.json (last, so a
directory without one is unfinished): shard token counts, num_docs, num_bytes (UTF-8
text), the tokenizer fingerprint, writer 'beam', a `request` (inputs, input format,
heldout_fraction, tokenizer, N), and `docs`, a digest in shard order (`shards_digest`:
`packing.documents_digest` hashes in corpus order, a sequential hash a distributed
pipeline cannot compute without a second ordered pass). Document ids must be unique (a
duplicate fails naming the id); the f-gram counting alone does not need ids. Without
--output only the shards are written. The tokenizer must have pad 0 and EOS 1
(`corpus.Tokenizer`; `corpus.train_tokenizer` makes such models). Train from them with
  --config.data.train_shards=DIR --config.tokenizer.path=TOKENIZER
  --config.fgrams.path=FGRAMS.npz
plus the corpus flags for the held-out split evaluation reads in process (eval files, or
the same train files and corpus.heldout_fraction=F).

The graph (one pipeline, all passes: one job start, and the runner orders the passes by
their side-input dependencies; K-1 jobs with files in between would cost a start each):
  documents (id, text) -> drop held-out -> tokenize -> Reshuffle (fusion break:
          tokenize once, rebalance), then two branches of the same PCollection:
  token shards (with --shards_output): key by shard -> GroupByKey -> sort, write
  pass 1: count tokens -> sum per key -> >= min_count -> filter_1
  pass n = 2..K: per document, the n-grams whose (n-1)-prefix AND (n-1)-suffix pass
          filter_{n-1} (a side input) -> sum per key -> >= min_count -> filter_n
  passes 2..K: each frequent batch -> one .npz (a deterministic name, so a retried
          bundle rewrites the same file instead of adding a duplicate)
Counting is batched: a counting DoFn buffers its bundle's candidate occurrences, counts
them with numpy (`np.unique` over n-gram keys = the n int32 LE tokens as one void item)
and emits (key shard, (keys, counts)) batches, shard = hash(n-gram) % num_key_shards;
CombinePerKey sums the batches of a shard (combiner lifting merges them map-side first).
This is CombinePerKey(sum) per n-gram with the n-grams of a shard carried together:
Python Beam spends microseconds per element, more than counting an n-gram costs; one
element per distinct n-gram per bundle was 2.4x slower end to end here (1M tokens,
K = 5, one DirectRunner worker: 14.8 s vs 6.1 s).

The launching process reads the shards and calls `fgrams.select_top`, then
`FGramSet.save(output_path)`. The global top-S is not taken inside Beam: it is a single
sorted list over all candidates, i.e. one worker holding millions of keys; instead each
written batch keeps only its own top `num_fgrams` (exact: under a total order the global
top S lies inside the union of the per-part top S), so the launcher reads at most
(K-1) x num_key_shards x num_fgrams rows, and never more than the frequent n-grams; it
holds them in memory, (4K + 8) bytes each.

Why the pruning filter may be approximate and the result still exact: an n-gram is
counted at all of its occurrences or at none (the filter looks only at its key), and an
n-gram whose prefix or suffix is infrequent has count < min_count (anti-monotone), so a
filter that lets a few extra keys through only costs counting work, never changes a
count or the frequent set. Two filters (`prune_filter`):
  'hashes' (default)  a sorted array of 64-bit hashes of the frequent (n-1)-grams:
                      8 bytes per frequent key, practically no false positives. The side
                      input is built on one worker and broadcast to all, so it must fit
                      in worker memory (~0.8 GB per 100M frequent (n-1)-grams), and
                      every worker reads it each pass (how well a runner caches side
                      inputs between bundles varies).
  'bloom'             a Bloom filter of 2**bloom_bits_log2 bits (default 2**30 = 128 MiB)
                      whatever the number of keys; fewer bits only means more false
                      positives (more counting), still the same result.
A join (CoGroupByKey of occurrences with the frequent set) would avoid the broadcast but
shuffle every candidate occurrence twice per pass; the Bloom filter bounds memory for
much less. Per document, a pass costs a few numpy calls (~10 us each) on top of the
work per token, so corpora of very short documents count slower per token.

IO: the launching process goes through `scone_jax.paths` (the f-gram set it writes, local
directories it creates); code that runs on workers reads inputs and writes shards through
Beam's `FileSystems`, the IO layer every runner's workers have.

Length: one file of ~1100 lines because a pipeline is read top to bottom: input readers,
the pruning filters, the counting DoFns, the token shard writer and the transform that
chains the passes are each meaningful only next to the others, and remote workers import
this one module.
"""
import argparse
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from typing import Iterable, Iterator, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from scone_jax import corpus
from scone_jax import fgrams
from scone_jax import paths as paths_lib
from scone_jax import token_shards

INPUT_FORMATS = ('text', 'jsonl', 'tokens')
PRUNE_FILTERS = ('hashes', 'bloom')
_METRICS_NAMESPACE = 'fgrams_beam'
_SHARD_GLOB = 'frequent-*.npz'
_TOKEN_STATS_GLOB = 'token-shard-*.json'
# Runners (see _runner_kind) whose workers always see this machine's disk; 'dask' does
# when its scheduler is on this machine (beam_dask.scheduler_is_local).
_LOCAL_RUNNERS = ('direct', 'switchingdirect', 'bundlebaseddirect', 'prism', 'fnapi')


# ----------------------------------------------------------------------------- inputs


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


def _basename(path: str) -> str:
  # Beam paths are '/'-separated on every filesystem (gs://b/x.txt -> x.txt), as
  # corpus.read_text_documents names documents after paths_lib.basename.
  return posixpath.basename(path.rstrip('/'))


def _read_text_file(readable_file) -> Iterator[tuple[str, str]]:
  """(id, text) of one text file's documents, ids '<basename>#<n>' as corpus assigns them."""
  # Whole file at once: the split rule is a regex over the file's text (keep files to a
  # size a worker holds comfortably; many files parallelize, one file does not).
  path = readable_file.metadata.path
  base = _basename(path)
  with readable_file.open(mime_type='application/octet-stream') as f:
    for i, text in enumerate(_text_documents(f, path)):
      yield f'{base}#{i}', text


def _read_jsonl_file(readable_file) -> Iterator[tuple[str, str]]:
  """(id, text) of one .jsonl file's records, as corpus.read_text_documents reads them:
  id = the record's "id" (as str) or '<basename>#<lineno>'; whitespace-only texts skipped."""
  # Line by line (one file per worker, streamed): line numbers need the file read in
  # order, which a splittable text source cannot give.
  path = readable_file.metadata.path
  base = _basename(path)
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
    with FileSystems.create(path, mime_type='application/octet-stream',
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(buf.getvalue())
    paths.append(path)
  return paths


document_digest = token_shards.document_digest


class _TokenizeFn(beam.DoFn):
  """(id, text) -> (id, int32 LE token bytes, UTF-8 bytes of the text, document_digest),
  SentencePiece loaded once per instance."""

  def __init__(self, tokenizer_path: str):
    self._tokenizer_path = tokenizer_path
    self._sp = None
    self._docs = Metrics.counter(_METRICS_NAMESPACE, 'documents')
    self._tokens = Metrics.counter(_METRICS_NAMESPACE, 'tokens')

  def setup(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    # Read through FileSystems so gs:// and other remote paths work on workers.
    with FileSystems.open(self._tokenizer_path, mime_type='application/octet-stream',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())

  def process(self, doc: tuple[str, str]):
    doc_id, text = doc
    ids = np.asarray(self._sp.encode(text), dtype='<i4')
    self._docs.inc()
    self._tokens.inc(ids.size)
    yield doc_id, ids.tobytes(), len(text.encode('utf-8')), document_digest(doc_id, text)


class _DropHeldOutFn(beam.DoFn):
  """Keeps the training documents: (id, text) whose corpus.heldout_score(id) >= fraction."""

  def __init__(self, heldout_fraction: float):
    self._fraction = heldout_fraction
    self._heldout = Metrics.counter(_METRICS_NAMESPACE, 'heldout_documents')

  def process(self, doc: tuple[str, str]):
    if corpus.heldout_score(doc[0]) < self._fraction:
      self._heldout.inc()
      return
    yield doc


# -------------------------------------------------------------------- token shards


def _shard_element(doc: tuple, num_shards: int):
  """A tokenized document -> (shard, (doc_key, id, tokens, text bytes, digest))."""
  key = token_shards.doc_key(doc[0])
  return key % num_shards, (key,) + tuple(doc)


class _WriteTokenShardFn(beam.DoFn):
  """(shard, its documents) -> the shard's .bin (token_shards' format) and a stats JSON.

  Documents are sorted by (doc_key, id) in this worker's memory; None values are the
  placeholders that give every shard, even an empty one, a group and so a file.
  """

  def __init__(self, out_dir: str, stats_dir: str, num_shards: int, dtype: str, eos_id: int):
    self._out_dir = out_dir
    self._stats_dir = stats_dir
    self._num_shards = num_shards
    self._dtype = dtype
    self._eos_id = eos_id

  def process(self, shard_and_docs):
    shard, docs = shard_and_docs
    docs = sorted((d for d in docs if d is not None), key=lambda d: (d[0], d[1]))
    for a, b in zip(docs, docs[1:]):
      if a[1] == b[1]:
        raise ValueError(f'document id {a[1]!r} appears twice; token shards place documents '
                         'by id, so ids must be unique (give JSONL records distinct "id"s, or '
                         'none: then ids are <file>#<line>)')
    dtype = np.dtype(self._dtype)
    data = b''.join(token_shards.document_tokens(np.frombuffer(d[2], '<i4'), self._eos_id,
                                                 dtype, d[1]).tobytes() for d in docs)
    # Deterministic names: a retried bundle rewrites the same files.
    path = FileSystems.join(self._out_dir, token_shards.shard_name(shard, self._num_shards))
    with FileSystems.create(path, mime_type='application/octet-stream',
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(data)
    stats = {'shard': shard, 'num_tokens': len(data) // dtype.itemsize, 'num_docs': len(docs),
             'num_bytes': int(sum(d[3] for d in docs)),
             'docs': hashlib.sha256(b''.join(d[4] for d in docs)).hexdigest()}
    stats_path = FileSystems.join(self._stats_dir, f'token-shard-{shard:05d}.json')
    with FileSystems.create(stats_path, mime_type='application/json',
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(json.dumps(stats).encode('utf-8'))
    yield stats


shards_digest = token_shards.shards_digest
_combine_shard_digests = token_shards.combine_shard_digests


# ---------------------------------------------------------------------- key filters

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(h: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer (uint64 arithmetic wraps, which is what we want)."""
  h = (h ^ (h >> np.uint64(30))) * _MIX1
  h = (h ^ (h >> np.uint64(27))) * _MIX2
  return h ^ (h >> np.uint64(31))


def _hash_rows(rows_MxK: np.ndarray) -> np.ndarray:
  """64-bit hash of each row of int32 token ids; same value wherever it is computed."""
  seed = (rows_MxK.shape[1] * int(_GOLDEN)) % (1 << 64)  # Python ints: no overflow warning
  h_M = np.full(rows_MxK.shape[0], seed, np.uint64)
  for j in range(rows_MxK.shape[1]):
    h_M = _mix64(h_M ^ rows_MxK[:, j].astype(np.uint32).astype(np.uint64)) + _GOLDEN
  return _mix64(h_M)


def _key_rows(keys_M: np.ndarray, n: int) -> np.ndarray:
  """Keys (void dtype, n int32 LE each) -> their token rows, int32 [M, n]."""
  return np.frombuffer(keys_M.tobytes(), dtype='<i4').reshape(keys_M.size, n)


class _HashSetFilter:
  """Sorted unique 64-bit hashes of the frequent keys; false positives only on collision."""

  def __init__(self, hashes: np.ndarray):
    self.hashes = hashes

  def __len__(self):
    return self.hashes.size

  def contains(self, h_M: np.ndarray) -> np.ndarray:
    if not self.hashes.size:
      return np.zeros(h_M.shape, bool)
    idx_M = np.minimum(np.searchsorted(self.hashes, h_M), self.hashes.size - 1)
    return self.hashes[idx_M] == h_M


def _bloom_positions(h_M: np.ndarray, num_bits: int, num_hashes: int) -> list[np.ndarray]:
  # Double hashing; num_bits is a power of two so `& mask` is the modulus.
  mask = np.uint64(num_bits - 1)
  step_M = _mix64(h_M ^ _MIX2) | np.uint64(1)
  return [(h_M + np.uint64(i) * step_M) & mask for i in range(num_hashes)]


class _BloomFilter:
  """Bloom filter over the frequent keys' hashes; fixed memory, some false positives."""

  def __init__(self, bits: np.ndarray, num_hashes: int, num_keys: int):
    self.bits = bits
    self.num_hashes = num_hashes
    self.num_keys = num_keys

  def __len__(self):
    return self.num_keys

  def contains(self, h_M: np.ndarray) -> np.ndarray:
    ok_M = np.ones(h_M.shape, bool)
    for pos_M in _bloom_positions(h_M, self.bits.size * 8, self.num_hashes):
      ok_M &= ((self.bits[pos_M >> np.uint64(3)] >> (pos_M & np.uint64(7))) & 1).astype(bool)
    return ok_M


class _BuildFilterFn(beam.CombineFn):
  """Frequent (keys, counts) batches of one length -> _HashSetFilter | _BloomFilter."""

  def __init__(self, n: int, kind: str, bloom_bits_log2: int, bloom_num_hashes: int):
    self._n = n
    self._kind = kind
    self._num_bits = 1 << bloom_bits_log2
    self._num_hashes = bloom_num_hashes

  # Accumulator: [list of sorted hash arrays | Bloom bits (None until needed), num keys].
  def create_accumulator(self):
    return [[] if self._kind == 'hashes' else None, 0]

  def add_input(self, acc, keys_and_counts):
    keys_M, _ = keys_and_counts
    h_M = _hash_rows(_key_rows(keys_M, self._n))
    acc[1] += keys_M.size
    if self._kind == 'hashes':
      acc[0].append(np.unique(h_M))
      return acc
    if acc[0] is None:
      acc[0] = np.zeros(self._num_bits // 8, np.uint8)
    for pos_M in _bloom_positions(h_M, self._num_bits, self._num_hashes):
      np.bitwise_or.at(acc[0], (pos_M >> np.uint64(3)).astype(np.int64),
                       np.uint8(1) << (pos_M & np.uint64(7)).astype(np.uint8))
    return acc

  def compact(self, acc):
    if self._kind == 'hashes' and len(acc[0]) > 1:
      acc[0] = [np.unique(np.concatenate(acc[0]))]
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for acc in accs:
      out[1] += acc[1]
      if self._kind == 'hashes':
        out[0].extend(acc[0])
      elif acc[0] is not None:
        out[0] = acc[0].copy() if out[0] is None else np.bitwise_or(out[0], acc[0])
    return self.compact(out)

  def extract_output(self, acc):
    acc = self.compact(acc)
    if self._kind == 'hashes':
      return _HashSetFilter(acc[0][0] if acc[0] else np.zeros(0, np.uint64))
    bits = acc[0] if acc[0] is not None else np.zeros(self._num_bits // 8, np.uint8)
    return _BloomFilter(bits, self._num_hashes, acc[1])


# ------------------------------------------------------------------------- counting


def candidate_rows(tokens_L: np.ndarray, n: int, prev_filter=None) -> np.ndarray:
  """The n-grams of one document whose (n-1)-prefix and (n-1)-suffix pass `prev_filter`
  (all n-grams when n == 1), one row per occurrence: int32 [M, n]."""
  if tokens_L.size < n:
    return np.zeros((0, n), np.int32)
  win_MxN = sliding_window_view(tokens_L, n)
  if n > 1:
    ok_P = prev_filter.contains(_hash_rows(sliding_window_view(tokens_L, n - 1)))
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
  shard_M = _hash_rows(_key_rows(keys_M, n)) % np.uint64(num_shards)
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
    self._occurrences = Metrics.counter(_METRICS_NAMESPACE, f'pass{n}_candidate_occurrences')

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
    self._frequent = Metrics.counter(_METRICS_NAMESPACE, f'pass{n}_frequent')

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
    ngrams_MxK[:, :self._n] = _key_rows(keys_M, self._n)
    order_M = fgrams.rank_order(ngrams_MxK, counts_M)[:self._keep]
    buf = io.BytesIO()
    np.savez(buf, ngrams=ngrams_MxK[order_M], counts=counts_M[order_M])
    # A deterministic name: a retried bundle overwrites the file with the same rows.
    path = FileSystems.join(self._out_dir, f'frequent-n{self._n}-{shard:05d}.npz')
    with FileSystems.create(path, mime_type='application/octet-stream',
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(buf.getvalue())
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
                       | f'Pass{n}Filter' >> beam.CombineGlobally(_BuildFilterFn(
                           n, self._prune_filter, self._bloom_bits_log2,
                           self._bloom_num_hashes)))
    return frequent


# -------------------------------------------------------------------------- driver


def _documents(p, paths, input_format, tokenizer_path, heldout_fraction=0.0):
  """Token documents: int32 LE bytes ('tokens'), else (id, tokens, text bytes, digest)
  tuples of the training documents (held-out ones dropped before tokenizing)."""
  files = p | 'InputFiles' >> beam.Create(paths) | 'Open' >> fileio.ReadMatches()
  if input_format == 'tokens':
    return files | 'ReadTokenShards' >> beam.FlatMap(_read_token_shard)
  reader = _read_jsonl_file if input_format == 'jsonl' else _read_text_file
  texts = files | 'ReadDocuments' >> beam.FlatMap(reader)
  if heldout_fraction > 0:
    texts = texts | 'DropHeldOut' >> beam.ParDo(_DropHeldOutFn(heldout_fraction))
  return texts | 'Tokenize' >> beam.ParDo(_TokenizeFn(tokenizer_path))


def _doc_tokens(doc: tuple) -> bytes:
  return doc[1]


def _write_token_shards(docs, out_dir, stats_dir, num_shards, dtype, eos_id):
  """Tokenized documents -> token shard files in out_dir (every shard, empty ones too)."""
  keyed = docs | 'ShardKey' >> beam.Map(_shard_element, num_shards)
  every_shard = (docs.pipeline
                 | 'EveryShard' >> beam.Create([(s, None) for s in range(num_shards)]))
  return ((keyed, every_shard)
          | 'WithEmptyShards' >> beam.Flatten()
          | 'GroupShards' >> beam.GroupByKey()
          | 'WriteTokenShards' >> beam.ParDo(
              _WriteTokenShardFn(out_dir, stats_dir, num_shards, dtype, eos_id)))


def expand_input_patterns(input_patterns: Sequence[str]) -> list[str]:
  """Sorted unique paths of the files the patterns match; error if a pattern matches none."""
  paths = set()
  for pat in input_patterns:
    matched = [m.path for m in FileSystems.match([pat])[0].metadata_list]
    if not matched:
      raise ValueError(f'input pattern {pat!r} matches no file; check the path / glob')
    paths.update(matched)
  return sorted(paths)


def _runner_kind(runner: Optional[str]) -> str:
  """'DirectRunner', 'apache_beam.runners.dask.dask_runner.DaskRunner' -> 'direct', 'dask'."""
  return re.sub('runner$', '', (runner or 'direct').rsplit('.', 1)[-1].lower())


def _check_args(input_patterns, input_format, output_path, max_len, min_count, num_fgrams,
                tokenizer_path, prune_filter, bloom_bits_log2, num_key_shards,
                shards_output=None, num_token_shards=16, heldout_fraction=0.0):
  if input_format not in INPUT_FORMATS:
    raise ValueError(f'input_format={input_format!r}; use one of {INPUT_FORMATS}')
  if not input_patterns:
    raise ValueError('no input: pass input_patterns (--input=PATTERN[,PATTERN...])')
  if not output_path and not shards_output:
    raise ValueError('no output: pass output_path (--output=PATH.npz) and/or '
                     'shards_output (--shards_output=DIR)')
  if output_path:
    if max_len < 2:
      raise ValueError(f'max_len={max_len}: f-grams have 2 <= n <= max_len, so max_len '
                       'must be >= 2')
    if min_count < 1:
      raise ValueError(f'min_count={min_count} must be >= 1')
    if num_fgrams is None or num_fgrams < 1:
      raise ValueError(f'num_fgrams={num_fgrams} must be >= 1')
  if input_format in ('text', 'jsonl'):
    if not tokenizer_path:
      raise ValueError(f'input_format={input_format!r} needs tokenizer_path '
                       '(--tokenizer=PATH.model, a SentencePiece model)')
    if not FileSystems.exists(tokenizer_path):
      raise ValueError(f'tokenizer_path {tokenizer_path!r} does not exist')
  elif shards_output or heldout_fraction:
    raise ValueError(f'input_format={input_format!r} has no document ids: token shards '
                     '(shards_output) and the held-out split (heldout_fraction) place '
                     'documents by id; use text or jsonl input')
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f'heldout_fraction={heldout_fraction} must be in [0, 1)')
  if num_token_shards < 1:
    raise ValueError(f'num_token_shards={num_token_shards} must be >= 1')
  if prune_filter not in PRUNE_FILTERS:
    raise ValueError(f'prune_filter={prune_filter!r}; use one of {PRUNE_FILTERS}')
  if not 6 <= bloom_bits_log2 <= 40:
    raise ValueError(f'bloom_bits_log2={bloom_bits_log2} must be in [6, 40]')
  if num_key_shards < 1:
    raise ValueError(f'num_key_shards={num_key_shards} must be >= 1')


def _log_metrics(result, max_len):
  try:
    counters = result.metrics().query(
        MetricsFilter().with_namespace(_METRICS_NAMESPACE))['counters']
  except Exception as e:  # pylint: disable=broad-except
    logging.info('fgrams_beam: runner reports no metrics (%s)', e)
    return {}
  values = {}
  for c in counters:
    value = c.committed if c.committed is not None else c.attempted
    values[c.key.metric.name] = values.get(c.key.metric.name, 0) + (value or 0)
  if 'documents' in values:
    logging.info('fgrams_beam: tokenized %d documents, %d tokens (%d held-out documents '
                 'dropped)', values['documents'], values.get('tokens', 0),
                 values.get('heldout_documents', 0))
  for n in range(1, max_len + 1):
    logging.info('fgrams_beam: pass %d counted %d candidate occurrences, %d frequent '
                 '%d-grams', n, values.get(f'pass{n}_candidate_occurrences', 0),
                 values.get(f'pass{n}_frequent', 0), n)
  return values


def read_frequent_shards(shard_dir: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates the `frequent-*.npz` shards of a run: (ngrams_MxK int32, counts_M)."""
  paths = sorted(m.path for m in
                 FileSystems.match([FileSystems.join(shard_dir, _SHARD_GLOB)])[0].metadata_list)
  rows, counts = [np.zeros((0, max_len), np.int32)], [np.zeros(0, np.int64)]
  for path in paths:
    with FileSystems.open(path, mime_type='application/octet-stream',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
      with np.load(io.BytesIO(f.read())) as z:
        rows.append(z['ngrams'])
        counts.append(z['counts'])
  return np.concatenate(rows), np.concatenate(counts)


def _save(fgram_set: 'fgrams.FGramSet', output_path: str) -> None:
  """The f-gram set, written by the driver through the project's IO layer (local or gs://)."""
  if not paths_lib.is_cloud(output_path):
    paths_lib.makedirs(paths_lib.dirname(paths_lib.abspath(output_path)))
  fgram_set.save(output_path)


def run(*, input_patterns: Union[str, Sequence[str]], input_format: str,
        output_path: Optional[str] = None, max_len: int = 5, min_count: int = 2,
        num_fgrams: Optional[int] = None,
        tokenizer_path: Optional[str] = None,
        pipeline_args: Optional[Sequence[str]] = None,
        temp_dir: Optional[str] = None,
        prune_filter: str = 'hashes',
        bloom_bits_log2: int = 30,
        bloom_num_hashes: int = 4,
        num_key_shards: int = 256,
        max_buffered_rows: int = 1 << 22,
        shards_output: Optional[str] = None,
        num_token_shards: int = 16,
        heldout_fraction: float = 0.0,
        keep_temp: bool = False) -> Optional['fgrams.FGramSet']:
  """Extracts the f-gram set with a Beam pipeline and saves it to `output_path`; with
  `shards_output`, the same pass also writes the training documents as token shards.

  Args:
    input_patterns: file globs (a list, or one string with comma-separated globs).
    input_format: 'text' | 'jsonl' | 'tokens' (see the module docstring).
    output_path: where `FGramSet.save` writes the result; None / '' with shards_output:
      only the token shards are written.
    max_len, min_count, num_fgrams: as in `fgrams.extract`.
    tokenizer_path: SentencePiece model for 'text' / 'jsonl'.
    pipeline_args: standard Beam options, e.g. ['--runner=FlinkRunner', ...];
      DirectRunner when no runner is named.
    temp_dir: where workers write the frequent-n-gram shards; must be visible to the
      workers and to this process (gs://... for Dataflow). Default: --temp_location,
      else a local temporary directory (only for runners whose workers share this disk:
      the direct ones, and Dask with a scheduler on this machine).
    prune_filter: 'hashes' or 'bloom' (see the module docstring; same result).
    bloom_bits_log2, bloom_num_hashes: Bloom filter size and hash count.
    num_key_shards: n-grams are hashed into this many groups per pass; one group's
      distinct candidates are summed in one worker's memory, so raise it with the
      corpus (~10M distinct candidate n-grams per group is comfortable).
    max_buffered_rows: n-gram occurrences a counting DoFn buffers before it counts
      and emits them (int32 [rows, n] in memory).
    shards_output: a directory (any Beam filesystem the workers reach) for the training
      documents as token shards, the files `token_shards.write_shards` writes for the
      same documents and tokenizer; needs 'text' / 'jsonl' input and a tokenizer with
      pad 0 and EOS 1 (`corpus.Tokenizer`).
    num_token_shards: the shards' count; one shard's documents are sorted in one worker's
      memory.
    heldout_fraction: documents with `corpus.heldout_score(id) < heldout_fraction` are
      dropped before tokenizing: neither counted nor written (see the module docstring
      for how this differs from `corpus.split_documents`).
    keep_temp: keep the shard files (for inspection) instead of deleting them.

  Returns:
    The FGramSet, identical to `fgrams.extract` over the same token documents (None
    when only token shards were asked for).
  """
  if isinstance(input_patterns, str):
    input_patterns = [p for p in input_patterns.split(',') if p]
  input_patterns = list(input_patterns or [])
  _check_args(input_patterns, input_format, output_path, max_len, min_count, num_fgrams,
              tokenizer_path, prune_filter, bloom_bits_log2, num_key_shards,
              shards_output, num_token_shards, heldout_fraction)
  paths = expand_input_patterns(input_patterns)
  tokenizer = None
  if shards_output:
    # Loaded here (project IO layer) for what the index records; fails early on a model
    # training cannot use (pad 0 and EOS 1 are required).
    tokenizer = corpus.Tokenizer(tokenizer_path)
  options = PipelineOptions(list(pipeline_args or []))
  runner = options.view_as(StandardOptions).runner
  kind = _runner_kind(runner)
  workers_see_local_disk = kind in _LOCAL_RUNNERS
  runner_instance = None
  if kind == 'dask':
    # Beam's own DaskRunner silently drops data in this pipeline (see beam_dask); the
    # short name 'DaskRunner' is not even registered in Beam.
    from scone_jax import beam_dask  # pylint: disable=g-import-not-at-top
    runner_instance = beam_dask.DaskRunner()
    workers_see_local_disk = beam_dask.scheduler_is_local(options)
  if temp_dir is None:
    temp_dir = options.view_as(GoogleCloudOptions).temp_location
  own_temp = None
  if temp_dir is None:
    if not workers_see_local_disk:
      raise ValueError(f'runner {runner} needs a temp_dir every worker and this process '
                       'can reach (e.g. gs://bucket/tmp); pass temp_dir / --temp_dir or '
                       '--temp_location')
    temp_dir = own_temp = tempfile.mkdtemp(prefix='fgrams_beam-')
  shard_dir = FileSystems.join(temp_dir, f'fgrams_beam-{uuid.uuid4().hex[:12]}')
  if '://' not in shard_dir:
    paths_lib.makedirs(shard_dir)
  if shards_output:
    paths_lib.makedirs(shards_output)
    index_path = paths_lib.join(shards_output, token_shards.INDEX)
    if paths_lib.exists(index_path):
      # A directory without an index is unfinished (token_shards' rule) while we write.
      paths_lib.remove(index_path)

  logging.info('fgrams_beam: %s input, %d files from %s, max_len=%d min_count=%d '
               'num_fgrams=%s, heldout_fraction=%g, runner=%s, shards -> %s, token shards '
               '-> %s', input_format, len(paths), input_patterns, max_len, min_count,
               num_fgrams, heldout_fraction, runner or 'DirectRunner', shard_dir,
               shards_output)
  fgram_set = None
  try:
    t0 = time.time()
    p = beam.Pipeline(runner=runner_instance, options=options)
    docs = (_documents(p, paths, input_format, tokenizer_path, heldout_fraction)
            | 'Rebalance' >> beam.Reshuffle())
    if shards_output:
      _write_token_shards(docs, shards_output, shard_dir, num_token_shards,
                          token_shards.token_dtype(tokenizer.vocab_size).str,
                          int(tokenizer.eos_id))
    if output_path:
      if input_format != 'tokens':
        docs = docs | 'Tokens' >> beam.Map(_doc_tokens)
      frequent = docs | 'Count' >> CountFrequentNGrams(
          max_len=max_len, min_count=min_count, prune_filter=prune_filter,
          bloom_bits_log2=bloom_bits_log2, bloom_num_hashes=bloom_num_hashes,
          num_key_shards=num_key_shards, max_buffered_rows=max_buffered_rows)
      for n in range(2, max_len + 1):
        _ = frequent[n] | f'Write{n}' >> beam.ParDo(
            _WriteShardFn(n, shard_dir, max_len, num_fgrams))
    result = p.run()
    state = result.wait_until_finish()
    if state is not None and state != PipelineState.DONE:
      raise RuntimeError(f'the f-gram pipeline ended in state {state}; see the runner '
                         'logs')
    logging.info('fgrams_beam: pipeline finished in %.1fs', time.time() - t0)
    metrics = _log_metrics(result, max_len if output_path else 0)

    if shards_output:
      request = {'writer': 'fgrams_beam', 'inputs': input_patterns,
                 'input_format': input_format, 'heldout_fraction': heldout_fraction,
                 'tokenizer_fingerprint': tokenizer.fingerprint,
                 'num_shards': num_token_shards}
      _write_token_index(shards_output, shard_dir, num_token_shards, tokenizer, request)
      if (heldout_fraction > 0 and 'documents' in metrics
          and not metrics.get('heldout_documents')):
        logging.warning(
            'fgrams_beam: no document scores below heldout_fraction=%g, so none was held '
            'out; corpus.split_documents would still hold out the lowest-scoring one, so '
            'a run evaluating on that split would evaluate on a training document. Raise '
            'heldout_fraction or use separate eval files.', heldout_fraction)
    if output_path:
      ngrams_MxK, counts_M = read_frequent_shards(shard_dir, max_len)
      logging.info('fgrams_beam: %d candidate f-grams read back (each shard keeps its top '
                   '%d)', counts_M.size, num_fgrams)
      fgram_set = fgrams.select_top(ngrams_MxK, counts_M, max_len=max_len,
                                    num_fgrams=num_fgrams)
      _save(fgram_set, output_path)
      logging.info('fgrams_beam: %d f-grams (fingerprint %s) saved to %s', len(fgram_set),
                   fgram_set.fingerprint, output_path)
  finally:
    if not keep_temp:
      try:
        _delete_shards(shard_dir, own_temp)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('fgrams_beam: could not delete %s (%s)', shard_dir, e)
  return fgram_set


def _write_token_index(directory: str, stats_dir: str, num_shards: int, tokenizer,
                       request: dict) -> dict:
  """The token shards' index.json, from the writers' per-shard stats (written last)."""
  stats = {}
  for m in FileSystems.match([FileSystems.join(stats_dir, _TOKEN_STATS_GLOB)])[0].metadata_list:
    with FileSystems.open(m.path, mime_type='application/json',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
      one = json.loads(f.read().decode('utf-8'))
    stats[one['shard']] = one
  missing = sorted(set(range(num_shards)) - set(stats))
  if missing:
    raise RuntimeError(f'the pipeline finished but wrote no stats for token shards {missing[:10]}'
                       f' (of {num_shards}) in {stats_dir}; the runner lost output')
  shards = [stats[s] for s in range(num_shards)]
  dtype = token_shards.token_dtype(tokenizer.vocab_size)
  index = token_shards.write_index(
      directory, dtype=dtype.str, eos_id=int(tokenizer.eos_id), num_shards=num_shards,
      shard_tokens=[s['num_tokens'] for s in shards],
      num_docs=sum(s['num_docs'] for s in shards),
      num_bytes=sum(s['num_bytes'] for s in shards),
      tokenizer=tokenizer.fingerprint,
      docs=_combine_shard_digests([s['docs'] for s in shards]),
      request=request, writer='beam')
  logging.info('fgrams_beam: token shards in %s: %d documents, %d tokens in %d shards',
               directory, index['num_docs'], index['num_tokens'], num_shards)
  return index


def _delete_shards(shard_dir: str, own_temp: Optional[str]) -> None:
  # Object stores have no directories: delete the files, then any local directory.
  matched = FileSystems.match([FileSystems.join(shard_dir, g)
                               for g in (_SHARD_GLOB, _TOKEN_STATS_GLOB)])
  found = [m.path for r in matched for m in r.metadata_list]
  if found:
    FileSystems.delete(found)
  local_dir = own_temp or (shard_dir if '://' not in shard_dir else None)
  if local_dir:
    shutil.rmtree(local_dir, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI: known flags below; every other argument goes to Beam's PipelineOptions."""
  parser = argparse.ArgumentParser(
      allow_abbrev=False,  # never let a Beam option be read as an abbreviation of ours
      description='SCONE f-gram extraction (and token shards) as an Apache Beam pipeline. '
                  'Unknown arguments (e.g. --runner=DataflowRunner) are Beam pipeline '
                  'options.')
  parser.add_argument('--input', action='append', default=[],
                      help='file glob(s); repeat or comma-separate')
  parser.add_argument('--input_format', default='text', choices=INPUT_FORMATS)
  parser.add_argument('--output', default=None,
                      help='FGramSet path (.npz); may be left out with --shards_output')
  parser.add_argument('--max_len', type=int, default=5)
  parser.add_argument('--min_count', type=int, default=2)
  parser.add_argument('--num_fgrams', type=int, default=None, help='required with --output')
  parser.add_argument('--tokenizer', default=None, help='SentencePiece .model')
  parser.add_argument('--temp_dir', default=None)
  parser.add_argument('--prune_filter', default='hashes', choices=PRUNE_FILTERS)
  parser.add_argument('--bloom_bits_log2', type=int, default=30)
  parser.add_argument('--num_key_shards', type=int, default=256)
  parser.add_argument('--shards_output', default=None,
                      help='also write the training documents as token shards here')
  parser.add_argument('--num_token_shards', type=int, default=16)
  parser.add_argument('--heldout_fraction', type=float, default=0.0,
                      help='drop documents with corpus.heldout_score(id) below this')
  parser.add_argument('--keep_temp', action='store_true')
  args, pipeline_args = parser.parse_known_args(argv)
  # force: importing apache_beam may already have configured the root logger.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      force=True)
  patterns = [p for arg in args.input for p in arg.split(',') if p]
  t0 = time.time()
  fgram_set = run(input_patterns=patterns, input_format=args.input_format,
                  output_path=args.output, max_len=args.max_len, min_count=args.min_count,
                  num_fgrams=args.num_fgrams, tokenizer_path=args.tokenizer,
                  pipeline_args=pipeline_args, temp_dir=args.temp_dir,
                  prune_filter=args.prune_filter, bloom_bits_log2=args.bloom_bits_log2,
                  num_key_shards=args.num_key_shards, shards_output=args.shards_output,
                  num_token_shards=args.num_token_shards,
                  heldout_fraction=args.heldout_fraction, keep_temp=args.keep_temp)
  summary = {'output': args.output, 'seconds': round(time.time() - t0, 2)}
  if fgram_set is not None:
    summary.update(num_fgrams=len(fgram_set), fingerprint=fgram_set.fingerprint)
  if args.shards_output:
    index = token_shards.read_index(args.shards_output)
    summary.update(shards_output=args.shards_output, num_docs=index['num_docs'],
                   num_tokens=index['num_tokens'])
  print(json.dumps(summary))


if __name__ == '__main__':
  # Under `python -m` this file is __main__; run the importable module's main so pickled
  # DoFns and filters name scone_jax.fgrams_beam, which workers can import.
  from scone_jax import fgrams_beam  # pylint: disable=g-import-not-at-top,import-self
  fgrams_beam.main()
