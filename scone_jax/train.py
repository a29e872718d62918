"""Joint training of the main LM and the f-gram model: state, step, eval, checkpoints.

One loop, one state dataclass. The step is `jax.jit` with NamedSharding in/out shardings
(what pjit became); parameters are born sharded (`sharding.init_sharded`). Orbax keeps
params, optimizer state, step, the data-iterator state and run metadata (config and the
f-gram set's fingerprint) together, so a resumed run continues exactly where it stopped.
"""
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from scone_jax import artifacts
from scone_jax import config as config_lib
from scone_jax import data
from scone_jax import model as model_lib
from scone_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------- config

# The schema, its defaults and its checks live in config.py; this name stays for callers.
validate_config = config_lib.validate


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.num_train_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_learning_rate_fraction)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW (no decay on vectors: norms, biases) with global-norm clipping."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(make_schedule(cfg), b1=0.9, b2=0.95, eps=1e-8,
                  weight_decay=cfg.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------- batches

_ROW_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def make_step_batch(batch: dict, fgram_set, cfg) -> dict:
  """Host-side: splits a batch into grad_accum micro-batches and dedupes their f-grams.

  Every array gets a leading micro-batch axis A. The micro-batches share one unique-id
  buffer size U so they stack; U is bucketed so the step compiles for few shapes.
  """
  accum = cfg.grad_accum_steps
  rows = batch['inputs'].shape[0]
  if rows % accum:
    raise ValueError(f'batch of {rows} rows does not split into {accum} micro-batches.')
  size = rows // accum
  micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.ndim == 2} for i in range(accum)]
  out = {k: np.stack([m[k] for m in micro]) for k in _ROW_KEYS}
  stats = {'fgram_matched': 0, 'fgram_unique': 0, 'fgram_rows': 0}
  if fgram_set is None:
    return out, stats
  deduped = [data.dedupe_fgrams(m, fgram_set, bucket=cfg.fgram_model.unique_bucket,
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


def batch_shardings(step_batch: dict, mesh, rules) -> dict:
  """Row arrays [A, B, L] and unique-id arrays [A, U, ...] split over the batch axes."""
  logical = {}
  for k, v in step_batch.items():
    lead = 'fgram_batch' if k.startswith('fgram_uniq') else 'batch'
    logical[k] = jax.sharding.PartitionSpec(None, lead, *([None] * (v.ndim - 2)))
  return {k: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))
          for k, spec in logical.items()}


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


# ----------------------------------------------------------------------------- step


def _loss_sum(params, model, mb, rng, deterministic):
  logits_BxLxV = model.apply(
      {'params': params}, mb['inputs'], positions_BxL=mb['positions'],
      segment_ids_BxL=mb['segment_ids'], fgram_index_BxL=mb.get('fgram_index'),
      fgram_uniq_tokens_UxK=mb.get('fgram_uniq_tokens'),
      fgram_uniq_lengths_U=mb.get('fgram_uniq_lengths'), deterministic=deterministic,
      rngs={'dropout': rng})
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, mb['targets'])
  mask_BxL = mb['loss_mask'].astype(jnp.float32)
  return jnp.sum(nll_BxL * mask_BxL), jnp.sum(mask_BxL)


def make_train_step(model, tx, schedule, cfg):
  """(state, step_batch, rng) -> (state, metrics); gradients accumulated over axis A."""
  deterministic = cfg.model.dropout_rate == 0.0

  def train_step(state, step_batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

    def micro_step(carry, xs):
      grads, loss, count = carry
      i, mb = xs
      (l, n), g = grad_fn(state.params, model, mb, jax.random.fold_in(rng, i), deterministic)
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, loss + l, count + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    accum = step_batch['inputs'].shape[0]
    (grads, loss, count), _ = jax.lax.scan(
        micro_step, (zeros, jnp.float32(0), jnp.float32(0)),
        (jnp.arange(accum), step_batch))
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss / jnp.maximum(count, 1.0), 'grad_norm': optax.global_norm(grads),
               'learning_rate': schedule(state.step), 'tokens': count}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(model):
  def eval_step(params, step_batch):
    def micro(carry, mb):
      l, n = _loss_sum(params, model, mb, jax.random.PRNGKey(0), True)
      return (carry[0] + l, carry[1] + n), None
    (loss, count), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), step_batch)
    return {'nll_sum': loss, 'tokens': count}
  return eval_step


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Trainer:
  """Holds the compiled pieces of one run; `train()` is the loop."""
  cfg: ml_collections.ConfigDict
  workdir: str
  run: artifacts.RunArtifacts
  mesh: jax.sharding.Mesh
  rules: Any
  model: Any
  tx: Any
  schedule: Any
  state: TrainState
  state_shardings: Any

  @property
  def fgram_set(self):
    return self.run.fgram_set


def build_model(cfg, vocab_size):
  return model_lib.SconeLM(model_lib.ModelConfig.from_config(cfg, vocab_size))


def _example_inputs(cfg, fgram_set):
  rows = cfg.batch_size // cfg.grad_accum_steps
  ex = {'inputs_BxL': jnp.zeros((rows, cfg.seq_len), jnp.int32)}
  if fgram_set is not None:
    u = cfg.fgram_model.unique_bucket
    ex['fgram_index_BxL'] = jnp.zeros((rows, cfg.seq_len), jnp.int32)
    ex['fgram_uniq_tokens_UxK'] = jnp.zeros((u, cfg.fgrams.max_len), jnp.int32)
    ex['fgram_uniq_lengths_U'] = jnp.ones((u,), jnp.int32)
  return ex


def optimizer_shardings(tx, params, param_shardings, replicated):
  """Optimizer-state leaves shaped like params are sharded like them; the rest replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def create_trainer(cfg, workdir, run: artifacts.RunArtifacts, mesh=None) -> Trainer:
  """Builds the mesh, the model and a freshly initialised, already sharded state."""
  mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_axis_rules(cfg)
  model = build_model(cfg, run.tokenizer.vocab_size)
  tx = make_optimizer(cfg)
  schedule = make_schedule(cfg)
  rng = jax.random.PRNGKey(cfg.seed)
  params, param_shardings = sharding.init_sharded(
      model, rng, _example_inputs(cfg, run.fgram_set), mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optimizer_shardings(tx, params, param_shardings, replicated)
  state_shardings = TrainState(replicated, param_shardings, opt_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = TrainState(jax.device_put(jnp.int32(0), replicated), params, opt_state)
  return Trainer(cfg, workdir, run, mesh, rules, model, tx, schedule, state, state_shardings)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir, cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_checkpoints, create=True,
      enable_async_checkpointing=cfg.async_checkpointing)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), artifacts.CHECKPOINT_DIR), options=options,
      item_names=('state', 'data', 'meta'))


def run_metadata(cfg, run: artifacts.RunArtifacts) -> dict:
  fs = run.fgram_set
  return {
      'config': json.loads(cfg.to_json_best_effort()),
      'tokenizer_fingerprint': run.tokenizer.fingerprint,
      'fgram_fingerprint': fs.fingerprint if fs is not None else None,
      'num_fgrams': len(fs) if fs is not None else 0,
      'fgram_max_len': fs.max_len if fs is not None else None,
      'vocab_size': run.tokenizer.vocab_size,
  }


def save_checkpoint(mngr, trainer: Trainer, loader_state: dict, *, force=False):
  step = int(trainer.state.step)
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(trainer.state),
      data=ocp.args.JsonSave(loader_state),
      meta=ocp.args.JsonSave(run_metadata(trainer.cfg, trainer.run))), force=force)


def check_metadata(meta: dict, run: artifacts.RunArtifacts, where: str):
  """Refuses a checkpoint trained with another tokenizer or f-gram set."""
  fs = run.fgram_set
  want = fs.fingerprint if fs is not None else None
  if meta.get('fgram_fingerprint') != want:
    raise ValueError(
        f'checkpoint {where} was trained with f-gram set {str(meta.get("fgram_fingerprint"))[:12]}'
        f' but this run uses {str(want)[:12]}; use the original f-gram set '
        '(--config.fgrams.path) or a new --workdir.')
  if meta.get('tokenizer_fingerprint') != run.tokenizer.fingerprint:
    raise ValueError(f'checkpoint {where} was trained with another tokenizer '
                     f'({str(meta.get("tokenizer_fingerprint"))[:12]} vs '
                     f'{run.tokenizer.fingerprint[:12]}); use a new --workdir.')


def restore_latest(mngr, trainer: Trainer, *, with_data=True):
  """Restores the newest checkpoint that reads back whole; falls back past corrupt ones.

  Returns (state, loader_state, step) or None when there is no usable checkpoint.
  """
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      trainer.state, trainer.state_shardings)
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    where = os.path.join(str(mngr.directory), str(step))
    try:
      items = {'state': ocp.args.StandardRestore(abstract), 'meta': ocp.args.JsonRestore()}
      if with_data:
        items['data'] = ocp.args.JsonRestore()
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
      state = restored['state']
      _check_finite(state.params, where)
    except ValueError as e:
      if 'was trained with' in str(e):
        raise
      logging.warning('checkpoint %s is unreadable (%s: %s); trying the previous one', where,
                      type(e).__name__, str(e)[:300])
      continue
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint %s is unreadable (%s: %s); trying the previous one', where,
                      type(e).__name__, str(e)[:300])
      continue
    check_metadata(restored['meta'], trainer.run, where)
    return state, restored.get('data') if with_data else None, step
  if steps:
    logging.warning('none of the checkpoints %s could be restored; starting from scratch',
                    steps)
  return None


def _check_finite(params, where):
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if not bool(jnp.all(jnp.isfinite(x)))]
  if bad:
    raise ValueError(f'non-finite values in {where}: {bad[:3]}')


# ----------------------------------------------------------------------------- eval


def evaluate(trainer: Trainer, loader, *, max_batches=0) -> dict:
  """Loss, perplexity and bits per byte over an eval loader (all batches when max_batches=0)."""
  eval_step = jax.jit(make_eval_step(trainer.model))
  nll, tokens, batches = 0.0, 0.0, 0
  for batch in loader:
    step_batch, _ = make_step_batch(batch, trainer.fgram_set, _eval_cfg(trainer.cfg))
    shardings = batch_shardings(step_batch, trainer.mesh, trainer.rules)
    with sharding.mesh_context(trainer.mesh, trainer.rules):
      out = eval_step(trainer.state.params, device_put_batch(step_batch, shardings))
    nll += float(out['nll_sum'])
    tokens += float(out['tokens'])
    batches += 1
    if max_batches and batches >= max_batches:
      break
  return eval_metrics(nll, tokens, batches, loader)


def eval_metrics(nll_sum: float, tokens: float, batches: int, loader) -> dict:
  """The eval JSON from summed negative log-likelihood and token count over a loader's batches.

  Bits per byte use the bytes per token of the loader's whole split, so a partial eval
  (max_batches) still reports it.
  """
  loss = nll_sum / max(tokens, 1.0)
  bytes_per_token = loader.num_bytes / max(loader.num_tokens, 1)
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)),
          'bits_per_byte': loss / math.log(2) / max(bytes_per_token, 1e-9),
          'tokens': int(tokens), 'batches': batches}


def _eval_cfg(cfg):
  # Eval batches are not split for accumulation.
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.grad_accum_steps = 1
  return c


# ----------------------------------------------------------------------------- loop


class _MetricsWriter:
  """metrics.jsonl always; TensorBoard too when TensorFlow is importable."""

  def __init__(self, workdir):
    self._f = open(os.path.join(workdir, artifacts.METRICS_FILE), 'a')
    self._tb = None
    if jax.process_index() == 0:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.set_visible_devices([], 'GPU')
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
        self._tf = tf
      except Exception:  # pylint: disable=broad-except
        logging.info('TensorFlow not importable: metrics go to %s only', artifacts.METRICS_FILE)

  def write(self, step, metrics: dict):
    if jax.process_index() != 0:
      return
    self._f.write(json.dumps({'step': step, **metrics}) + '\n')
    self._f.flush()
    if self._tb is not None:
      try:
        with self._tb.as_default():
          for k, v in metrics.items():
            if isinstance(v, (int, float)):
              self._tf.summary.scalar(k, v, step=step)
        self._tb.flush()
      except Exception as e:  # pylint: disable=broad-except
        # e.g. TensorFlow without the tensorboard package: keep training, JSONL still has it.
        logging.warning('TensorBoard summaries disabled (%s: %s); metrics go to %s only.',
                        type(e).__name__, e, artifacts.METRICS_FILE)
        self._tb = None

  def close(self):
    self._f.close()


def _format_eta(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def make_loaders(cfg, workdir, run: artifacts.RunArtifacts):
  cache = os.path.join(workdir, artifacts.DATA_DIR)
  train_split = data.prepare_split(run.train_docs, run.tokenizer, run.fgram_set, cache_dir=cache,
                                   name='train')
  heldout_split = data.prepare_split(run.heldout_docs, run.tokenizer, run.fgram_set,
                                     cache_dir=cache, name='heldout')
  if cfg.input_pipeline == 'seqio':
    train_task, _ = data.register_tasks(cfg, run.tokenizer, run.fgram_set,
                                        train_docs=run.train_docs,
                                        heldout_docs=run.heldout_docs)
    logging.info('training input: seqio task %s', train_task)
    train_loader = data.SeqioLoader(train_task, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                    seed=cfg.seed, shuffle=True,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  else:
    train_loader = data.Loader(train_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                               seed=cfg.seed, shuffle=True,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  eval_loader = data.Loader(heldout_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                            seed=cfg.seed, shuffle=False, eval_mode=True,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
  return train_loader, eval_loader


def train(cfg, workdir, run: artifacts.RunArtifacts, *, stop_after_steps=None) -> dict:
  """Trains (or resumes) to cfg.num_train_steps; returns the last metrics."""
  trainer = create_trainer(cfg, workdir, run)
  logging.info('mesh %s; params: %s total, %s in the f-gram model',
               dict(trainer.mesh.shape), f'{count_params(trainer.state.params):,}',
               f'{count_params(trainer.state.params.get("fgram_model", {})):,}')
  train_loader, eval_loader = make_loaders(cfg, workdir, run)
  mngr = checkpoint_manager(workdir, cfg)
  restored = restore_latest(mngr, trainer)
  if restored is not None:
    state, loader_state, step = restored
    trainer.state = state
    train_loader.restore(loader_state)
    logging.info('resumed from step %d', step)
  train_step = jax.jit(make_train_step(trainer.model, trainer.tx, trainer.schedule, cfg),
                       donate_argnums=(0,))
  writer = _MetricsWriter(workdir)
  rng = jax.random.PRNGKey(cfg.seed + 1)
  start = int(trainer.state.step)
  last = {}
  t_last, tokens_since, steps_since = time.time(), 0, 0
  t_start = time.time()
  fgram_stats = {'fgram_matched': 0, 'fgram_unique': 0, 'fgram_rows': 0}
  try:
    for step in range(start, cfg.num_train_steps):
      if stop_after_steps is not None and step - start >= stop_after_steps:
        break
      batch = train_loader.batch_at(step)
      step_batch, stats = make_step_batch(batch, trainer.fgram_set, cfg)
      for k in fgram_stats:
        fgram_stats[k] += stats[k]
      shardings = batch_shardings(step_batch, trainer.mesh, trainer.rules)
      with sharding.mesh_context(trainer.mesh, trainer.rules):
        trainer.state, metrics = train_step(trainer.state, device_put_batch(step_batch, shardings),
                                            rng)
      train_loader.restore({'step': step + 1})
      steps_since += 1
      tokens_since += int(np.sum(step_batch['loss_mask']))
      done = step + 1
      if done % cfg.log_every_steps == 0 or done == cfg.num_train_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.time() - t_last
        tps = tokens_since * jax.process_count() / max(elapsed, 1e-9)
        eta = (cfg.num_train_steps - done) * elapsed / max(steps_since, 1)
        last = {k: float(v) for k, v in metrics.items()}
        last.update(tokens_per_s=tps, step_time_s=elapsed / steps_since)
        if fgram_stats['fgram_matched']:
          last['fgram_match_rate'] = fgram_stats['fgram_matched'] / max(tokens_since, 1)
          last['fgram_rows_per_step'] = fgram_stats['fgram_rows'] / steps_since
          if cfg.fgram_model.dedupe:
            last['fgram_unique_per_step'] = fgram_stats['fgram_unique'] / steps_since
        logging.info('step %d/%d  loss %.4f  %s tokens/s  lr %.2e  ETA %s', done,
                     cfg.num_train_steps, last['loss'], f'{tps:,.0f}', last['learning_rate'],
                     _format_eta(eta))
        writer.write(done, {f'train/{k}': v for k, v in last.items()})
        t_last, tokens_since, steps_since = time.time(), 0, 0
        fgram_stats = {k: 0 for k in fgram_stats}
      if done % cfg.eval_every_steps == 0 or done == cfg.num_train_steps:
        ev = evaluate(trainer, eval_loader, max_batches=cfg.eval_batches)
        logging.info('eval at step %d: loss %.4f  ppl %.2f  bits/byte %.4f', done, ev['loss'],
                     ev['ppl'], ev['bits_per_byte'])
        writer.write(done, {f'eval/{k}': v for k, v in ev.items()})
        last.update({f'eval_{k}': v for k, v in ev.items()})
      if done % cfg.checkpoint_every_steps == 0 or done == cfg.num_train_steps:
        save_checkpoint(mngr, trainer, train_loader.state())
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  logging.info('trained steps %d..%d in %.1fs', start, int(trainer.state.step),
               time.time() - t_start)
  return last


def load_for_eval(cfg, workdir, run: artifacts.RunArtifacts) -> Trainer:
  """A trainer holding the latest good checkpoint's parameters (for --mode=eval/export)."""
  trainer = create_trainer(cfg, workdir, run)
  mngr = checkpoint_manager(workdir, cfg)
  try:
    restored = restore_latest(mngr, trainer, with_data=False)
  finally:
    mngr.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, artifacts.CHECKPOINT_DIR)};'
                            ' run --mode=train first.')
  trainer.state = restored[0]
  return trainer


def eval_documents(trainer: Trainer, docs) -> dict:
  """Evaluates on documents (e.g. --eval_text files) with the training-time pipeline."""
  split = data.prepare_split(docs, trainer.run.tokenizer, trainer.fgram_set)
  loader = data.Loader(split, seq_len=trainer.cfg.seq_len, batch_size=trainer.cfg.batch_size,
                       seed=0, shuffle=False, eval_mode=True)
  return evaluate(trainer, loader)
