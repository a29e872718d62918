"""The step batch: what one train or eval step reads, from a loader's rows to device arrays.

Host side (`make_step_batch`): split a loader batch into grad_accum micro-batches (a leading
axis A on every array) and dedupe each micro-batch's f-grams, so A_fgram runs on the unique
windows of the batch, not on every position. Device side (`device_put_batch`): assemble
global arrays from every process's rows in the step's shardings; with several processes
the unique-window arrays are padded to one agreed size and their indices made global.
"""
from flax import linen as nn
import jax
import numpy as np

# Arrays of every step batch, [A, B, L]; SCONE adds FGRAM_KEYS.
ROW_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
# fgram_uniq_tokens [A, U, K], fgram_uniq_lengths [A, U], fgram_index [A, B, L].
FGRAM_KEYS = ('fgram_uniq_tokens', 'fgram_uniq_lengths', 'fgram_index')
_NDIM = {**{k: 3 for k in ROW_KEYS}, 'fgram_uniq_tokens': 3, 'fgram_uniq_lengths': 2,
         'fgram_index': 3}


def dedupe_fgrams(batch: dict, fgram_set, *, bucket: int, dedupe: bool = True) -> dict:
  """Adds the f-gram windows the f-gram model must run on, and where each position reads.

  Adds fgram_uniq_tokens [U, K] (windows left-aligned, 0-padded), fgram_uniq_lengths [U],
  fgram_index [B, L] (row of the windows for each position, -1 when unmatched) and
  fgram_num_unique (0-d: distinct matched ids; host-side, not for the device).
  dedupe: one window per distinct id, U rounded up to a multiple of bucket (at least
  one bucket) so the step compiles for few shapes; padding windows have length 1.
  Without dedupe: U = B * L, one window per position, as a naive implementation would.
  """
  ids_BxL = np.asarray(batch['fgram_ids'])
  matched_BxL = ids_BxL >= 0
  tokens_SxK = np.asarray(fgram_set.tokens_padded)
  lengths_S = np.asarray(fgram_set.lengths)
  width = tokens_SxK.shape[1]
  uniq, inverse = np.unique(ids_BxL[matched_BxL], return_inverse=True)
  if dedupe:
    size = max(1, -(-len(uniq) // bucket)) * bucket
    window_ids = uniq
    index_BxL = np.full(ids_BxL.shape, -1, np.int32)
    index_BxL[matched_BxL] = inverse.reshape(-1)
    rows = np.arange(len(uniq))
  else:
    size = ids_BxL.size
    flat = np.flatnonzero(matched_BxL)
    window_ids = ids_BxL.reshape(-1)[flat]
    index_BxL = np.where(matched_BxL, np.arange(size).reshape(ids_BxL.shape), -1)
    rows = flat
  toks_UxK = np.zeros((size, width), np.int32)
  lens_U = np.ones(size, np.int32)
  toks_UxK[rows] = tokens_SxK[window_ids]
  lens_U[rows] = lengths_S[window_ids]
  out = dict(batch)
  out['fgram_uniq_tokens'] = toks_UxK
  out['fgram_uniq_lengths'] = lens_U
  out['fgram_index'] = index_BxL.astype(np.int32)
  out['fgram_num_unique'] = np.asarray(len(uniq), np.int32)
  return out


def make_step_batch(batch: dict, fgram_set, cfg, *, grad_accum_steps=None):
  """Host-side: splits a batch into micro-batches and dedupes their f-grams.

  Returns (step_batch, stats). Every array gets a leading micro-batch axis A
  (cfg.grad_accum_steps, or grad_accum_steps when given: eval uses 1). The micro-batches
  share one unique-id buffer size U so they stack; U is bucketed so the step compiles for
  few shapes. stats: host-side f-gram counts (matched positions, unique ids, A_fgram rows).
  """
  accum = cfg.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  rows = batch['inputs'].shape[0]
  if rows % accum:
    raise ValueError(f'batch of {rows} rows does not split into {accum} micro-batches.')
  size = rows // accum
  micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.ndim == 2} for i in range(accum)]
  out = {k: np.stack([m[k] for m in micro]) for k in ROW_KEYS}
  stats = {'fgram_matched': 0, 'fgram_unique': 0, 'fgram_rows': 0}
  if fgram_set is None:
    return out, stats
  deduped = [dedupe_fgrams(m, fgram_set, bucket=cfg.fgram_model.unique_bucket,
                           dedupe=cfg.fgram_model.dedupe) for m in micro]
  size = max(d['fgram_uniq_tokens'].shape[0] for d in deduped)
  toks, lens, index = [], [], []
  for d in deduped:
    pad = size - d['fgram_uniq_tokens'].shape[0]
    toks.append(np.pad(d['fgram_uniq_tokens'], ((0, pad), (0, 0))))
    lens.append(np.pad(d['fgram_uniq_lengths'], (0, pad), constant_values=1))
    index.append(d['fgram_index'])
    stats['fgram_matched'] += int((d['fgram_index'] >= 0).sum())
    stats['fgram_unique'] += int(d.get('fgram_num_unique', 0))
  stats['fgram_rows'] = size * accum
  out['fgram_uniq_tokens'] = np.stack(toks)
  out['fgram_uniq_lengths'] = np.stack(lens)
  out['fgram_index'] = np.stack(index)
  return out, stats


def batch_shardings_for(mesh, rules, *, with_fgrams: bool) -> dict:
  """The shardings of every step-batch array, known before any batch exists (for jit)."""
  keys = ROW_KEYS + (FGRAM_KEYS if with_fgrams else ())
  return {k: _sharding(k, _NDIM[k], mesh, rules) for k in keys}


def abstract_step_batch(cfg, shardings: dict, *, num_unique: int) -> dict:
  """ShapeDtypeStructs of one training step batch, placed in `shardings` (for AOT compile).

  num_unique: U, the unique-window rows per micro-batch; the step compiles one program per
  U bucket, the largest being every position of the micro-batch matched and distinct.
  """
  accum = cfg.grad_accum_steps
  rows = cfg.batch_size // accum
  shapes = {k: (accum, rows, cfg.seq_len) for k in ROW_KEYS}
  shapes.update(fgram_uniq_tokens=(accum, num_unique, cfg.fgrams.max_len),
                fgram_uniq_lengths=(accum, num_unique), fgram_index=(accum, rows, cfg.seq_len))
  return {k: jax.ShapeDtypeStruct(shapes[k], np.int32, sharding=s) for k, s in shardings.items()}


def batch_shardings(step_batch: dict, mesh, rules) -> dict:
  """Row arrays [A, B, L] and unique-id arrays [A, U, ...] split over the batch axes."""
  return {k: _sharding(k, v.ndim, mesh, rules) for k, v in step_batch.items()}


def _sharding(key, ndim, mesh, rules):
  lead = 'fgram_batch' if key.startswith('fgram_uniq') else 'batch'
  spec = jax.sharding.PartitionSpec(None, lead, *([None] * (ndim - 2)))
  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))


def device_put_batch(step_batch, shardings):
  """Assembles global arrays from this process's rows (multi-host safe).

  With several processes, each deduped its own rows' f-grams: the unique-window arrays are
  padded to one size agreed by all processes, and fgram_index is shifted from local to
  global rows of the assembled [A, U_global, K] array.
  """
  if jax.process_count() > 1 and 'fgram_uniq_tokens' in step_batch:
    step_batch = _globalize_fgram_rows(step_batch, shardings['fgram_uniq_tokens'])
  return {k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in step_batch.items()}


def _globalize_fgram_rows(step_batch, uniq_sharding):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  toks = step_batch['fgram_uniq_tokens']
  accum, local_u, width = toks.shape
  size = int(np.max(multihost_utils.process_allgather(np.int32(local_u))))
  out = dict(step_batch)
  out['fgram_uniq_tokens'] = np.pad(toks, ((0, 0), (0, size - local_u), (0, 0)))
  out['fgram_uniq_lengths'] = np.pad(step_batch['fgram_uniq_lengths'],
                                     ((0, 0), (0, size - local_u)), constant_values=1)
  global_shape = (accum, size * jax.process_count(), width)
  starts = {idx[1].start or 0 for idx in
            uniq_sharding.addressable_devices_indices_map(global_shape).values()}
  offset = min(starts)
  index = step_batch['fgram_index']
  out['fgram_index'] = np.where(index >= 0, index + offset, -1).astype(np.int32)
  return out
