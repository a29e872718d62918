"""Joint training of the main LM and the f-gram model: state, step, eval, checkpoints.

One loop, one state dataclass. The train and eval steps are jitted once per Trainer with
NamedSharding in/out shardings (what pjit became) and the state donated; parameters are
born sharded (`sharding.init_sharded`). Orbax keeps params, optimizer state, step, the
data-iterator state and run metadata (config and the f-gram set's fingerprint) together,
so a resumed run continues exactly where it stopped.

The loop (`_run_steps`) only dispatches steps; what happens beside them (logging,
profiling, eval, checkpoints, preemption) are hooks with their own cadence
(`train_hooks`). Length (~720 lines): the Trainer, its two jitted steps, eval, compiles,
the metrics writer and the loaders read as one story; the pieces that stand alone live
elsewhere (`step_batch`, `checkpoints`, `metrics`, `sharding`, `train_hooks`).
"""
import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from scone_jax import artifacts
from scone_jax import checkpoints
from scone_jax import config as config_lib
from scone_jax import fgrams
from scone_jax import flops
from scone_jax import metrics
from scone_jax import packing
from scone_jax import paths
from scone_jax import seqio_tasks
from scone_jax import token_shards
from scone_jax import train_hooks
from scone_jax import model as model_lib
from scone_jax import sharding
from scone_jax import step_batch as step_batch_lib


# jax.profiler traces of config.profile_steps, under the run directory.
PROFILE_DIR = 'profile'


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


# ----------------------------------------------------------------------------- step


def _loss_sum(params, model, mb, rng, deterministic):
  logits_BxLxV = model.apply(
      {'params': params}, mb['inputs'], positions_BxL=mb['positions'],
      segment_ids_BxL=mb['segment_ids'], fgram_index_BxL=mb.get('fgram_index'),
      fgram_tokens_RxP=mb.get('fgram_tokens'), fgram_positions_RxP=mb.get('fgram_positions'),
      deterministic=deterministic,
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
  """Holds the compiled pieces of one run; `train()` is the loop.

  train_step (state, step_batch, rng) -> (state, metrics) donates `state`; eval_step
  (params, step_batch) -> {'nll_sum', 'tokens'}. Both are jitted once, here, with in/out
  shardings (state_shardings, batch_shardings), so a batch shape seen before never
  recompiles. fgram_rows / eval_fgram_rows: the fixed packed f-gram rows per micro-batch of
  train and eval batches (0: bucketed per batch), set by the loop before its first step so
  each step has one shape (`precompile` compiles both before step 1); only a batch that
  overflows them compiles another shape.
  """
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
  batch_shardings: dict
  train_step: Callable
  eval_step: Callable
  fgram_rows: int = 0
  eval_fgram_rows: int = 0

  @property
  def fgram_set(self):
    return self.run.fgram_set


def build_model(cfg, vocab_size):
  return model_lib.SconeLM(model_lib.ModelConfig.from_config(cfg, vocab_size))


def _example_inputs(cfg, with_fgrams):
  rows = cfg.batch_size // cfg.grad_accum_steps
  ex = {'inputs_BxL': jnp.zeros((rows, cfg.seq_len), jnp.int32)}
  if with_fgrams:
    packed = (cfg.fgram_model.pack_bucket, cfg.fgram_model.pack_len)
    ex['fgram_index_BxL'] = jnp.zeros((rows, cfg.seq_len), jnp.int32)
    ex['fgram_tokens_RxP'] = jnp.zeros(packed, jnp.int32)
    ex['fgram_positions_RxP'] = jnp.zeros(packed, jnp.int32)
  return ex


def optimizer_shardings(tx, params, param_shardings, replicated):
  """Optimizer-state leaves shaped like params are sharded like them; the rest replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def create_trainer(cfg, workdir, run: artifacts.RunArtifacts, mesh=None) -> Trainer:
  """Builds the mesh, the model, a freshly initialised sharded state and the jitted steps."""
  mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_axis_rules(cfg)
  model = build_model(cfg, run.tokenizer.vocab_size)
  tx = make_optimizer(cfg)
  schedule = make_schedule(cfg)
  rng = jax.random.PRNGKey(cfg.seed)
  with_fgrams = run.fgram_set is not None
  params, param_shardings = sharding.init_sharded(
      model, rng, _example_inputs(cfg, with_fgrams), mesh, rules)
  state_shardings = make_state_shardings(tx, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  state = TrainState(jax.device_put(jnp.int32(0), state_shardings.step), params, opt_state)
  batch_shardings = step_batch_lib.batch_shardings_for(mesh, rules, with_fgrams=with_fgrams)
  train_step, eval_step = jit_steps(cfg, model, tx, schedule, mesh, rules, state_shardings,
                                    batch_shardings)
  return Trainer(cfg, workdir, run, mesh, rules, model, tx, schedule, state, state_shardings,
                 batch_shardings, train_step, eval_step)


def make_state_shardings(tx, params, param_shardings, mesh) -> TrainState:
  """The TrainState's shardings: step replicated, optimizer state sharded like params.

  params may be abstract (ShapeDtypeStructs): nothing is computed.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optimizer_shardings(tx, params, param_shardings, replicated)
  return TrainState(replicated, param_shardings, opt_shardings)


def abstract_state(cfg, model, tx, mesh, rules) -> tuple:
  """(TrainState of ShapeDtypeStructs placed in their shardings, the state's shardings).

  What create_trainer would build, without initialising or allocating anything: for
  compiling the steps ahead of time (`compile.py`) on devices this host does not have.
  """
  params, param_shardings = sharding.abstract_params(
      model, _example_inputs(cfg, cfg.fgrams.enabled), mesh, rules)
  shardings = make_state_shardings(tx, params, param_shardings, mesh)
  opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           jax.eval_shape(tx.init, params), shardings.opt_state)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step)
  return TrainState(step, params, opt_state), shardings


def jit_steps(cfg, model, tx, schedule, mesh, rules, state_shardings: TrainState,
              batch_shardings: dict) -> tuple:
  """(train_step, eval_step), jitted with in/out shardings and called under the mesh."""
  replicated = state_shardings.step
  train_step = sharding.under_mesh(jax.jit(
      make_train_step(model, tx, schedule, cfg),
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,)), mesh, rules)
  eval_step = sharding.under_mesh(jax.jit(
      make_eval_step(model), in_shardings=(state_shardings.params, batch_shardings),
      out_shardings=replicated), mesh, rules)
  return train_step, eval_step


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir, cfg, *, writer: bool = False) -> ocp.CheckpointManager:
  return checkpoints.manager(paths.join(workdir, artifacts.CHECKPOINT_DIR),
                             keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing,
                             writer=writer)


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
  return checkpoints.save(mngr, int(trainer.state.step), trainer.state, loader_state,
                          run_metadata(trainer.cfg, trainer.run), force=force)


def check_metadata(meta: dict, run: artifacts.RunArtifacts, where: str):
  """Refuses a checkpoint trained with another tokenizer or f-gram set."""
  fs = run.fgram_set
  checkpoints.check_fingerprints(meta, tokenizer=run.tokenizer.fingerprint,
                                 fgrams=fs.fingerprint if fs is not None else None, where=where)


def restore_latest(mngr, trainer: Trainer, *, with_data=True, set_aside_damaged=False):
  """Restores the newest checkpoint that reads back whole; falls back past damaged ones.

  Returns (state, loader_state, step) or None when there is no usable checkpoint. The
  trainer of the run passes set_aside_damaged: a damaged step is renamed, not left for
  orbax to delete or overwrite.
  """
  return checkpoints.restore_latest(
      mngr, checkpoints.abstract_like(trainer.state, trainer.state_shardings),
      check_meta=lambda meta, where: check_metadata(meta, trainer.run, where),
      with_data=with_data, set_aside_damaged=set_aside_damaged)


# ----------------------------------------------------------------------------- eval


def evaluate(trainer: Trainer, loader, *, max_batches=0) -> dict:
  """Loss, perplexity and bits per byte over an eval loader (all batches when max_batches=0)."""
  nll, tokens, batches, pending = 0.0, 0.0, 0, None
  for batch in loader:
    # Eval batches are not split for accumulation.
    sb, _ = step_batch_lib.make_step_batch(batch, trainer.fgram_set, trainer.cfg,
                                           grad_accum_steps=1,
                                           fgram_rows=trainer.eval_fgram_rows)
    out = trainer.eval_step(trainer.state.params,
                            step_batch_lib.device_put_batch(sb, trainer.batch_shardings))
    # Each batch's sums are read after the next one is dispatched: the device never waits
    # on the host, and at most two batches are in flight.
    if pending is not None:
      nll, tokens = nll + float(pending['nll_sum']), tokens + float(pending['tokens'])
    pending = out
    batches += 1
    if max_batches and batches >= max_batches:
      break
  if pending is not None:
    nll, tokens = nll + float(pending['nll_sum']), tokens + float(pending['tokens'])
  return eval_metrics(nll, tokens, batches, loader)


eval_metrics = metrics.eval_metrics


# ----------------------------------------------------------------------------- compiles


def enable_compilation_cache(cfg):
  """Turns JAX's persistent compilation cache on in cfg.compilation_cache_dir (or off).

  Every compile is cached (no minimum compile time), so a resumed or repeated run on this
  machine loads its steps instead of compiling them. Process-wide: the last run's setting
  wins.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  directory = None
  if cfg.compilation_cache:
    directory = cfg.compilation_cache_dir
    if not paths.is_cloud(directory):
      directory = os.path.abspath(os.path.expanduser(directory))
      os.makedirs(directory, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    cc.reset_cache()  # the cache binds its directory at first use; rebind it
  return directory


_STEP_PROGRAMS = ('jit(train_step)', 'jit(eval_step)')


class CompileCounter:
  """XLA compiles in this process while it is open: count, seconds, persistent-cache hits.

  A cache hit still counts as a compile (a fast one: its seconds are the load); `compiles`
  minus `cache_hits` were compiled from scratch.
  """

  def __init__(self):
    self.compiles, self.seconds, self.cache_hits = 0, 0.0, 0
    self.names = collections.Counter()  # compiled functions by name
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      self.compiles += 1
      self.seconds += duration
      self.names[str(kwargs.get('fun_name', '?'))] += 1

  def _on_event(self, event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      self.cache_hits += 1

  def snapshot(self) -> dict:
    return {'compiles': self.compiles, 'compile_s': self.seconds,
            'compile_cache_hits': self.cache_hits, 'step_compiles': self.step_compiles()}

  def step_compiles(self) -> int:
    """Compiles of the train and eval steps (the rest: small helpers, orbax's slicing)."""
    return sum(n for name, n in self.names.items() if name in _STEP_PROGRAMS)

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)


def set_fgram_rows(trainer: Trainer, train_loader, eval_loader, start: int):
  """Fixes the packed f-gram rows of train and eval batches for the run (see Trainer).

  Train: from cfg.fgram_model.rows_sample_batches batches from `start` on (with several
  processes, the most any process needs); eval: exactly what the eval batches need.
  """
  cfg, fs = trainer.cfg, trainer.fgram_set
  if fs is None:
    return
  n = cfg.fgram_model.rows_sample_batches
  rows = step_batch_lib.fgram_row_capacity(
      (train_loader.batch_at(s) for s in range(start, start + n)), fs, cfg)
  eval_count = eval_loader.num_batches
  if cfg.eval_batches:
    eval_count = min(eval_count, cfg.eval_batches)
  eval_rows = step_batch_lib.fgram_row_capacity(
      (eval_loader.batch_at(s) for s in range(eval_count)), fs, cfg, grad_accum_steps=1,
      headroom=0.0)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    rows, eval_rows = (int(x) for x in np.max(multihost_utils.process_allgather(
        np.asarray([rows, eval_rows], np.int64)), axis=0))
  trainer.fgram_rows, trainer.eval_fgram_rows = int(rows), int(eval_rows)


def precompile(trainer: Trainer, rng) -> dict:
  """Compiles the train and eval steps for the run's batch shapes before step 1.

  The jitted steps reuse these executables, so the loop compiles nothing more unless a
  batch overflows the fixed f-gram rows. Returns the seconds each took.
  """
  cfg = trainer.cfg
  procs = jax.process_count()
  out = {}
  for name, accum, rows in (('train', cfg.grad_accum_steps, trainer.fgram_rows),
                            ('eval', 1, trainer.eval_fgram_rows)):
    batch = step_batch_lib.abstract_step_batch(cfg, trainer.batch_shardings,
                                               num_rows=rows * procs, grad_accum_steps=accum)
    t0 = time.perf_counter()
    if name == 'train':
      trainer.train_step.lower(trainer.state, batch, rng).compile()
    else:
      trainer.eval_step.lower(trainer.state.params, batch).compile()
    out[f'{name}_step_compile_s'] = time.perf_counter() - t0
  return out


def model_flops_per_token(cfg, vocab_size: int, fgram_positions_per_token: float) -> float:
  """Training FLOPs per token (main model + f-gram model's executed slots), from flops.py."""
  c = model_lib.ModelConfig.from_config(cfg, vocab_size)
  return flops.costs(c, cfg.seq_len, fgram_positions_per_token=fgram_positions_per_token,
                     fgram_row_len=cfg.fgram_model.pack_len)['train_flops_per_token']


# ----------------------------------------------------------------------------- loop


class _MetricsWriter:
  """metrics.jsonl always (process 0); TensorBoard too when TensorFlow is importable.

  A local file is appended to and flushed per line. A Cloud Storage object cannot be
  appended to, so there the whole file (earlier lines included, read back on resume) is
  rewritten as one object per write: at most a few thousand short lines.
  """

  def __init__(self, workdir):
    self._path = paths.join(workdir, artifacts.METRICS_FILE)
    self._f = None
    self._lines = None
    self._tb = None
    if jax.process_index() != 0:
      return
    if paths.is_cloud(self._path):
      self._lines = paths.read_text(self._path) if paths.exists(self._path) else ''
    else:
      self._f = open(self._path, 'a', encoding='utf-8')
    tb_dir = paths.join(workdir, 'tensorboard')
    if paths.is_cloud(tb_dir) and paths.emulated_gcs():
      # tf.summary writes gs:// through TensorFlow's own GCS client, which has no endpoint
      # setting: it would write to the real bucket of that name, not the emulator.
      logging.info('gs:// goes to the emulator at %s, which TensorFlow cannot reach: '
                   'no TensorBoard summaries; metrics go to %s', paths.emulated_gcs(),
                   artifacts.METRICS_FILE)
      return
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')
      # tf.summary writes gs:// paths itself.
      self._tb = tf.summary.create_file_writer(tb_dir)
      self._tf = tf
    except Exception:  # pylint: disable=broad-except
      logging.info('TensorFlow not importable: metrics go to %s only', artifacts.METRICS_FILE)

  def write(self, step, metrics: dict):
    if jax.process_index() != 0:
      return
    line = json.dumps({'step': step, **metrics}) + '\n'
    if self._f is not None:
      self._f.write(line)
      self._f.flush()
    else:
      self._lines += line
      paths.atomic_write(self._path, self._lines)
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
    if self._f is not None:
      self._f.close()


def train_match_sampling(cfg, run: artifacts.RunArtifacts):
  """The training rows' `fgrams.MatchSampling` (config.fgrams.train_*), or None: matching
  the whole set, longest first (as held-out eval, export and serving always do)."""
  config_lib.check_train_matching(cfg)
  if not config_lib.train_matching_on(cfg) or run.fgram_set is None:
    return None
  return fgrams.MatchSampling(seed=int(cfg.seed),
                              keep_fraction=float(cfg.fgrams.train_subset_fraction),
                              drop_prob=float(cfg.fgrams.train_shorten_prob))


def make_loaders(cfg, workdir, run: artifacts.RunArtifacts):
  cache = paths.join(workdir, artifacts.DATA_DIR)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  sampling = train_match_sampling(cfg, run)
  if sampling is not None:
    logging.info('training rows sample their f-gram matches: %s', sampling)
  if cfg.input_pipeline == 'shards':
    shards = token_shards.TokenShards(run.train_shards, run.fgram_set, sampling=sampling)
    logging.info('training input: %d token shards in %s (%d documents, %d tokens), matched '
                 'on the fly, %d batches built ahead by %d threads', shards.index['num_shards'],
                 run.train_shards, shards.num_docs, shards.num_tokens, cfg.data.prefetch,
                 cfg.data.workers)
    train_loader = packing.Loader(shards, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                  seed=cfg.seed, shuffle=True, **process)
  elif cfg.input_pipeline == 'grain':
    from scone_jax import grain_input  # pylint: disable=g-import-not-at-top
    shards = token_shards.TokenShards(run.train_shards, run.fgram_set, sampling=sampling)
    logging.info('training input: grain over %d token shards in %s',
                 shards.index['num_shards'], run.train_shards)
    train_loader = grain_input.GrainLoader(
        shards, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True,
        prefetch=cfg.data.prefetch, workers=cfg.data.workers, **process)
  elif cfg.input_pipeline == 'seqio' and run.train_shards:
    train_task = seqio_tasks.register_shard_task(
        seqio_tasks.shard_task_name(run.train_shards, run.fgram_set), run.train_shards,
        run.fgram_set, run.tokenizer)
    logging.info('training input: seqio task %s over the token shards in %s', train_task,
                 run.train_shards)
    train_loader = seqio_tasks.SeqioLoader(train_task, seq_len=cfg.seq_len,
                                           batch_size=cfg.batch_size, seed=cfg.seed,
                                           shuffle=True, **process)
  elif cfg.input_pipeline == 'seqio':
    train_task, _ = seqio_tasks.register_tasks(cfg, run.tokenizer, run.fgram_set,
                                               train_docs=run.train_docs,
                                               heldout_docs=run.heldout_docs)
    logging.info('training input: seqio task %s', train_task)
    train_loader = seqio_tasks.SeqioLoader(train_task, seq_len=cfg.seq_len,
                                           batch_size=cfg.batch_size, seed=cfg.seed,
                                           shuffle=True, **process)
  else:
    train_split = packing.prepare_split(run.train_docs, run.tokenizer, run.fgram_set,
                                        cache_dir=cache, name='train')
    train_loader = packing.Loader(train_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                  seed=cfg.seed, shuffle=True, **process)
  heldout_split = packing.prepare_split(run.heldout_docs, run.tokenizer, run.fgram_set,
                                        cache_dir=cache, name='heldout')
  eval_loader = packing.Loader(heldout_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                               seed=cfg.seed, shuffle=False, eval_mode=True, **process)
  return train_loader, eval_loader


def train(cfg, workdir, run: artifacts.RunArtifacts, *, stop_after_steps=None) -> dict:
  """Trains (or resumes) to cfg.num_train_steps; returns the last metrics.

  A full disk while checkpointing stops with one error naming the checkpoint directory;
  the checkpoints already written stay restorable (orbax writes each step in a temporary
  directory and renames it when complete).
  """
  try:
    return _train(cfg, workdir, run, stop_after_steps=stop_after_steps)
  except Exception as e:  # pylint: disable=broad-except
    if paths.is_disk_full(e):
      raise paths.disk_full_error('a checkpoint', paths.join(workdir, artifacts.CHECKPOINT_DIR),
                                  e) from e
    raise


def _train(cfg, workdir, run: artifacts.RunArtifacts, *, stop_after_steps=None) -> dict:
  """Trains (or resumes) to cfg.num_train_steps; returns the last metrics.

  Step N's metrics are read after step N+1 is dispatched, so the host never stalls the
  device to log. A non-finite loss or gradient norm stops the run with FloatingPointError
  before its state is checkpointed; the last checkpoint saved stays the newest one.
  """
  t_start = time.time()
  cache_dir = enable_compilation_cache(cfg)
  counter = CompileCounter()
  try:
    return _train_counted(cfg, workdir, run, stop_after_steps, counter, cache_dir, t_start)
  finally:
    counter.close()


def _train_counted(cfg, workdir, run, stop_after_steps, counter, cache_dir, t_start) -> dict:
  """Sets the run up (trainer, restore, compiles), builds its hooks and runs the loop.

  Length (~75 lines): the setup is one sequence whose pieces the hooks close over; split,
  they would be passed around as a dozen arguments.
  """
  trainer = create_trainer(cfg, workdir, run)
  logging.info('mesh %s; params: %s total, %s in the f-gram model',
               dict(trainer.mesh.shape), f'{count_params(trainer.state.params):,}',
               f'{count_params(trainer.state.params.get("fgram_model", {})):,}')
  train_loader, eval_loader = make_loaders(cfg, workdir, run)
  mngr = checkpoint_manager(workdir, cfg, writer=True)
  s = train_hooks.LoopState(cfg, checkpoint_dir=str(mngr.directory))
  restored = restore_latest(mngr, trainer, set_aside_damaged=True)
  if restored is not None:
    trainer.state, loader_state, s.last_saved = restored
    train_loader.restore(loader_state)
    logging.info('resumed from step %d', s.last_saved)
  replicated = trainer.state_shardings.step
  params_finite = jax.jit(_all_finite, out_shardings=replicated)
  writer = _MetricsWriter(workdir)
  rng = jax.device_put(jax.random.PRNGKey(cfg.seed + 1), replicated)
  start = int(trainer.state.step)
  end = cfg.num_train_steps
  if stop_after_steps is not None:
    end = min(end, start + stop_after_steps)
  # One shape per step: fixed f-gram rows, both steps compiled (or loaded from the
  # persistent cache) before step 1.
  set_fgram_rows(trainer, train_loader, eval_loader, start)
  compiled = precompile(trainer, rng)
  params_finite.lower(trainer.state.params).compile()
  compiled.update(counter.snapshot())
  logging.info('compiled before step 1: train step %.1fs, eval step %.1fs (%d XLA compiles, '
               '%d from the persistent cache%s); f-gram rows per micro-batch: train %d, eval %d',
               compiled['train_step_compile_s'], compiled['eval_step_compile_s'],
               counter.compiles, counter.cache_hits, f' in {cache_dir}' if cache_dir else ': off',
               trainer.fgram_rows, trainer.eval_fgram_rows)

  def build(step):  # read, match, pack, dedupe: in background threads when prefetching
    return step_batch_lib.make_step_batch(train_loader.batch_at(step), trainer.fgram_set, cfg,
                                          fgram_rows=trainer.fgram_rows)

  # A seqio loader streams in order: one builder thread keeps its reads sequential.
  workers = 1 if cfg.input_pipeline == 'seqio' else cfg.data.workers
  built = packing.ahead(build, range(start, end), prefetch=cfg.data.prefetch, workers=workers)
  hooks = [
      train_hooks.ProfileHook(cfg.profile_steps, paths.join(workdir, PROFILE_DIR),
                              lambda: trainer.state),
      train_hooks.LoggingHook(
          cfg, writer, counter,
          # Written with the first logged step (metrics.jsonl's first line stays a step's).
          compile_line={f'compile/{k}': v for k, v in compiled.items()}
          | {'compile/fgram_rows': trainer.fgram_rows,
             'compile/eval_fgram_rows': trainer.eval_fgram_rows},
          flops_per_token=lambda f: model_flops_per_token(cfg, run.tokenizer.vocab_size, f),
          peak_flops=cfg.peak_flops_per_chip or flops.peak_flops(jax.devices()[0].device_kind),
          fgram_rows=trainer.fgram_rows),
      train_hooks.EvalHook(cfg, writer, lambda: evaluate(trainer, eval_loader,
                                                         max_batches=cfg.eval_batches)),
      train_hooks.CheckpointHook(
          cfg, lambda: bool(params_finite(trainer.state.params)),
          lambda force: save_checkpoint(mngr, trainer, train_loader.state(), force=force)),
      train_hooks.PreemptionHook(),
  ]
  try:
    _run_steps(trainer, train_loader, zip(range(start, end), built), rng, hooks, s)
  finally:
    for hook in hooks:
      hook.close(s)
    built.close()  # stops the builders (those running finish; the rest are dropped)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  logging.info('trained steps %d..%d in %.1fs', start, int(trainer.state.step),
               time.time() - t_start)
  return s.last


def _run_steps(trainer: Trainer, train_loader, batches, rng, hooks, s) -> None:
  """The loop: dispatch each step, calling the hooks around it (train_hooks.Hook)."""
  for step, (sb, stats) in batches:
    done = step + 1
    s.step_batch, s.stats = sb, stats
    for hook in hooks:
      hook.before_step(done, s)
    trainer.state, s.metrics = trainer.train_step(
        trainer.state, step_batch_lib.device_put_batch(sb, trainer.batch_shardings), rng)
    train_loader.restore({'step': done})
    for hook in hooks:
      hook.after_step(done, s)
    due = [hook for hook in hooks if hook.due(done, s)]
    t_pause = time.time()
    pausing = any(hook.pauses for hook in due)
    if pausing:
      for hook in hooks:
        hook.flush(s)
    for hook in due:
      hook.run(done, s)
    if pausing:
      for hook in hooks:
        hook.paused(time.time() - t_pause)
    if s.stop:
      break
  for hook in hooks:
    hook.flush(s)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def load_for_eval(cfg, workdir, run: artifacts.RunArtifacts) -> Trainer:
  """A trainer holding the latest good checkpoint's parameters (for --mode=eval/export)."""
  trainer = create_trainer(cfg, workdir, run)
  mngr = checkpoint_manager(workdir, cfg)
  try:
    restored = restore_latest(mngr, trainer, with_data=False)
  finally:
    mngr.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {paths.join(workdir, artifacts.CHECKPOINT_DIR)};'
                            ' run --mode=train first.')
  trainer.state = restored[0]
  return trainer


def eval_documents(trainer: Trainer, docs) -> dict:
  """Evaluates on documents (e.g. --eval_text files) with the training-time pipeline."""
  split = packing.prepare_split(docs, trainer.run.tokenizer, trainer.fgram_set)
  loader = packing.Loader(split, seq_len=trainer.cfg.seq_len, batch_size=trainer.cfg.batch_size,
                       seed=0, shuffle=False, eval_mode=True)
  return evaluate(trainer, loader)
