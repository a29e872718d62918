"""The step batch: what one train or eval step reads, from a loader's rows to device arrays.

Host side (`make_step_batch`): split a loader batch into grad_accum micro-batches (a leading
axis A on every array) and dedupe each micro-batch's f-grams, so A_fgram runs on the unique
windows of the batch, not on every position; the windows are packed back to back into rows
of P slots (`pack_windows`), so A_fgram computes about as many positions as the windows have
tokens, not K per window. Device side (`device_put_batch`): assemble global arrays from every
process's rows in the step's shardings; with several processes the packed rows are padded
to one agreed count and the slot indices made global.
"""
import math

from flax import linen as nn
import jax
import numpy as np

# Arrays of every step batch, [A, B, L]; SCONE adds FGRAM_KEYS.
ROW_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
# fgram_tokens [A, R, P], fgram_positions [A, R, P] (packed rows), fgram_index [A, B, L].
FGRAM_KEYS = ('fgram_tokens', 'fgram_positions', 'fgram_index')
PACKED_KEYS = ('fgram_tokens', 'fgram_positions')  # split over 'fgram_batch', not 'batch'
_NDIM = {k: 3 for k in ROW_KEYS + FGRAM_KEYS}


def pack_windows(lengths_W, pack_len: int):
  """Places windows of the given lengths back to back in rows of pack_len slots.

  Next-fit, longest windows first (in closed form per length): a window never straddles
  two rows, and a row is closed only when the next window does not fit, so it wastes fewer
  slots than that window is long (for K = 5 in rows of 16: 1 slot a row of 5-token windows,
  none a row of 2-token ones). Returns (row_W, start_W, num_rows).
  """
  lengths_W = np.asarray(lengths_W, np.int64)
  if lengths_W.size and (lengths_W.min() < 1 or lengths_W.max() > pack_len):
    raise ValueError(f'f-gram windows of {lengths_W.min()}..{lengths_W.max()} tokens do not fit '
                     f'rows of fgram_model.pack_len={pack_len} slots; raise pack_len to at '
                     'least fgrams.max_len.')
  row_W = np.zeros(lengths_W.size, np.int64)
  start_W = np.zeros(lengths_W.size, np.int64)
  row, fill = 0, 0  # the row being filled and its used slots
  for n in np.unique(lengths_W)[::-1]:
    idx = np.flatnonzero(lengths_W == n)
    per_row = pack_len // n
    j = np.arange(idx.size)
    first = min(idx.size, (pack_len - fill) // n)  # these still fit in the current row
    rest = j - first
    row_W[idx] = np.where(j < first, row, row + 1 + rest // per_row)
    start_W[idx] = np.where(j < first, fill + j * n, rest % per_row * n)
    if idx.size > first:
      row += 1 + (idx.size - first - 1) // per_row
      fill = ((idx.size - first - 1) % per_row + 1) * n
    else:
      fill += idx.size * n
  return row_W, start_W, row + (fill > 0)


def dedupe_fgrams(batch: dict, fgram_set, *, pack_len: int, bucket: int,
                  dedupe: bool = True, min_rows: int = 0) -> dict:
  """Adds the packed f-gram windows the f-gram model must run on, and where each position reads.

  Adds fgram_tokens [R, P] and fgram_positions [R, P] (P = pack_len: windows back to back,
  positions 0..n-1 within each; unused slots hold token 0, position 0), fgram_index [B, L]
  (flat slot row * P + slot of the last token of the position's window, -1 when unmatched),
  and host-side counts for the stats (0-d, not for the device): fgram_num_unique (distinct
  matched ids) and fgram_useful (tokens of the windows run: the positions A_fgram needs).
  dedupe: one window per distinct id. Without dedupe: one window per matched position, as
  a naive implementation would. R is rounded up to a multiple of bucket (at least one
  bucket) so the step compiles for few shapes, and is at least min_rows (the run's fixed
  capacity, so every batch that fits it has one shape).
  """
  ids_BxL = np.asarray(batch['fgram_ids'])
  matched_BxL = ids_BxL >= 0
  tokens_SxK = np.asarray(fgram_set.tokens_padded)
  lengths_S = np.asarray(fgram_set.lengths)
  uniq, inverse = np.unique(ids_BxL[matched_BxL], return_inverse=True)
  flat = np.flatnonzero(matched_BxL)
  window_ids = uniq if dedupe else ids_BxL.reshape(-1)[flat]
  lens_W = lengths_S[window_ids].astype(np.int64)
  row_W, start_W, used = pack_windows(lens_W, pack_len)
  rows = max(min_rows, max(1, -(-used // bucket)) * bucket)
  first_W = row_W * pack_len + start_W
  # Every token of every window: its flat slot and its offset in the window.
  offset_T = np.arange(int(lens_W.sum())) - np.repeat(np.cumsum(lens_W) - lens_W, lens_W)
  toks_RxP = np.zeros((rows, pack_len), np.int32)
  pos_RxP = np.zeros((rows, pack_len), np.int32)
  slot_T = np.repeat(first_W, lens_W) + offset_T
  toks_RxP.reshape(-1)[slot_T] = tokens_SxK[np.repeat(window_ids, lens_W), offset_T]
  pos_RxP.reshape(-1)[slot_T] = offset_T
  last_W = first_W + lens_W - 1
  index_BxL = np.full(ids_BxL.shape, -1, np.int32)
  index_BxL.reshape(-1)[flat] = last_W[inverse.reshape(-1)] if dedupe else last_W
  out = dict(batch)
  out['fgram_tokens'] = toks_RxP
  out['fgram_positions'] = pos_RxP
  out['fgram_index'] = index_BxL
  out['fgram_num_unique'] = np.asarray(len(uniq), np.int32)
  out['fgram_useful'] = np.asarray(lens_W.sum(), np.int64)
  return out


def make_step_batch(batch: dict, fgram_set, cfg, *, grad_accum_steps=None, fgram_rows=0):
  """Host-side: splits a batch into micro-batches and dedupes and packs their f-grams.

  Returns (step_batch, stats). Every array gets a leading micro-batch axis A
  (cfg.grad_accum_steps, or grad_accum_steps when given: eval uses 1). The micro-batches
  share one packed row count R so they stack. fgram_rows: the run's fixed capacity
  (`fgram_row_capacity`): R is exactly that for every batch that fits it, so the step
  compiles once; a batch that needs more gets R rounded up to a multiple of pack_bucket
  (a new shape, compiled when first seen; stats['fgram_overflow'] = 1). fgram_rows=0: R is
  only bucketed. stats: host-side f-gram counts summed over the micro-batches: matched
  positions, unique ids, packed rows run, positions run (rows × pack_len), positions
  needed (tokens of the windows) and rows the windows fill (`fgram_rows_used`, the
  largest micro-batch's).
  """
  accum = cfg.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  rows = batch['inputs'].shape[0]
  if rows % accum:
    raise ValueError(f'batch of {rows} rows does not split into {accum} micro-batches.')
  size = rows // accum
  micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.ndim == 2} for i in range(accum)]
  out = {k: np.stack([m[k] for m in micro]) for k in ROW_KEYS}
  stats = {'fgram_matched': 0, 'fgram_unique': 0, 'fgram_rows': 0, 'fgram_positions': 0,
           'fgram_useful': 0, 'fgram_overflow': 0}
  if fgram_set is None:
    return out, stats
  pack_len = cfg.fgram_model.pack_len
  deduped = [dedupe_fgrams(m, fgram_set, pack_len=pack_len, bucket=cfg.fgram_model.pack_bucket,
                           dedupe=cfg.fgram_model.dedupe, min_rows=fgram_rows) for m in micro]
  size = max(d['fgram_tokens'].shape[0] for d in deduped)
  for k in FGRAM_KEYS:
    # Extra rows are unused slots (token 0, position 0), nothing points at them.
    out[k] = np.stack([np.pad(d[k], ((0, size - d[k].shape[0]), (0, 0))) if k in PACKED_KEYS
                       else d[k] for d in deduped])
  for d in deduped:
    stats['fgram_matched'] += int((d['fgram_index'] >= 0).sum())
    stats['fgram_unique'] += int(d['fgram_num_unique'])
    stats['fgram_useful'] += int(d['fgram_useful'])
  stats['fgram_rows'] = size * accum
  stats['fgram_positions'] = size * accum * pack_len
  stats['fgram_overflow'] = int(bool(fgram_rows) and size > fgram_rows)
  return out, stats


def rows_needed(batch: dict, fgram_set, cfg, *, grad_accum_steps=None) -> int:
  """Packed rows the largest micro-batch of `batch` fills (before any bucketing)."""
  accum = cfg.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  ids = np.asarray(batch['fgram_ids'])
  size = ids.shape[0] // accum
  lengths_S = np.asarray(fgram_set.lengths)
  most = 0
  for i in range(accum):
    ids_BxL = ids[i * size:(i + 1) * size]
    matched = ids_BxL[ids_BxL >= 0]
    window_ids = np.unique(matched) if cfg.fgram_model.dedupe else matched
    most = max(most, pack_windows(lengths_S[window_ids], cfg.fgram_model.pack_len)[2])
  return int(most)


def fgram_row_capacity(batches, fgram_set, cfg, *, grad_accum_steps=None,
                       headroom=None) -> int:
  """The run's fixed packed-row count R per micro-batch, from sample batches of its data.

  cfg.fgram_model.rows when set; else the most rows any sample batch fills, times
  (1 + headroom, default fgram_model.rows_headroom), rounded up to a multiple of
  pack_bucket. A later batch
  that needs more still trains correctly (`make_step_batch` gives it a bigger shape).
  """
  fm = cfg.fgram_model
  if fm.rows:
    return -(-int(fm.rows) // fm.pack_bucket) * fm.pack_bucket
  most = max([rows_needed(b, fgram_set, cfg, grad_accum_steps=grad_accum_steps)
              for b in batches] or [0])
  headroom = fm.rows_headroom if headroom is None else headroom
  want = math.ceil(most * (1.0 + headroom))
  return max(1, -(-want // fm.pack_bucket)) * fm.pack_bucket


def batch_shardings_for(mesh, rules, *, with_fgrams: bool) -> dict:
  """The shardings of every step-batch array, known before any batch exists (for jit)."""
  keys = ROW_KEYS + (FGRAM_KEYS if with_fgrams else ())
  return {k: _sharding(k, _NDIM[k], mesh, rules) for k in keys}


def abstract_step_batch(cfg, shardings: dict, *, num_rows: int, grad_accum_steps=None) -> dict:
  """ShapeDtypeStructs of one training step batch, placed in `shardings` (for AOT compile).

  num_rows: R, the packed f-gram rows per micro-batch (global: summed over processes); a
  run fixes it (`fgram_row_capacity`), the worst case being every position of the
  micro-batch matched by a distinct K-token f-gram. grad_accum_steps: A (eval: 1).
  """
  accum = cfg.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  rows = cfg.batch_size // accum
  shapes = {k: (accum, rows, cfg.seq_len) for k in ROW_KEYS}
  packed = (accum, num_rows, cfg.fgram_model.pack_len)
  shapes.update(fgram_tokens=packed, fgram_positions=packed,
                fgram_index=(accum, rows, cfg.seq_len))
  return {k: jax.ShapeDtypeStruct(shapes[k], np.int32, sharding=s) for k, s in shardings.items()}


def batch_shardings(step_batch: dict, mesh, rules) -> dict:
  """Row arrays [A, B, L] and packed f-gram rows [A, R, P] split over the batch axes."""
  return {k: _sharding(k, v.ndim, mesh, rules) for k, v in step_batch.items()}


def _sharding(key, ndim, mesh, rules):
  lead = 'fgram_batch' if key in PACKED_KEYS else 'batch'
  spec = jax.sharding.PartitionSpec(None, lead, *([None] * (ndim - 2)))
  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))


def device_put_batch(step_batch, shardings):
  """Assembles global arrays from this process's rows (multi-host safe).

  With several processes, each deduped and packed its own rows' f-grams: the packed rows
  are padded to one count agreed by all processes, and fgram_index is shifted from local
  to global slots of the assembled [A, R_global, P] arrays.
  """
  if jax.process_count() > 1 and 'fgram_tokens' in step_batch:
    step_batch = _globalize_fgram_rows(step_batch, shardings['fgram_tokens'])
  return {k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in step_batch.items()}


def _globalize_fgram_rows(step_batch, packed_sharding):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  accum, local_rows, pack_len = step_batch['fgram_tokens'].shape
  size = int(np.max(multihost_utils.process_allgather(np.int32(local_rows))))
  out = dict(step_batch)
  for k in PACKED_KEYS:
    out[k] = np.pad(step_batch[k], ((0, 0), (0, size - local_rows), (0, 0)))
  global_shape = (accum, size * jax.process_count(), pack_len)
  starts = {idx[1].start or 0 for idx in
            packed_sharding.addressable_devices_indices_map(global_shape).values()}
  offset = min(starts) * pack_len
  index = step_batch['fgram_index']
  out['fgram_index'] = np.where(index >= 0, index + offset, -1).astype(np.int32)
  return out
