"""Joint training: config checks, sharded == unsharded, resume == uninterrupted, loss goes down."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scone_jax import artifacts
from scone_jax import fgrams
from scone_jax import packing
from scone_jax import preemption
from scone_jax import seqio_tasks
from scone_jax import config as config_lib
from scone_jax import sharding
from scone_jax import step_batch
from scone_jax import token_shards
from scone_jax import train
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_setup(tmp_path_factory):
  """Corpus, tokenizer and f-gram set built once for the module."""
  root = tmp_path_factory.mktemp('tiny')
  cfg, run = tiny.prepared_run(str(root))
  return root, cfg, run


# ----------------------------------------------------------------------------- config errors


def test_unknown_config_key_fails(run_setup):
  cfg = tiny.copy_config(run_setup[1])
  cfg.model.num_layer = 3  # typo
  with pytest.raises(ValueError, match='unknown config field config.model.num_layer'):
    train.validate_config(cfg)


def test_mesh_that_does_not_divide_devices_fails(run_setup):
  cfg = tiny.copy_config(run_setup[1])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 3, 1, 1
  with pytest.raises(ValueError, match='8 devices'):
    train.validate_config(cfg)


def test_seq_len_shorter_than_max_len_fails(run_setup):
  cfg = tiny.copy_config(run_setup[1])
  cfg.seq_len = 3
  with pytest.raises(ValueError, match='seq_len=3 is shorter than config.fgrams.max_len=4'):
    train.validate_config(cfg)


def test_batch_must_split_over_mesh(run_setup):
  cfg = tiny.copy_config(run_setup[1])
  cfg.batch_size = 4  # 8 data shards
  with pytest.raises(ValueError, match='divisible by mesh data'):
    train.validate_config(cfg)


@pytest.mark.parametrize('changes, message', [
    ({'fgrams.train_subset_fraction': 0.0}, 'train_subset_fraction=0.0 must be in'),
    ({'fgrams.train_subset_fraction': 1.5}, 'train_subset_fraction=1.5 must be in'),
    ({'fgrams.train_shorten_prob': 1.0}, 'train_shorten_prob=1.0 must be in'),
    ({'fgrams.train_shorten_prob': 0.3, 'input_pipeline': 'numpy'},
     "need input_pipeline 'shards' or 'grain'"),
    ({'fgrams.train_subset_fraction': 0.5, 'input_pipeline': 'seqio'},
     "need input_pipeline 'shards' or 'grain'"),
    ({'fgrams.train_shorten_prob': 0.3, 'fgrams.enabled': False},
     'config.fgrams.enabled is False'),
])
def test_training_remedies_out_of_range_or_unsupported_fail(run_setup, changes, message):
  cfg = tiny.copy_config(run_setup[1])
  for key, value in changes.items():
    group, field = key.split('.') if '.' in key else (None, key)
    (cfg[group] if group else cfg)[field] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(cfg)


def test_training_remedies_change_only_the_training_rows_matches(run_setup, tmp_path):
  """Same rows in the same order; only their f-gram matches change, to shorter or none;
  held-out rows keep the whole set; grain reads the shards input's sampled rows."""
  _, cfg, run = run_setup
  base_train, base_eval = train.make_loaders(cfg, str(tmp_path / 'base'), run)
  for field, value in (('train_subset_fraction', 0.3), ('train_shorten_prob', 0.5)):
    c = tiny.copy_config(cfg)
    c.fgrams[field] = value
    sampled, heldout = train.make_loaders(c, str(tmp_path / field), run)
    c.input_pipeline = 'grain'
    via_grain, _ = train.make_loaders(c, str(tmp_path / field), run)
    for step in (0, 3):
      want, got = base_train.batch_at(step), sampled.batch_at(step)
      for k in packing.BATCH_KEYS:
        if not k.startswith('fgram_'):
          np.testing.assert_array_equal(got[k], want[k], err_msg=k)
      assert (got['fgram_lengths'] <= want['fgram_lengths']).all(), field
      assert (got['fgram_ids'] >= 0).mean() < (want['fgram_ids'] >= 0).mean() - 0.05, field
      for k, v in via_grain.batch_at(step).items():
        np.testing.assert_array_equal(v, got[k], err_msg=f'grain {k}')
    for want, got in zip(base_eval, heldout):
      for k in packing.BATCH_KEYS:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'held-out {k}')
  # The kernel itself at fraction 1 / prob 0 gives the shards input's rows unchanged.
  whole = token_shards.TokenShards(run.train_shards, run.fgram_set,
                                   sampling=fgrams.MatchSampling(seed=cfg.seed))
  rows = base_train.global_rows(2)
  for k, v in whole.rows(rows, cfg.seq_len).items():
    np.testing.assert_array_equal(v, base_train.split.rows(rows, cfg.seq_len)[k], err_msg=k)


# ----------------------------------------------------------------------------- sharding


def _steps(cfg, run, mesh, n):
  """n steps of the trainer's compiled step, as `train.train` runs them."""
  trainer = train.create_trainer(cfg, '/unused', run, mesh=mesh)
  loader, _ = train.make_loaders(cfg, str(run_setup_workdir(cfg)), run)
  rng = jax.random.PRNGKey(1)
  losses, grad_norms = [], []
  state = trainer.state
  for step in range(n):
    sb, _ = step_batch.make_step_batch(loader.batch_at(step), run.fgram_set, cfg)
    state, metrics = trainer.train_step(
        state, step_batch.device_put_batch(sb, trainer.batch_shardings), rng)
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  return np.array(losses), np.array(grad_norms), jax.device_get(state.params)


def run_setup_workdir(cfg):
  return os.path.dirname(cfg.tokenizer.path)


def test_sharded_matches_single_device(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh8 = sharding.make_mesh(cfg.mesh)
  single = tiny.copy_config(cfg)
  single.mesh.data, single.mesh.fsdp, single.mesh.tensor = 1, 1, 1
  mesh1 = sharding.make_mesh(single.mesh, devices=jax.devices()[:1])
  l8, g8, p8 = _steps(cfg, run, mesh8, 3)
  l1, g1, p1 = _steps(single, run, mesh1, 3)
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  np.testing.assert_allclose(g8, g1, rtol=2e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)


def test_grad_accumulation_matches_full_batch(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.batch_size = 16
  accum = tiny.copy_config(cfg)
  accum.grad_accum_steps = 2
  mesh = sharding.make_mesh(cfg.mesh)
  l_full, g_full, _ = _steps(cfg, run, mesh, 2)
  l_acc, g_acc, _ = _steps(accum, run, mesh, 2)
  np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
  np.testing.assert_allclose(g_acc, g_full, rtol=1e-4)


# ----------------------------------------------------------------------------- config fields


def test_schema_declares_every_field_the_model_and_sharding_read(run_setup):
  cfg = tiny.copy_config(run_setup[1])
  cfg.model.remat, cfg.model.scan_layers = True, True
  config_lib.validate(cfg)
  mc = train.model_lib.ModelConfig.from_config(cfg, 400)
  assert mc.remat and mc.scan_layers
  assert sharding.logical_axis_rules(cfg) == config_lib.DEFAULT_RULES
  cfg.logical_axis_rules = (('mlp', 'model'),)
  with pytest.raises(ValueError, match="logical_axis_rules.0.*unknown mesh axis 'model'"):
    config_lib.validate(cfg)
  cfg.logical_axis_rules = (('mlps', 'tensor'),)
  with pytest.raises(ValueError, match='logical_axis_rules.0.*a logical axis among'):
    config_lib.validate(cfg)


def _step_jaxpr(cfg, run, mesh):
  trainer = train.create_trainer(cfg, '/unused', run, mesh=mesh)
  loader, _ = train.make_loaders(cfg, str(run_setup_workdir(cfg)), run)
  sb, _ = step_batch.make_step_batch(loader.batch_at(0), run.fgram_set, cfg)
  fn = train.make_train_step(trainer.model, trainer.tx, trainer.schedule, cfg)
  with sharding.mesh_context(mesh, trainer.rules):
    return str(jax.make_jaxpr(fn)(trainer.state, sb, jax.random.PRNGKey(1)))


def test_remat_config_recomputes_blocks_with_the_same_gradients(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  remat = tiny.copy_config(cfg)
  remat.model.remat = True
  mesh = sharding.make_mesh(cfg.mesh)
  l0, g0, p0 = _steps(cfg, run, mesh, 2)
  l1, g1, p1 = _steps(remat, run, mesh, 2)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(g1, g0, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p0)
  # jax.checkpoint is the 'remat2' primitive (printed as checkpoint in newer jax).
  has_remat = lambda text: 'remat' in text or 'checkpoint' in text
  assert has_remat(_step_jaxpr(remat, run, mesh))
  assert not has_remat(_step_jaxpr(cfg, run, mesh))


def _restack(params, cfg):
  """Unscanned params (layers_0..N-1) -> the scanned layout (one 'layers' with axis N)."""
  out = dict(params)
  for part, n in (('decoder', cfg.model.num_layers), ('fgram_model', cfg.fgram_model.num_layers)):
    sub = {k: v for k, v in params[part].items() if not k.startswith('layers_')}
    sub['layers'] = jax.tree.map(lambda *xs: np.stack(xs),
                                 *[params[part][f'layers_{i}'] for i in range(n)])
    out[part] = sub
  return out


def test_scan_layers_config_stacks_blocks_and_computes_the_same(run_setup):
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  scanned = tiny.copy_config(cfg)
  scanned.model.scan_layers = True
  mesh = sharding.make_mesh(cfg.mesh)
  plain_t = train.create_trainer(cfg, '/unused', run, mesh=mesh)
  scan_t = train.create_trainer(scanned, '/unused', run, mesh=mesh)
  kernel = scan_t.state.params['decoder']['layers']['attention']['query']['kernel']
  assert kernel.shape[0] == cfg.model.num_layers
  assert 'layers_0' not in scan_t.state.params['decoder']
  stacked = _restack(jax.device_get(plain_t.state.params), cfg)
  assert jax.tree.structure(stacked) == jax.tree.structure(scan_t.state.params)
  scan_t.state = scan_t.state.replace(
      params=jax.device_put(stacked, scan_t.state_shardings.params))
  _, eval_loader = train.make_loaders(cfg, str(root / 'scan'), run)
  want = train.evaluate(plain_t, eval_loader, max_batches=2)
  got = train.evaluate(scan_t, eval_loader, max_batches=2)
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
  losses, grad_norms, _ = _steps(scanned, run, mesh, 2)
  assert np.isfinite(losses).all() and np.isfinite(grad_norms).all()


def test_logical_axis_rules_config_changes_parameter_sharding(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(cfg.mesh)
  custom = tiny.copy_config(cfg)
  custom.logical_axis_rules = tuple((name, None if name == 'mlp' else axes)
                                    for name, axes in config_lib.DEFAULT_RULES)
  config_lib.validate(custom)
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  for c, want in ((cfg, P('fsdp', 'tensor')), (custom, P('fsdp', None))):
    trainer = train.create_trainer(c, '/unused', run, mesh=mesh)
    wi = trainer.state.params['decoder']['layers_0']['mlp']['wi']['kernel']
    assert wi.sharding.spec == want
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(trainer.state.opt_state)
               if "['decoder']['layers_0']['mlp']['wi']['kernel']" in jax.tree_util.keystr(path)]
    assert moments and all(m.sharding.spec == want for m in moments)


# ----------------------------------------------------------------------------- compiled steps


class _Compiles:
  """Counts XLA compilations of functions named `name` while the context is open."""
  _open = []
  _listening = False

  def __init__(self, name):
    self.name, self.count = name, 0

  def __enter__(self):
    if not _Compiles._listening:
      jax.monitoring.register_event_duration_secs_listener(_Compiles._on_event)
      _Compiles._listening = True
    _Compiles._open.append(self)
    return self

  def __exit__(self, *exc):
    _Compiles._open.remove(self)

  @staticmethod
  def _on_event(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      for c in _Compiles._open:
        if c.name in str(kwargs.get('fun_name', '')):
          c.count += 1


def test_eval_step_compiles_once_across_evaluate_calls(run_setup):
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  trainer = train.create_trainer(cfg, '/unused', run)
  _, eval_loader = train.make_loaders(cfg, str(root / 'evalonce'), run)
  shapes = {step_batch.make_step_batch(b, run.fgram_set, cfg, grad_accum_steps=1)[0][
      'fgram_tokens'].shape for b in eval_loader}
  with _Compiles('eval_step') as first:
    a = train.evaluate(trainer, eval_loader)
  with _Compiles('eval_step') as again:
    b = train.evaluate(trainer, eval_loader)
    train.evaluate(trainer, eval_loader, max_batches=1)
  assert 1 <= first.count <= len(shapes), (first.count, shapes)
  assert again.count == 0
  assert a == b


def test_train_step_compiles_once_per_batch_shape(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  trainer = train.create_trainer(cfg, '/unused', run)
  loader, _ = train.make_loaders(cfg, str(run_setup_workdir(cfg)), run)
  batches = [step_batch.make_step_batch(loader.batch_at(s), run.fgram_set, cfg)[0]
             for s in range(6)]
  shapes = {b['fgram_tokens'].shape for b in batches}
  rng = jax.random.PRNGKey(1)
  with _Compiles('train_step') as compiles:
    for _ in range(2):
      for b in batches:
        trainer.state, metrics = trainer.train_step(
            trainer.state, step_batch.device_put_batch(b, trainer.batch_shardings), rng)
      jax.block_until_ready(metrics)
      if _ == 0:
        first = compiles.count
  assert first == len(shapes) and compiles.count == first, (first, compiles.count, shapes)
  # The state comes back in the shardings it went in with (nothing to re-layout next step).
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), trainer.state,
               trainer.state_shardings)


# ----------------------------------------------------------------------------- training


def test_heldout_loss_goes_down_and_checkpoints_restore(run_setup):
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.num_train_steps = 30
  cfg.checkpoint_every_steps = 10
  cfg.eval_batches = 0
  workdir = str(root / 'learn')
  trainer = train.create_trainer(cfg, workdir, run)
  _, eval_loader = train.make_loaders(cfg, workdir, run)
  before = train.evaluate(trainer, eval_loader)
  last = train.train(cfg, workdir, run)
  assert last['eval_loss'] < before['loss'] - 0.5, (before, last)
  assert np.isfinite(last['eval_bits_per_byte'])

  # A corrupt latest checkpoint is skipped with a warning; the previous good one is used.
  ckpt = os.path.join(workdir, artifacts.CHECKPOINT_DIR)
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [10, 20, 30]
  for dirpath, _, files in os.walk(os.path.join(ckpt, '30', 'state')):
    for name in files:
      with open(os.path.join(dirpath, name), 'r+b') as f:
        f.truncate(max(os.path.getsize(os.path.join(dirpath, name)) // 3, 0))
  fresh = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  restored = train.restore_latest(mngr, fresh)
  mngr.close()
  assert restored is not None and restored[2] == 20


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(run_setup, monkeypatch):
  """A NaN from the 5th step on (loss and parameters) stops the run naming the step; the
  checkpoint of step 4 stays the newest and restores."""
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.num_train_steps, cfg.checkpoint_every_steps = 8, 2
  workdir = str(root / 'nan')
  real = train.make_train_step

  def poisoned(model, tx, schedule, c):
    step_fn = real(model, tx, schedule, c)

    def step(state, sb, rng):
      new, metrics = step_fn(state, sb, rng)
      bad = state.step >= 4
      params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
      return new.replace(params=params), dict(metrics, loss=jnp.where(bad, jnp.nan,
                                                                      metrics['loss']))
    return step

  monkeypatch.setattr(train, 'make_train_step', poisoned)
  ckpt = os.path.join(workdir, artifacts.CHECKPOINT_DIR)
  with pytest.raises(FloatingPointError,
                     match=r'^non-finite loss at step 5 \(loss nan, grad_norm [0-9.e+-]+\); '
                           rf'the last good checkpoint is step 4 in {re.escape(ckpt)}\. Lower '):
    train.train(cfg, workdir, run)
  monkeypatch.undo()
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [2, 4]
  fresh = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  state, loader_state, step = train.restore_latest(mngr, fresh)
  mngr.close()
  assert step == 4 and loader_state == {'step': 4} and int(state.step) == 4


def test_restore_onto_a_different_mesh(run_setup):
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.num_train_steps = 2
  workdir = str(root / 'remesh')
  train.train(cfg, workdir, run)
  saved = train.load_for_eval(cfg, workdir, run)
  other = tiny.copy_config(cfg)
  other.mesh.data, other.mesh.fsdp, other.mesh.tensor = 2, 2, 2
  moved = train.load_for_eval(other, workdir, run)
  assert moved.mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.state.params),
               jax.device_get(moved.state.params))


def test_checkpoint_from_another_fgram_set_is_refused(run_setup):
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.num_train_steps = 2
  workdir = str(root / 'refuse')
  train.train(cfg, workdir, run)
  other = artifacts.RunArtifacts(run.tokenizer, type(run.fgram_set).from_ngrams(
      [run.fgram_set.ngram(i) for i in range(len(run.fgram_set) - 1)],
      run.fgram_set.counts[:-1], run.fgram_set.max_len), run.train_docs, run.heldout_docs)
  with pytest.raises(ValueError, match='trained with f-gram set'):
    train.load_for_eval(cfg, workdir, other)


def _main(config_path, workdir, *extra, **popen):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  cmd = [sys.executable, '-m', 'scone_jax.main', '--mode=train', f'--config={config_path}',
         f'--workdir={workdir}', *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _final_params(workdir, step):
  path = os.path.join(workdir, artifacts.CHECKPOINT_DIR, str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)['params']


def _uninterrupted_run(run_setup, tmp_path, steps, *extra):
  """(config file, workdir) of a CLI run trained to `steps` without interruption."""
  _, cfg, _ = run_setup
  config_path = tiny.write_config_file(
      str(tmp_path / 'cfg.py'), os.path.dirname(cfg.corpus.train_files), steps=steps,
      tokenizer=cfg.tokenizer.path)
  straight = str(tmp_path / 'straight')
  p = _main(config_path, straight, *extra)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  return config_path, straight


def test_sigkill_then_resume_is_bitwise_identical(run_setup, tmp_path):
  steps = 8
  config_path, straight = _uninterrupted_run(run_setup, tmp_path, steps)
  killed = str(tmp_path / 'killed')

  p = _main(config_path, killed, '--config.checkpoint_every_steps=2')
  ckpt = os.path.join(killed, artifacts.CHECKPOINT_DIR)
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    if any(s >= 4 for s in done) or p.poll() is not None:
      break
    time.sleep(0.05)
  assert p.poll() is None, 'run finished before it could be killed: ' + p.communicate()[0]
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.isdir(os.path.join(ckpt, str(steps)))
  p = _main(config_path, killed, '--config.checkpoint_every_steps=2')
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert 'resumed from step' in out, out
  jax.tree.map(np.testing.assert_array_equal, _final_params(straight, steps),
               _final_params(killed, steps))


def test_sigterm_checkpoints_the_current_step_and_resume_is_bitwise_identical(run_setup,
                                                                              tmp_path):
  """Preemption: SIGTERM mid-run saves a checkpoint at the step it finishes (not a periodic
  one: checkpoint_every_steps is beyond the run), exits with preemption.EXIT_CODE, and the
  same command resumes there and ends bitwise equal to an uninterrupted run."""
  _sigterm_then_resume(run_setup, tmp_path)


def _sigterm_then_resume(run_setup, tmp_path, *extra, steps=12) -> str:
  """The SIGTERM test's body, every run with `extra` flags; the resumed run's output."""
  config_path, straight = _uninterrupted_run(run_setup, tmp_path, steps, *extra)
  stopped = str(tmp_path / 'stopped')
  every = '--config.checkpoint_every_steps=1000'
  p = _main(config_path, stopped, every, *extra)
  metrics = os.path.join(stopped, artifacts.METRICS_FILE)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if os.path.isfile(metrics) and os.path.getsize(metrics):   # step 2 was logged
      break
    time.sleep(0.02)
  assert p.poll() is None, 'run finished before SIGTERM: ' + p.communicate()[0]
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == preemption.EXIT_CODE, out
  ckpt = os.path.join(stopped, artifacts.CHECKPOINT_DIR)
  saved = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < steps, (saved, out)
  assert f'stopping at step {saved[0]}' in out, out
  assert any(json.loads(line).get('preempted_at_step') == saved[0]
             for line in out.splitlines() if line.startswith('{')), out
  p = _main(config_path, stopped, every, *extra)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert f'resumed from step {saved[0]}' in out, out
  jax.tree.map(np.testing.assert_array_equal, _final_params(straight, steps),
               _final_params(stopped, steps))
  return out


@pytest.mark.parametrize('remedy', ['--config.fgrams.train_subset_fraction=0.5',
                                    '--config.fgrams.train_shorten_prob=0.3'])
def test_training_remedies_train_and_resume_exactly(run_setup, tmp_path, remedy):
  """Each of issue 29's remedies: the run samples its matches (logged), and a SIGTERM
  resume ends bitwise equal to an uninterrupted run (the samples are hashes, not state)."""
  out = _sigterm_then_resume(run_setup, tmp_path, remedy)
  assert 'training rows sample their f-gram matches' in out, out


def test_seqio_pipeline_trains_and_resumes_exactly(tmp_path):
  """input_pipeline='seqio': batches from the seqio task; a fresh loader at step s (resume)
  reads what the uninterrupted stream reads, and training on it runs."""
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  cfg = tiny.tiny_config(corpus_dir, steps=3)
  cfg.input_pipeline = 'seqio'
  workdir = str(tmp_path / 'run')
  run = artifacts.prepare_run(cfg, workdir)
  task, _ = seqio_tasks.register_tasks(cfg, run.tokenizer, run.fgram_set, train_docs=run.train_docs,
                                heldout_docs=run.heldout_docs)
  stream = seqio_tasks.SeqioLoader(task, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=3)
  straight = [stream.batch_at(s) for s in range(6)]
  resumed = seqio_tasks.SeqioLoader(task, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=3)
  for s in (4, 5):
    got = resumed.batch_at(s)
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], straight[s][k])
  assert not np.array_equal(straight[0]['inputs'], straight[1]['inputs'])
  assert (straight[0]['fgram_ids'] >= 0).any()
  last = train.train(cfg, workdir, run)
  assert np.isfinite(last['loss'])


def test_seqio_pipeline_over_given_token_shards(run_setup, tmp_path):
  """input_pipeline='seqio' with data.train_shards: the shard Task feeds training, and its
  first epoch is a permutation of the token shards' rows."""
  from scone_jax import token_shards  # pylint: disable=g-import-not-at-top
  root, cfg, _ = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.input_pipeline = 'seqio'
  cfg.data.train_shards = str(root / 'base' / artifacts.DATA_DIR / artifacts.TRAIN_SHARDS_DIR)
  workdir = str(tmp_path / 'run')
  run = artifacts.prepare_run(cfg, workdir)
  assert run.train_shards == cfg.data.train_shards
  train_loader, _ = train.make_loaders(cfg, workdir, run)
  assert train_loader.task_name.startswith('scone_train_shards_')
  shards = token_shards.TokenShards(cfg.data.train_shards, run.fgram_set)
  num_rows = packing.num_rows(shards, cfg.seq_len)
  batches = [train_loader.batch_at(s) for s in range(-(-num_rows // cfg.batch_size))]
  got = np.stack([np.concatenate([b[k] for b in batches])[:num_rows]
                  for k in packing.BATCH_KEYS], -1)
  want = np.stack([shards.rows(np.arange(num_rows), cfg.seq_len)[k]
                   for k in packing.BATCH_KEYS], -1)
  assert sorted(map(bytes, got)) == sorted(map(bytes, want))
  assert not np.array_equal(got, want)  # shuffled
