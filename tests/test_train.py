"""Joint training: config checks, sharded == unsharded, resume == uninterrupted, loss goes down."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scone_jax import artifacts
from scone_jax import packing
from scone_jax import seqio_tasks
from scone_jax import sharding
from scone_jax import train
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_setup(tmp_path_factory):
  """Corpus, tokenizer and f-gram set built once for the module."""
  root = tmp_path_factory.mktemp('tiny')
  tiny.write_corpus(str(root / 'corpus'))
  cfg = tiny.tiny_config(str(root / 'corpus'))
  workdir = str(root / 'base')
  run = artifacts.prepare_run(cfg, workdir)
  cfg.tokenizer.path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  cfg.fgrams.path = os.path.join(workdir, artifacts.FGRAMS_FILE)
  return root, cfg, run


def _copy(cfg):
  return type(cfg)(cfg.to_dict())


# ----------------------------------------------------------------------------- config errors


def test_unknown_config_key_fails(run_setup):
  cfg = _copy(run_setup[1])
  cfg.model.num_layer = 3  # typo
  with pytest.raises(ValueError, match='unknown config field config.model.num_layer'):
    train.validate_config(cfg)


def test_mesh_that_does_not_divide_devices_fails(run_setup):
  cfg = _copy(run_setup[1])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 3, 1, 1
  with pytest.raises(ValueError, match='8 devices'):
    train.validate_config(cfg)


def test_seq_len_shorter_than_max_len_fails(run_setup):
  cfg = _copy(run_setup[1])
  cfg.seq_len = 3
  with pytest.raises(ValueError, match='seq_len=3 is shorter than config.fgrams.max_len=4'):
    train.validate_config(cfg)


def test_batch_must_split_over_mesh(run_setup):
  cfg = _copy(run_setup[1])
  cfg.batch_size = 4  # 8 data shards
  with pytest.raises(ValueError, match='divisible by mesh data'):
    train.validate_config(cfg)


# ----------------------------------------------------------------------------- sharding


def _steps(cfg, run, mesh, n):
  trainer = train.create_trainer(cfg, '/unused', run, mesh=mesh)
  loader, _ = train.make_loaders(cfg, str(run_setup_workdir(cfg)), run)
  step_fn = jax.jit(train.make_train_step(trainer.model, trainer.tx, trainer.schedule, cfg))
  rng = jax.random.PRNGKey(1)
  losses, grad_norms = [], []
  state = trainer.state
  for step in range(n):
    step_batch, _ = train.make_step_batch(loader.batch_at(step), run.fgram_set, cfg)
    shardings = train.batch_shardings(step_batch, mesh, trainer.rules)
    with sharding.mesh_context(mesh, trainer.rules):
      state, metrics = step_fn(state, train.device_put_batch(step_batch, shardings), rng)
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  return np.array(losses), np.array(grad_norms), jax.device_get(state.params)


def run_setup_workdir(cfg):
  return os.path.dirname(cfg.tokenizer.path)


def test_sharded_matches_single_device(run_setup):
  _, cfg, run = run_setup
  cfg = _copy(cfg)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh8 = sharding.make_mesh(cfg.mesh)
  single = _copy(cfg)
  single.mesh.data, single.mesh.fsdp, single.mesh.tensor = 1, 1, 1
  mesh1 = sharding.make_mesh(single.mesh, devices=jax.devices()[:1])
  l8, g8, p8 = _steps(cfg, run, mesh8, 3)
  l1, g1, p1 = _steps(single, run, mesh1, 3)
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  np.testing.assert_allclose(g8, g1, rtol=2e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)


def test_grad_accumulation_matches_full_batch(run_setup):
  _, cfg, run = run_setup
  cfg = _copy(cfg)
  cfg.batch_size = 16
  accum = _copy(cfg)
  accum.grad_accum_steps = 2
  mesh = sharding.make_mesh(cfg.mesh)
  l_full, g_full, _ = _steps(cfg, run, mesh, 2)
  l_acc, g_acc, _ = _steps(accum, run, mesh, 2)
  np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
  np.testing.assert_allclose(g_acc, g_full, rtol=1e-4)


# ----------------------------------------------------------------------------- training


def test_heldout_loss_goes_down_and_checkpoints_restore(run_setup):
  root, cfg, run = run_setup
  cfg = _copy(cfg)
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


def test_restore_onto_a_different_mesh(run_setup):
  root, cfg, run = run_setup
  cfg = _copy(cfg)
  cfg.num_train_steps = 2
  workdir = str(root / 'remesh')
  train.train(cfg, workdir, run)
  saved = train.load_for_eval(cfg, workdir, run)
  other = _copy(cfg)
  other.mesh.data, other.mesh.fsdp, other.mesh.tensor = 2, 2, 2
  moved = train.load_for_eval(other, workdir, run)
  assert moved.mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.state.params),
               jax.device_get(moved.state.params))


def test_checkpoint_from_another_fgram_set_is_refused(run_setup):
  root, cfg, run = run_setup
  cfg = _copy(cfg)
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


def test_sigkill_then_resume_is_bitwise_identical(run_setup, tmp_path):
  root, cfg, _ = run_setup
  steps = 8
  config_path = tiny.write_config_file(
      str(tmp_path / 'cfg.py'), os.path.dirname(cfg.corpus.train_files), steps=steps,
      tokenizer=cfg.tokenizer.path)
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  p = _main(config_path, straight)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out

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
