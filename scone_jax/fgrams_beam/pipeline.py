"""The launcher: checks the request, sets up the runner, builds and runs the one pipeline,
then finishes on this process (token shards' index, top-S selection, the saved set).

`run` reads as its stages; each stage is a function below, in the order it runs.
"""
import dataclasses
import logging
import re
import shutil
import tempfile
import time
import uuid
from typing import Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState

from scone_jax import fgrams
from scone_jax import paths as paths_lib
from scone_jax import token_shards
from scone_jax import tokenizer as tokenizer_lib
from scone_jax.fgrams_beam import counting
from scone_jax.fgrams_beam import filters
from scone_jax.fgrams_beam import readers
from scone_jax.fgrams_beam import shards
from scone_jax.fgrams_beam import tokenizing
from scone_jax.fgrams_beam._common import METRICS_NAMESPACE

# Runners (see _runner_kind) whose workers always see this machine's disk; 'dask' does
# when its scheduler is on this machine (beam_dask.scheduler_is_local).
_LOCAL_RUNNERS = ('direct', 'switchingdirect', 'bundlebaseddirect', 'prism', 'fnapi')


@dataclasses.dataclass(frozen=True)
class Request:
  """What to extract and write (the arguments of `run`, checked)."""
  input_patterns: tuple
  input_format: str
  output_path: Optional[str]
  max_len: int
  min_count: int
  num_fgrams: Optional[int]
  tokenizer_path: Optional[str]
  prune_filter: str
  bloom_bits_log2: int
  bloom_num_hashes: int
  num_key_shards: int
  max_buffered_rows: int
  shards_output: Optional[str]
  num_token_shards: int
  heldout_fraction: float
  tokenizer_kind: str = ''
  tokenizer_special_ids: tuple = ()   # sorted (name, id) pairs
  text_field: str = 'text'

  def check(self):
    """ValueError naming the first bad argument."""
    if self.input_format not in readers.INPUT_FORMATS:
      raise ValueError(f'input_format={self.input_format!r}; use one of {readers.INPUT_FORMATS}')
    if not self.input_patterns:
      raise ValueError('no input: pass input_patterns (--input=PATTERN[,PATTERN...])')
    if not self.output_path and not self.shards_output:
      raise ValueError('no output: pass output_path (--output=PATH.npz) and/or '
                       'shards_output (--shards_output=DIR)')
    if self.output_path:
      if self.max_len < 2:
        raise ValueError(f'max_len={self.max_len}: f-grams have 2 <= n <= max_len, so max_len '
                         'must be >= 2')
      if self.min_count < 1:
        raise ValueError(f'min_count={self.min_count} must be >= 1')
      if self.num_fgrams is None or self.num_fgrams < 1:
        raise ValueError(f'num_fgrams={self.num_fgrams} must be >= 1')
    if self.input_format != 'tokens':
      if not self.tokenizer_path:
        raise ValueError(f'input_format={self.input_format!r} needs tokenizer_path '
                         '(--tokenizer=PATH: a SentencePiece .model or a tokenizer.json)')
      if not FileSystems.exists(self.tokenizer_path):
        raise ValueError(f'tokenizer_path {self.tokenizer_path!r} does not exist')
    elif self.shards_output or self.heldout_fraction:
      raise ValueError(f'input_format={self.input_format!r} has no document ids: token shards '
                       '(shards_output) and the held-out split (heldout_fraction) place '
                       'documents by id; use a text input format')
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f'heldout_fraction={self.heldout_fraction} must be in [0, 1)')
    if self.num_token_shards < 1:
      raise ValueError(f'num_token_shards={self.num_token_shards} must be >= 1')
    if self.prune_filter not in filters.PRUNE_FILTERS:
      raise ValueError(f'prune_filter={self.prune_filter!r}; use one of {filters.PRUNE_FILTERS}')
    if not 6 <= self.bloom_bits_log2 <= 40:
      raise ValueError(f'bloom_bits_log2={self.bloom_bits_log2} must be in [6, 40]')
    if self.num_key_shards < 1:
      raise ValueError(f'num_key_shards={self.num_key_shards} must be >= 1')


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
        keep_temp: bool = False,
        tokenizer_kind: str = '',
        tokenizer_special_ids: Optional[dict] = None,
        text_field: str = 'text') -> Optional['fgrams.FGramSet']:
  """Extracts the f-gram set with a Beam pipeline and saves it to `output_path`; with
  `shards_output`, the same pass also writes the training documents as token shards.

  Args:
    input_patterns: file globs (a list, or one string with comma-separated globs).
    input_format: one of `readers.INPUT_FORMATS` (see the package docstring).
    output_path: where `FGramSet.save` writes the result; None / '' with shards_output:
      only the token shards are written.
    max_len, min_count, num_fgrams: as in `fgrams.extract`.
    tokenizer_path: the tokenizer for text input (`tokenizer.load`: a SentencePiece .model
      or a Hugging Face tokenizer.json).
    pipeline_args: standard Beam options, e.g. ['--runner=FlinkRunner', ...];
      DirectRunner when no runner is named.
    temp_dir: where workers write the frequent-n-gram shards; must be visible to the
      workers and to this process (gs://... for Dataflow). Default: --temp_location,
      else a local temporary directory (only for runners whose workers share this disk:
      the direct ones, and Dask with a scheduler on this machine).
    prune_filter: 'hashes' or 'bloom' (see the package docstring; same result).
    bloom_bits_log2, bloom_num_hashes: Bloom filter size and hash count.
    num_key_shards: n-grams are hashed into this many groups per pass; one group's
      distinct candidates are summed in one worker's memory, so raise it with the
      corpus (~10M distinct candidate n-grams per group is comfortable).
    max_buffered_rows: n-gram occurrences a counting DoFn buffers before it counts
      and emits them (int32 [rows, n] in memory).
    shards_output: a directory (any Beam filesystem the workers reach) for the training
      documents as token shards, the files `token_shards.write_shards` writes for the
      same documents and tokenizer; needs text input (documents with ids).
    num_token_shards: the shards' count; one shard's documents are sorted in one worker's
      memory.
    heldout_fraction: documents with `corpus.heldout_score(id) < heldout_fraction` are
      dropped before tokenizing: neither counted nor written (see the package docstring
      for how this differs from `corpus.split_documents`).
    keep_temp: keep the shard files (for inspection) instead of deleting them.
    tokenizer_kind: 'sentencepiece' | 'huggingface' ('' = by the file name).
    tokenizer_special_ids: {'eos_id': ID, ...} overriding the file's (`tokenizer.load`).
    text_field: the text field / column of JSONL, Parquet, Arrow and ArrayRecord input
      (`corpus.text_field`).

  Returns:
    The FGramSet, identical to `fgrams.extract` over the same token documents (None
    when only token shards were asked for).
  """
  if isinstance(input_patterns, str):
    input_patterns = [p for p in input_patterns.split(',') if p]
  request = Request(tuple(input_patterns or ()), input_format, output_path, max_len,
                    min_count, num_fgrams, tokenizer_path, prune_filter, bloom_bits_log2,
                    bloom_num_hashes, num_key_shards, max_buffered_rows, shards_output,
                    num_token_shards, heldout_fraction, tokenizer_kind,
                    tuple(sorted((tokenizer_special_ids or {}).items())), text_field)
  request.check()
  paths = readers.expand_input_patterns(request.input_patterns)
  # Loaded here (project IO layer) for what the shards' index records; fails early on a
  # tokenizer training cannot use.
  tokenizer = (tokenizer_lib.load(tokenizer_path, tokenizer_kind, tokenizer_special_ids)
               if shards_output else None)
  options, runner_instance, temp_dir, own_temp = _runner_setup(pipeline_args, temp_dir)
  work_dir = _make_work_dir(temp_dir)
  if shards_output:
    shards.start_token_shards(shards_output)
  _log_start(request, paths, options, work_dir)
  fgram_set = None
  try:
    result = _build_and_run(request, paths, tokenizer, options, runner_instance, work_dir)
    metrics = _log_metrics(result, max_len if output_path else 0)
    if shards_output:
      _finish_token_shards(request, tokenizer, work_dir, metrics)
    if output_path:
      fgram_set = _select_and_save(request, work_dir)
  finally:
    if not keep_temp:
      _delete_work_dir(work_dir, own_temp)
  return fgram_set


def _runner_kind(runner: Optional[str]) -> str:
  """'DirectRunner', 'apache_beam.runners.dask.dask_runner.DaskRunner' -> 'direct', 'dask'."""
  return re.sub('runner$', '', (runner or 'direct').rsplit('.', 1)[-1].lower())


def _runner_setup(pipeline_args, temp_dir):
  """(options, a runner instance or None, the temp dir, the temp dir we made or None)."""
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
  return options, runner_instance, temp_dir, own_temp


def _make_work_dir(temp_dir: str) -> str:
  """This run's directory for the frequent-n-gram shards and the token shards' stats."""
  work_dir = FileSystems.join(temp_dir, f'fgrams_beam-{uuid.uuid4().hex[:12]}')
  if '://' not in work_dir:
    paths_lib.makedirs(work_dir)
  return work_dir


def _log_start(request: Request, paths, options, work_dir):
  logging.info('fgrams_beam: %s input, %d files from %s, max_len=%d min_count=%d '
               'num_fgrams=%s, heldout_fraction=%g, runner=%s, shards -> %s, token shards '
               '-> %s', request.input_format, len(paths), list(request.input_patterns),
               request.max_len, request.min_count, request.num_fgrams, request.heldout_fraction,
               options.view_as(StandardOptions).runner or 'DirectRunner', work_dir,
               request.shards_output)


def _build_and_run(request: Request, paths, tokenizer, options, runner_instance, work_dir):
  """The one pipeline, all passes (one job start; the runner orders the passes by their
  side-input dependencies):

    read -> [drop held-out -> tokenize] -> Reshuffle -> token shards (with shards_output)
                                                     -> count passes 1..K -> frequent .npz
  """
  t0 = time.time()
  p = beam.Pipeline(runner=runner_instance, options=options)
  docs = readers.read_documents(p, paths, request.input_format, request.text_field)
  if request.input_format != 'tokens':
    docs = tokenizing.tokenize_documents(docs, request.tokenizer_path, request.heldout_fraction,
                                         request.tokenizer_kind,
                                         dict(request.tokenizer_special_ids))
  # Fusion break: tokenize once, rebalance, then two branches of the same PCollection.
  docs = docs | 'Rebalance' >> beam.Reshuffle()
  if request.shards_output:
    shards.write_token_shards(docs, request.shards_output, work_dir, request.num_token_shards,
                              token_shards.token_dtype(tokenizer.vocab_size).str,
                              int(tokenizer.eos_id))
  if request.output_path:
    if request.input_format != 'tokens':
      docs = docs | 'Tokens' >> beam.Map(tokenizing.doc_tokens)
    frequent = docs | 'Count' >> counting.CountFrequentNGrams(
        max_len=request.max_len, min_count=request.min_count,
        prune_filter=request.prune_filter, bloom_bits_log2=request.bloom_bits_log2,
        bloom_num_hashes=request.bloom_num_hashes, num_key_shards=request.num_key_shards,
        max_buffered_rows=request.max_buffered_rows)
    counting.write_frequent(frequent, work_dir, request.max_len, request.num_fgrams)
  result = p.run()
  state = result.wait_until_finish()
  if state is not None and state != PipelineState.DONE:
    raise RuntimeError(f'the f-gram pipeline ended in state {state}; see the runner logs')
  logging.info('fgrams_beam: pipeline finished in %.1fs', time.time() - t0)
  return result


def _log_metrics(result, max_len):
  try:
    counters = result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE))['counters']
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


def _finish_token_shards(request: Request, tokenizer, work_dir: str, metrics: dict):
  """index.json from the shard writers' stats (last), and the held-out caveat."""
  shards.write_token_index(
      request.shards_output, work_dir, request.num_token_shards, tokenizer,
      {'writer': 'fgrams_beam', 'inputs': list(request.input_patterns),
       'input_format': request.input_format, 'text_field': request.text_field,
       'heldout_fraction': request.heldout_fraction,
       'tokenizer_fingerprint': tokenizer.fingerprint, 'num_shards': request.num_token_shards})
  if (request.heldout_fraction > 0 and 'documents' in metrics
      and not metrics.get('heldout_documents')):
    logging.warning(
        'fgrams_beam: no document scores below heldout_fraction=%g, so none was held '
        'out; corpus.split_documents would still hold out the lowest-scoring one, so '
        'a run evaluating on that split would evaluate on a training document. Raise '
        'heldout_fraction or use separate eval files.', request.heldout_fraction)


def _select_and_save(request: Request, work_dir: str) -> 'fgrams.FGramSet':
  """The global top-S over the per-batch tops, saved through the project's IO layer."""
  ngrams_MxK, counts_M = counting.read_frequent(work_dir, request.max_len)
  logging.info('fgrams_beam: %d candidate f-grams read back (each shard keeps its top '
               '%d)', counts_M.size, request.num_fgrams)
  fgram_set = fgrams.select_top(ngrams_MxK, counts_M, max_len=request.max_len,
                                num_fgrams=request.num_fgrams)
  if not paths_lib.is_cloud(request.output_path):
    paths_lib.makedirs(paths_lib.dirname(paths_lib.abspath(request.output_path)))
  fgram_set.save(request.output_path)
  logging.info('fgrams_beam: %d f-grams (fingerprint %s) saved to %s', len(fgram_set),
               fgram_set.fingerprint, request.output_path)
  return fgram_set


def _delete_work_dir(work_dir: str, own_temp: Optional[str]) -> None:
  # Object stores have no directories: delete the files, then any local directory.
  try:
    matched = FileSystems.match([FileSystems.join(work_dir, g)
                                 for g in (counting.FREQUENT_GLOB, shards.STATS_GLOB)])
    found = [m.path for r in matched for m in r.metadata_list]
    if found:
      FileSystems.delete(found)
    local_dir = own_temp or (work_dir if '://' not in work_dir else None)
    if local_dir:
      shutil.rmtree(local_dir, ignore_errors=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('fgrams_beam: could not delete %s (%s)', work_dir, e)
