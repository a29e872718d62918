"""Export: run A_fgram once over every f-gram into a table, and package what serving needs.

The directory layout, the table's tensorstore spec and its checksums are the export format
(`table.py`); this module computes and writes it. It is built as `EXPORT_DIR.partial` and
renamed into place only when complete; `progress*.json` files in `.partial` record the
shards written so far and their sha256, so an interrupted export resumes. Only the
checkpoint's parameters are restored (orbax partial restore): no optimizer state.
Multi-host: each process computes and writes its own contiguous range of shards; process 0
verifies and finalises.
"""
import dataclasses
import json
import logging
import math
import os
import time
from typing import Optional, Sequence

from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scone_jax import artifacts
from scone_jax import checkpoints
from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import paths
from scone_jax import sharding
from scone_jax import tokenizer as tokenizer_lib
from scone_jax.table import FGRAMS_FILE
from scone_jax.table import FORMAT_VERSION
from scone_jax.table import METADATA_FILE
from scone_jax.table import MODEL_CONFIG_FILE
from scone_jax.table import PARAMS_DIR
from scone_jax.table import PARTIAL_SUFFIX
from scone_jax.table import REQUEST_FILE
from scone_jax.table import TABLE_DIR
from scone_jax.table import TOKENIZER_FILE  # re-exported: tests and users name export.TOKENIZER_FILE
from scone_jax.table import file_digest
from scone_jax.table import file_tree_digest
from scone_jax.table import make_layout
from scone_jax.table import open_table
from scone_jax.table import read_json
from scone_jax.table import rows_digest
from scone_jax.table import table_digest
from scone_jax.table import write_json_atomic

_LOG_EVERY_S = 5.0


# ----------------------------------------------------------------------------- small pieces


def model_config_json(cfg, model_config: model_lib.ModelConfig) -> dict:
  return {
      'format_version': FORMAT_VERSION,
      'model': dataclasses.asdict(model_config),
      'seq_len': int(cfg.seq_len),
      'batch_size': int(cfg.batch_size),
      'run_config': json.loads(cfg.to_json_best_effort()),
  }


def _main_params(params) -> dict:
  """The inference-time model: everything but the f-gram model (and no optimizer state)."""
  return {k: v for k, v in params.items() if k != 'fgram_model'}


_copy_file_atomic = paths.copy


# ----------------------------------------------------------------------------- progress


def _progress_path(partial_dir, process_index):
  return paths.join(partial_dir, f'progress.{process_index}.json')


def _read_done(partial_dir, request) -> dict:
  """{shard: {'sha256', 'bytes'}} from every process's progress file of this request."""
  done = {}
  for name in sorted(paths.listdir(partial_dir)) if paths.isdir(partial_dir) else []:
    if not (name.startswith('progress.') and name.endswith('.json')):
      continue
    try:
      prog = read_json(paths.join(partial_dir, name))
    except (OSError, ValueError):
      continue  # a torn write of a crashed run: its shards are redone
    if prog.get('request') != request:
      continue
    for s, entry in prog.get('done', {}).items():
      done[int(s)] = entry
  return done


def _write_shard(store, lo: int, rows_NxD: np.ndarray):
  """Starts writing rows [lo, lo + N) (one whole shard); returns the tensorstore future."""
  return store[lo:lo + rows_NxD.shape[0]].write(rows_NxD)


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass
class _Restored:
  """What export needs of a run: its mesh and model, and the checkpoint's parameters."""
  mesh: jax.sharding.Mesh
  rules: tuple
  model: model_lib.SconeLM
  params: dict
  param_shardings: dict
  step: int


def restore_params(cfg, workdir: str, run: artifacts.RunArtifacts) -> _Restored:
  """The latest good checkpoint's parameters only (no optimizer state), on the run's mesh."""
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_axis_rules(cfg)
  model = model_lib.SconeLM(model_lib.ModelConfig.from_config(cfg, run.tokenizer.vocab_size))
  abstract, param_shardings = sharding.abstract_params(
      model, {'inputs_BxL': jnp.zeros((1, 1), jnp.int32)}, mesh, rules)
  fs = run.fgram_set
  directory = paths.join(workdir, artifacts.CHECKPOINT_DIR)
  found = None
  if paths.isdir(directory):
    found = checkpoints.restore_latest_params(
        directory, abstract,
        check_meta=lambda meta, where: checkpoints.check_fingerprints(
            meta, tokenizer=run.tokenizer.fingerprint,
            fgrams=fs.fingerprint if fs is not None else None, where=where))
  if found is None:
    raise FileNotFoundError(f'no checkpoint in {directory}; run --mode=train first.')
  params, step = found
  return _Restored(mesh, rules, model, params, param_shardings, int(step))


# What the f-gram pass reads of the parameters.
FGRAM_PASS_PARAMS = ('token_embed', 'fgram_model')


def make_fgram_pass(model, mesh, rules, param_shardings, out_dtype):
  """Jitted (params, tokens [B, K], lengths [B]) -> rows [B, d] in out_dtype, batch-sharded.

  params are {'token_embed', 'fgram_model'}. Returns (jitted, tokens sharding, lengths
  sharding); the jitted function must be called (or lowered) under `sharding.mesh_context`.
  """
  batch_2d = jax.sharding.NamedSharding(
      mesh, nn.logical_to_mesh_axes(('fgram_batch', None), rules))
  batch_1d = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(('fgram_batch',), rules))
  param_shardings = {k: param_shardings[k] for k in FGRAM_PASS_PARAMS}
  trained_k = model.config.fgram_max_len

  def fn(params, toks_BxK, lens_B):
    if toks_BxK.shape[1] > trained_k:  # a set with longer f-grams than trained (static)
      toks_BxK, lens_B = last_tokens(toks_BxK, lens_B, trained_k)
    emb_BxD = model.apply({'params': params}, toks_BxK, lens_B,
                          method=model_lib.SconeLM.fgram_embed)
    return emb_BxD.astype(out_dtype)

  jitted = jax.jit(fn, in_shardings=(param_shardings, batch_2d, batch_1d),
                   out_shardings=batch_2d)
  return jitted, batch_2d, batch_1d


def last_tokens(toks_BxW, lens_B, k: int):
  """Left-aligned windows [B, W] of lengths lens_B cut to their last k tokens -> ([B, k],
  lengths). A_fgram has learned positions for the K it was trained with; an f-gram longer
  than that is embedded from its last K tokens, the ones nearest the position it replaces
  (its row is then the row its K-token suffix would get)."""
  start_B = jnp.maximum(lens_B - k, 0)
  cols_BxK = jnp.minimum(start_B[:, None] + jnp.arange(k)[None, :], toks_BxW.shape[1] - 1)
  return jnp.take_along_axis(toks_BxW, cols_BxK, axis=1), jnp.minimum(lens_B, k)


def global_batch_size(mesh, batch_size: int, process_count: int) -> int:
  """Rows of one f-gram pass: batch_size rounded up to split over the mesh's batch shards
  and the processes."""
  unit = math.lcm(mesh.shape['data'] * mesh.shape['fsdp'], process_count)
  return max(unit, -(-int(batch_size) // unit) * unit)


def _local_rows(arr: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(arr)
  shards = {}
  for s in arr.addressable_shards:
    shards.setdefault(s.index[0].start or 0, s)
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def _checkpoint_identity(workdir, step) -> dict:
  """Which saved checkpoint this is: its path and orbax's metadata file (save timestamps),
  so another run's checkpoint of the same step is not mistaken for it."""
  path = paths.join(paths.abspath(workdir), artifacts.CHECKPOINT_DIR, str(step))
  meta = paths.join(path, '_CHECKPOINT_METADATA')
  return {'path': path, 'metadata_sha256': file_digest(meta) if paths.isfile(meta) else None}


def choose_fgram_set(cfg, workdir: str, run: artifacts.RunArtifacts,
                     fgram_set_paths: Optional[Sequence[str]] = None):
  """The f-gram set to embed -> (FGramSet, the record export.json keeps of it).

  fgram_set_paths: sets made by --mode=extract with this run's tokenizer (any corpus,
  any S and K); several are joined by `fgrams.union` (each f-gram once, ranked by summed
  count). None or empty: the run's own set. A set made with another tokenizer is refused.
  """
  trained = run.fgram_set
  if fgram_set_paths:
    loaded = [artifacts.load_fgram_set(p, run.tokenizer) for p in fgram_set_paths]
    chosen = fgrams.union([s for s, _ in loaded])
    sources = [src for _, src in loaded]
  else:
    chosen = trained
    path = paths.abspath(cfg.fgrams.path or paths.join(workdir, artifacts.FGRAMS_FILE))
    meta_path = artifacts.fgram_set_meta_path(path)
    meta = read_json(meta_path) if paths.isfile(meta_path) else {}
    known = meta.get('fingerprint') == trained.fingerprint  # else: made elsewhere (Beam)
    request = meta.get('request', {}) if known else {}
    sources = [{'path': path, 'fingerprint': trained.fingerprint, 'num_fgrams': len(trained),
                'max_len': trained.max_len,
                'tokenizer_fingerprint': request.get('tokenizer_fingerprint'),
                'corpus': request.get('corpus'), 'min_count': request.get('min_count')}]
  trained_k = int(cfg.fgrams.max_len)
  longer = _count_longer(chosen, trained_k)
  if longer:
    logging.info('export: %d of %d f-grams are longer than the %d tokens the f-gram model was '
                 'trained on; each is embedded from its last %d tokens', longer, len(chosen),
                 trained_k, trained_k)
  return chosen, {
      'fingerprint': chosen.fingerprint, 'num_fgrams': len(chosen), 'max_len': chosen.max_len,
      'trained_fingerprint': trained.fingerprint, 'trained_max_len': trained_k,
      # f-grams longer than trained_max_len: embedded from their last trained_max_len tokens.
      'cut_to_trained_max_len': longer,
      'union': 'count summed over the sets' if len(sources) > 1 else None,
      'sources': sources,
  }


def _count_longer(fgram_set, k: int, block: int = 1 << 20) -> int:
  """F-grams longer than k, counted by blocks (no [S] temporary; a memory-mapped set's
  pages are released as it goes)."""
  n = 0
  for lo in range(0, len(fgram_set), block):
    n += int(np.count_nonzero(fgram_set.lengths[lo:lo + block] > k))
    fgram_set.release_pages()
  return n


def _request(cfg, workdir, run, step, layout, fgram_record) -> dict:
  del cfg  # the layout carries what matters of it; the checkpoint carries the model
  return {
      'format_version': FORMAT_VERSION,
      'step': int(step),
      'checkpoint': _checkpoint_identity(workdir, step),
      'fgram_fingerprint': fgram_record['fingerprint'],
      # Which set the table embeds (a change restarts an interrupted export).
      'fgram_set': fgram_record,
      'tokenizer_fingerprint': run.tokenizer.fingerprint,
      # How serving loads the tokenizer file it finds beside the table.
      'tokenizer_kind': run.tokenizer.kind,
      'tokenizer_file': tokenizer_lib.FILES[run.tokenizer.kind],
      'tokenizer_special_ids': dict(run.tokenizer.overrides),
      'layout': layout.to_json(),
  }


def _summary(meta, export_dir, seconds, rows_computed, table_seconds, skipped=False) -> dict:
  layout = meta['layout']
  itemsize = np.dtype(jnp.dtype(layout['dtype'])).itemsize
  nbytes = rows_computed * layout['dim'] * itemsize
  return {
      'rows': layout['num_rows'], 'd': layout['dim'], 'dtype': layout['dtype'],
      'seconds': seconds, 'rows_computed': rows_computed,
      'rows_per_s': rows_computed / max(table_seconds, 1e-9),
      'bytes': layout['num_rows'] * layout['dim'] * itemsize,
      'mb_per_s': nbytes / 1e6 / max(table_seconds, 1e-9),
      'export_dir': paths.abspath(export_dir), 'step': meta['step'],
      'fingerprint': meta['fgram_fingerprint'], 'skipped': skipped,
  }


def export(cfg, workdir: str, run: artifacts.RunArtifacts, export_dir: str, *,
           chunks_per_shard: Optional[int] = None,
           fgram_set_paths: Optional[Sequence[str]] = None) -> dict:
  """Exports the latest good checkpoint of workdir for serving; returns a summary dict.

  fgram_set_paths (`--fgram_set`): the f-gram set(s) to embed instead of the run's own
  (`choose_fgram_set`); the table and the fgrams.npz beside it are that set's, so serving
  matches against it.
  Resumable: a re-run with the same checkpoint step, f-gram set (and its sources),
  tokenizer and table layout continues an interrupted export (`export_dir.partial`);
  anything else, another --fgram_set included, starts over. An existing complete export of
  the same request is kept as is, and an existing export is replaced only once the new one
  is complete: a full disk leaves it loadable.
  """
  try:
    return _export(cfg, workdir, run, export_dir, chunks_per_shard=chunks_per_shard,
                   fgram_set_paths=fgram_set_paths)
  except Exception as e:  # pylint: disable=broad-except
    if paths.is_disk_full(e):
      raise paths.disk_full_error('the export', paths.abspath(export_dir) + PARTIAL_SUFFIX,
                                  e) from e
    raise


def _export(cfg, workdir: str, run: artifacts.RunArtifacts, export_dir: str, *,
            chunks_per_shard: Optional[int] = None,
            fgram_set_paths: Optional[Sequence[str]] = None) -> dict:
  t_start = time.time()
  if run.fgram_set is None or not cfg.fgrams.enabled:
    raise ValueError('this run has no f-grams (fgrams.enabled=False): there is no table to '
                     'export; use a SCONE config such as experiments/configs/scone.py.')
  # Before the checkpoint is read: a set that cannot be used fails in a second.
  fgram_set, fgram_record = choose_fgram_set(cfg, workdir, run, fgram_set_paths)
  export_dir = paths.abspath(export_dir)
  partial_dir = export_dir + PARTIAL_SUFFIX
  final_meta = paths.join(export_dir, METADATA_FILE)
  # A finished export is replaced when it is out of date; anything else is never touched.
  if (paths.exists(export_dir) and not paths.isfile(final_meta)
      and not (paths.isdir(export_dir) and not paths.listdir(export_dir))):
    raise ValueError(f'{export_dir} exists and is not an export (no {METADATA_FILE}); choose '
                     'another --export_dir or remove it.')
  pid = jax.process_index()
  trainer = restore_params(cfg, workdir, run)
  step = trainer.step
  if chunks_per_shard is None:
    chunks_per_shard = int(cfg.export.chunks_per_shard)
  layout = make_layout(len(fgram_set), cfg.model.d_model, cfg.export.dtype,
                       cfg.export.rows_per_chunk, chunks_per_shard)
  request = _request(cfg, workdir, run, step, layout, fgram_record)

  if paths.isfile(final_meta):
    try:
      meta = read_json(final_meta)
    except (OSError, ValueError):
      meta = {}
    if meta.get('request') == request:
      logging.info('export %s is already complete for step %d (f-gram set %s); keeping it',
                   export_dir, step, fgram_set.fingerprint[:12])
      return _summary(meta, export_dir, time.time() - t_start, 0, 1.0, skipped=True)

  table_dir = paths.join(partial_dir, TABLE_DIR)
  params_dir = paths.join(partial_dir, PARAMS_DIR)
  if pid == 0:
    request_path = paths.join(partial_dir, REQUEST_FILE)
    old = None
    if paths.isfile(request_path):
      try:
        old = read_json(request_path)
      except (OSError, ValueError):
        old = None
    if paths.isdir(partial_dir) and old != request:
      logging.info('discarding the interrupted export %s: it was for %s, now exporting %s',
                   partial_dir, _describe(old), _describe(request))
      paths.rmtree(partial_dir)
    elif paths.isdir(partial_dir):
      logging.info('resuming the interrupted export %s', partial_dir)
    paths.makedirs(partial_dir)
    write_json_atomic(request_path, request)
    fgram_set.save(paths.join(partial_dir, FGRAMS_FILE))
    _copy_file_atomic(run.tokenizer.path,
                      paths.join(partial_dir, tokenizer_lib.FILES[run.tokenizer.kind]))
    write_json_atomic(paths.join(partial_dir, MODEL_CONFIG_FILE),
                      model_config_json(cfg, trainer.model.config))
    open_table(table_dir, layout, create=True)
  multihost_utils.sync_global_devices('scone_export_prepared')

  # Orbax writes into a temporary directory and renames it, so a params/ that exists is whole.
  if not paths.isdir(params_dir):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(params_dir, _main_params(trainer.params))
      ckptr.wait_until_finished()

  t_table = time.time()
  rows_computed = _write_rows(trainer, fgram_set, layout, table_dir, partial_dir, request,
                              cfg.export.batch_size)
  table_seconds = time.time() - t_table
  rows_computed = int(np.sum(multihost_utils.process_allgather(
      np.array([rows_computed], np.int64))))
  multihost_utils.sync_global_devices('scone_export_rows_written')

  if pid == 0:
    meta = _finalise(partial_dir, export_dir, request, layout)
  multihost_utils.sync_global_devices('scone_export_finalised')
  if pid != 0:
    meta = read_json(final_meta)
  summary = _summary(meta, export_dir, time.time() - t_start, rows_computed, table_seconds)
  logging.info('exported %d f-gram rows (d=%d, %s) to %s in %.1fs: %s rows/s, %.1f MB/s',
               summary['rows'], summary['d'], summary['dtype'], export_dir, summary['seconds'],
               f'{summary["rows_per_s"]:,.0f}', summary['mb_per_s'])
  return summary


def _describe(request) -> str:
  if not request:
    return 'an unknown request'
  return (f'step {request.get("step")}, f-gram set {str(request.get("fgram_fingerprint"))[:12]},'
          f' layout {request.get("layout")}')


def _write_rows(trainer, fgram_set, layout, table_dir, partial_dir, request,
                batch_size) -> int:
  """Computes and writes this process's shards not yet done; returns rows computed."""
  pid, nproc = jax.process_index(), jax.process_count()
  store = open_table(table_dir)
  done = _read_done(partial_dir, request)
  progress = {'request': request,
              'done': {str(s): e for s, e in done.items()}}
  lo_shard = pid * layout.num_shards // nproc
  hi_shard = (pid + 1) * layout.num_shards // nproc
  todo = [s for s in range(lo_shard, hi_shard) if s not in done]
  if done:
    logging.info('export: %d of %d shards already written', len(done), layout.num_shards)

  mesh = trainer.mesh
  local_batch = global_batch_size(mesh, batch_size, nproc) // nproc
  fn, batch_2d, batch_1d = make_fgram_pass(trainer.model, mesh, trainer.rules,
                                           trainer.param_shardings, jnp.dtype(layout.dtype))
  params = {k: trainer.params[k] for k in FGRAM_PASS_PARAMS}

  rows_todo = _RowsTodo([layout.shard_range(s) for s in todo])
  # Every process runs the same number of (collective) steps; short ones pad.
  counts = multihost_utils.process_allgather(np.array([rows_todo.size], np.int64))
  num_steps = -(-int(np.max(counts)) // local_batch)
  tokens_SxK, lengths_S = fgram_set.tokens_padded, fgram_set.lengths

  def dispatch(i):
    ids = rows_todo.ids(i * local_batch, (i + 1) * local_batch)
    toks = np.zeros((local_batch, tokens_SxK.shape[1]), np.int32)
    lens = np.ones(local_batch, np.int32)
    toks[:ids.size] = tokens_SxK[ids]
    lens[:ids.size] = lengths_S[ids]
    with sharding.mesh_context(mesh, trainer.rules):
      return fn(params, jax.make_array_from_process_local_data(batch_2d, toks),
                jax.make_array_from_process_local_data(batch_1d, lens))

  np_dtype = np.dtype(jnp.dtype(layout.dtype))
  shard_iter = iter(todo)
  cur_shard, cur_buf, cur_fill = None, None, 0
  pending = []  # (shard, future, digest) of writes in flight, oldest first
  t0 = t_log = time.time()
  written = 0

  def settle_oldest():
    nonlocal written
    s, fut, digest = pending.pop(0)
    fut.result()
    progress['done'][str(s)] = {
        'sha256': digest, 'bytes': paths.getsize(layout.shard_file(table_dir, s))}
    # Recorded only once the shard is on disk: a crash before this redoes the shard.
    write_json_atomic(_progress_path(partial_dir, pid), progress)
    # A memory-mapped set keeps none of the rows read so far: memory stays flat in S.
    fgram_set.release_pages()
    lo, hi = layout.shard_range(s)
    written += hi - lo

  nxt = dispatch(0) if num_steps else None
  for i in range(num_steps):
    out = nxt
    nxt = dispatch(i + 1) if i + 1 < num_steps else None  # keeps the device busy meanwhile
    rows = _local_rows(out)
    n_real = max(0, min(local_batch, rows_todo.size - i * local_batch))
    r = 0
    while r < n_real:
      if cur_shard is None:
        cur_shard = next(shard_iter)
        lo, hi = layout.shard_range(cur_shard)
        cur_buf, cur_fill = np.empty((hi - lo, layout.dim), np_dtype), 0
      take = min(n_real - r, cur_buf.shape[0] - cur_fill)
      cur_buf[cur_fill:cur_fill + take] = rows[r:r + take]
      cur_fill += take
      r += take
      if cur_fill == cur_buf.shape[0]:
        lo = layout.shard_range(cur_shard)[0]
        pending.append((cur_shard, _write_shard(store, lo, cur_buf), rows_digest(cur_buf)))
        cur_shard = None
        # At most two shard writes in flight: bounded memory, I/O overlapped with compute.
        while len(pending) > 1:
          settle_oldest()
    while pending and pending[0][1].done():
      settle_oldest()
    now = time.time()
    if now - t_log >= _LOG_EVERY_S:
      t_log = now
      computed = min((i + 1) * local_batch, rows_todo.size)
      rate = computed / max(now - t0, 1e-9)
      logging.info('export: %d/%d rows of this process (%.1f%%), %s rows/s, %.1f MB/s, '
                   'ETA %.0fs', computed, rows_todo.size, 100 * computed / max(rows_todo.size, 1),
                   f'{rate:,.0f}', rate * layout.dim * np_dtype.itemsize / 1e6,
                   (rows_todo.size - computed) / max(rate, 1e-9))
  while pending:
    settle_oldest()
  if cur_shard is not None:
    raise RuntimeError(f'export: shard {cur_shard} was left incomplete; this is a bug.')
  return written


class _RowsTodo:
  """The row ids of the shards still to write, in order, cut into batches on demand: the
  ids of every row at once were 800 MB at 100M rows."""

  def __init__(self, ranges):
    self._lo = np.array([lo for lo, _ in ranges], np.int64)
    sizes = np.array([hi - lo for lo, hi in ranges], np.int64)
    self._start = np.concatenate([[0], np.cumsum(sizes)])  # position of each range's first row
    self.size = int(self._start[-1])

  def ids(self, start: int, stop: int) -> np.ndarray:
    """The ids at positions [start, stop) of the concatenated ranges (clipped to size)."""
    stop = min(stop, self.size)
    if start >= stop:
      return np.zeros(0, np.int64)
    pos = np.arange(start, stop, dtype=np.int64)
    r = np.searchsorted(self._start, pos, side='right') - 1
    return self._lo[r] + (pos - self._start[r])


def _finalise(partial_dir, export_dir, request, layout) -> dict:
  """Checks every shard is written and reads back to its digest; writes metadata; renames."""
  t0 = time.time()
  done = _read_done(partial_dir, request)
  missing = [s for s in range(layout.num_shards) if s not in done]
  if missing:
    raise RuntimeError(f'export: shards {missing[:5]} of {layout.num_shards} were not written; '
                       're-run --mode=export to finish them.')
  table_dir = paths.join(partial_dir, TABLE_DIR)
  store = open_table(table_dir)
  digests = []
  for s in range(layout.num_shards):
    lo, hi = layout.shard_range(s)
    got = rows_digest(store[lo:hi].read().result())
    if got != done[s]['sha256']:
      raise RuntimeError(f'export: shard {s} (rows {lo}..{hi}) reads back with sha256 '
                         f'{got[:12]} but {done[s]["sha256"][:12]} was written; the disk or '
                         f'filesystem lost data. Delete {partial_dir} and re-run --mode=export.')
    digests.append(got)
  params_dir = paths.join(partial_dir, PARAMS_DIR)
  meta = dict(request)
  meta.update({
      'request': request,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'num_fgrams': layout.num_rows,
      'd': layout.dim,
      'dtype': layout.dtype,
      'table_sha256': table_digest(digests),
      'shard_sha256': digests,
      'shard_bytes': [int(done[s]['bytes']) for s in range(layout.num_shards)],
      'params_sha256': file_tree_digest(params_dir),
      'model_config_sha256': file_digest(paths.join(partial_dir, MODEL_CONFIG_FILE)),
  })
  write_json_atomic(paths.join(partial_dir, METADATA_FILE), meta)
  if paths.exists(export_dir):
    # Two renames: in between, export_dir is absent (refused), never half-written.
    old = f'{export_dir}.old{os.getpid()}'
    paths.replace(export_dir, old)
    paths.replace(partial_dir, export_dir)
    try:
      paths.rmtree(old)
    except OSError as e:
      logging.warning('could not remove the replaced export %s (%s)', old, e)
  else:
    paths.replace(partial_dir, export_dir)
  # Progress files go only after the rename: a crash before it resumes with nothing to redo.
  for name in paths.listdir(export_dir):
    if name.startswith('progress.') or name == REQUEST_FILE:
      paths.remove(paths.join(export_dir, name))
  logging.info('export: verified %d shards and wrote %s (%.1fs)', layout.num_shards,
               paths.join(export_dir, METADATA_FILE), time.time() - t0)
  return meta
