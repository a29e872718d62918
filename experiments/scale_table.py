"""A synthetic export of N rows for serving benchmarks (bench_scale stage 3, issue 27).

A real 100M-row export runs the f-gram model over every f-gram (hours on a small CPU host).
Serving does not care what the rows hold, only where they are and how they are laid out, so
this builds an export directory in the exact on-disk format `--mode=export` writes (a
tensorstore zarr3 table in the export's layout, per-shard sha256 in export.json, every
fingerprint consistent, so `serving.load` checks and serves it as it would a real one) from:
- a real, smaller export: its main model parameters, tokenizer and model config (copied);
- an N-f-gram set file (linked or copied in as fgrams.npz);
- row contents that are cheap to make: a fixed block of random rows, row i = block row
  i mod R with the low mantissa bits xor'd by a hash of i (finite, distinct rows).
Written shard by shard (bounded memory: one shard being made, one being written), resumable
(a progress file in DEST.partial records finished shards), progress on stdout; export.json
carries `synthetic_table` so nothing mistakes it for a trained table.
"""
import json
import os
import shutil
import time

import numpy as np

from scone_jax import fgrams
from scone_jax import table as table_lib

CONTENT_VERSION = 'synthetic-v1'
_BLOCK_ROWS = 4096  # rows of the random block the table repeats
_PROGRESS = 'progress.synthetic.json'


def log(msg):
  print(f'[scale_table {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _mantissa_mask(dtype: np.dtype) -> int:
  """Low mantissa bits that may be flipped without touching exponent or sign (finite stays
  finite): 8 of float16's 10, 5 of bfloat16's 7, 21 of float32's 23."""
  bits = {np.dtype(np.float16): 10, np.dtype(np.float32): 23}.get(np.dtype(dtype), 7)
  return (1 << (bits - 2)) - 1


def random_block(dim: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
  """The block of _BLOCK_ROWS random rows (N(0, 1/d)), as unsigned ints of the item size."""
  rng = np.random.default_rng(seed)
  rows = (rng.standard_normal((_BLOCK_ROWS, dim), np.float32) / np.sqrt(dim)).astype(dtype)
  return table_lib.as_bits(rows)


def synthetic_rows(block_bits, lo: int, hi: int, dtype: np.dtype, out=None) -> np.ndarray:
  """Rows [lo, hi) of the synthetic table, as dtype."""
  ids = np.arange(lo, hi, dtype=np.uint64)
  if out is None:
    out = np.empty((hi - lo, block_bits.shape[1]), block_bits.dtype)
  np.take(block_bits, (ids % np.uint64(block_bits.shape[0])).astype(np.int64), axis=0, out=out)
  mix = ((ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & np.uint64(
      _mantissa_mask(dtype))
  np.bitwise_xor(out, mix.astype(out.dtype)[:, None], out=out)
  return out.view(dtype)


def bytes_needed(num_rows: int, dim: int, dtype: str, dest: str, with_mmap_copy: bool) -> int:
  """Disk bytes still to write for the table (what DEST.partial does not hold yet), plus the
  mmap storage's .npy copy of it when asked for and not there yet."""
  table_bytes = num_rows * dim * table_lib.np_dtype(dtype).itemsize
  need = 0
  if not os.path.isfile(os.path.join(dest, table_lib.METADATA_FILE)):
    have = 0
    table_dir = os.path.join(dest + table_lib.PARTIAL_SUFFIX, table_lib.TABLE_DIR)
    for root, _, files in os.walk(table_dir):
      have += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    need += max(0, table_bytes - have)
  if with_mmap_copy and not os.path.isfile(os.path.join(dest, table_lib.MMAP_FILE + '.json')):
    need += table_bytes
  return need


def _link_or_copy(src, dst):
  if os.path.exists(dst):
    os.remove(dst)
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def _request(source_meta, fgram_set, layout) -> dict:
  return {'content': CONTENT_VERSION, 'source_table_sha256': source_meta['table_sha256'],
          'source_params_sha256': source_meta['params_sha256'],
          'fgram_fingerprint': fgram_set.fingerprint, 'layout': layout.to_json()}


def build(source_export: str, set_path: str, dest: str, *, rows_per_chunk: int = 0,
          chunks_per_shard: int = 0, seed: int = 0) -> dict:
  """Writes the synthetic export DEST for the f-gram set at set_path (N = its size) from the
  real export source_export; returns a summary. rows_per_chunk 0: the source's;
  chunks_per_shard 0: shard files of ~64 MiB (as --mode=export makes them)."""
  t_start = time.time()
  source_meta = table_lib.read_metadata(source_export)
  fs = fgrams.FGramSet.load(set_path)
  src_layout = table_lib.TableLayout(**source_meta['layout'])
  layout = table_lib.make_layout(len(fs), src_layout.dim, src_layout.dtype,
                                 rows_per_chunk or src_layout.rows_per_chunk, chunks_per_shard)
  request = _request(source_meta, fs, layout)
  meta_path = os.path.join(dest, table_lib.METADATA_FILE)
  if os.path.isfile(meta_path):
    with open(meta_path, encoding='utf-8') as f:
      if json.load(f).get('synthetic_table', {}).get('request') == request:
        log(f'{dest}: already built for this request, kept')
        return {'skipped': True, 'rows': layout.num_rows, 'seconds': time.time() - t_start}
    raise ValueError(f'{dest} holds another export; remove it or choose another --out.')
  partial = dest + table_lib.PARTIAL_SUFFIX
  done = _prepare_partial(partial, source_export, set_path, request, layout)
  write_s, written_bytes = _write_shards(partial, layout, done, request, seed)
  digests = [done[s]['sha256'] for s in range(layout.num_shards)]
  meta = dict(source_meta)
  fgram_record = {'fingerprint': fs.fingerprint, 'num_fgrams': len(fs), 'max_len': fs.max_len,
                  'trained_fingerprint': source_meta['fgram_fingerprint'],
                  'trained_max_len': fs.max_len, 'cut_to_trained_max_len': 0, 'union': None,
                  'sources': [{'path': os.path.abspath(set_path), 'synthetic': True}]}
  changed = {'fgram_fingerprint': fs.fingerprint, 'fgram_set': fgram_record,
             'layout': layout.to_json()}
  meta.update(changed)
  meta['request'] = dict(source_meta['request'], **changed)
  meta.update({
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'num_fgrams': layout.num_rows, 'table_sha256': table_lib.table_digest(digests),
      'shard_sha256': digests,
      'shard_bytes': [int(done[s]['bytes']) for s in range(layout.num_shards)],
      'synthetic_table': {'content': CONTENT_VERSION, 'request': request, 'seed': seed,
                          'source_export': os.path.abspath(source_export),
                          'note': 'rows are NOT f-gram model outputs: a random block xor a '
                                  'hash of the row id (experiments/scale_table.py)'},
  })
  table_lib.write_json_atomic(os.path.join(partial, table_lib.METADATA_FILE), meta)
  os.remove(os.path.join(partial, _PROGRESS))
  os.replace(partial, dest)
  table_bytes = layout.num_rows * layout.dim * table_lib.np_dtype(layout.dtype).itemsize
  return {'skipped': False, 'rows': layout.num_rows, 'd': layout.dim, 'dtype': layout.dtype,
          'layout': layout.to_json(), 'table_bytes': table_bytes, 'seconds': time.time() - t_start,
          'write_seconds': write_s, 'bytes_written': written_bytes,
          'write_mb_per_s': written_bytes / 1e6 / max(write_s, 1e-9),
          'table_sha256': meta['table_sha256']}


def _prepare_partial(partial, source_export, set_path, request, layout) -> dict:
  """DEST.partial with every piece but the table's missing shards -> {shard: progress}."""
  progress_path = os.path.join(partial, _PROGRESS)
  progress = {}
  if os.path.isfile(progress_path):
    try:
      with open(progress_path, encoding='utf-8') as f:
        progress = json.load(f)
    except (OSError, ValueError):
      progress = {}
  if os.path.isdir(partial) and progress.get('request') != request:
    log(f'{partial}: an interrupted build of another request, discarded')
    shutil.rmtree(partial)
    progress = {}
  os.makedirs(partial, exist_ok=True)
  src_meta = table_lib.read_metadata(source_export)
  for name in (table_lib.MODEL_CONFIG_FILE, src_meta.get('tokenizer_file',
                                                         table_lib.TOKENIZER_FILE)):
    shutil.copyfile(os.path.join(source_export, name), os.path.join(partial, name))
  params = os.path.join(partial, table_lib.PARAMS_DIR)
  if not os.path.isdir(params):
    shutil.copytree(os.path.join(source_export, table_lib.PARAMS_DIR), params + '.tmp',
                    dirs_exist_ok=True)
    os.replace(params + '.tmp', params)
  _link_or_copy(set_path, os.path.join(partial, table_lib.FGRAMS_FILE))
  table_lib.open_table(os.path.join(partial, table_lib.TABLE_DIR), layout, create=True)
  done = {int(s): e for s, e in progress.get('done', {}).items()}
  if done:
    log(f'{partial}: resuming, {len(done)} of {layout.num_shards} shards already written')
  return done


def _write_shards(partial, layout, done, request, seed) -> tuple:
  """Writes the shards not in `done` (updated in place, and in the progress file after each
  one is on disk); one shard is made and hashed while the previous one is written."""
  table_dir = os.path.join(partial, table_lib.TABLE_DIR)
  store = table_lib.open_table(table_dir)
  dtype = table_lib.np_dtype(layout.dtype)
  block = random_block(layout.dim, dtype, seed)
  todo = [s for s in range(layout.num_shards) if s not in done]
  progress_path = os.path.join(partial, _PROGRESS)
  pending = None  # (shard, write future, sha256)
  t0 = t_log = time.time()
  written = 0

  def settle():
    nonlocal written
    s, fut, digest = pending
    fut.result()
    f = layout.shard_file(table_dir, s)
    done[s] = {'sha256': digest, 'bytes': os.path.getsize(f)}
    table_lib.write_json_atomic(progress_path, {'request': request,
                                                'done': {str(k): v for k, v in done.items()}})
    lo, hi = layout.shard_range(s)
    written += (hi - lo) * layout.dim * dtype.itemsize

  for i, s in enumerate(todo):
    lo, hi = layout.shard_range(s)
    rows = synthetic_rows(block, lo, hi, dtype)
    digest = table_lib.rows_digest(rows)
    fut = store[lo:hi].write(rows)
    if pending is not None:
      settle()
    pending = (s, fut, digest)
    now = time.time()
    if now - t_log >= 5.0 or i == len(todo) - 1:
      t_log = now
      rate = written / 1e6 / max(now - t0, 1e-9)
      log(f'shard {i + 1}/{len(todo)} (of {layout.num_shards}), {rate:.0f} MB/s, ETA '
          f'{(len(todo) - i - 1) * layout.shard_rows * layout.dim * dtype.itemsize / 1e6 / max(rate, 1e-9):.0f}s')
  if pending is not None:
    settle()
  return time.time() - t0, written
