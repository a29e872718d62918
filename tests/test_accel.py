"""Training at accelerator speed: one compile per run, the persistent compilation cache,
fixed f-gram rows (and the batch that needs more), MFU in the metrics, profiler traces."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax import config as config_lib
from scone_jax import flops
from scone_jax import step_batch
from scone_jax import train
import tiny


@pytest.fixture(scope='module')
def run_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('accel')
  cfg, run = tiny.prepared_run(str(root))
  cfg.compilation_cache_dir = str(root / 'xla_cache')
  return root, cfg, run


def _metrics(workdir):
  with open(os.path.join(workdir, artifacts.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_fixed_rows_give_one_shape_and_an_overflowing_batch_still_trains_exactly(run_setup):
  _, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  loader, _ = train.make_loaders(cfg, os.path.dirname(cfg.tokenizer.path), run)
  batches = [loader.batch_at(s) for s in range(6)]
  needed = [step_batch.rows_needed(b, run.fgram_set, cfg) for b in batches]
  rows = step_batch.fgram_row_capacity(batches, run.fgram_set, cfg)
  assert rows % cfg.fgram_model.pack_bucket == 0 and rows >= max(needed) * 1.1
  built = [step_batch.make_step_batch(b, run.fgram_set, cfg, fgram_rows=rows) for b in batches]
  assert {sb['fgram_tokens'].shape for sb, _ in built} == {(1, rows, cfg.fgram_model.pack_len)}
  assert not any(stats['fgram_overflow'] for _, stats in built)

  # A capacity below what a batch needs: that batch gets its own (bucketed) shape and the
  # same loss as with room to spare; nothing is dropped.
  small = cfg.fgram_model.pack_bucket
  big = max(needed)
  assert big > small, needed
  i = int(np.argmax(needed))
  over, stats = step_batch.make_step_batch(batches[i], run.fgram_set, cfg, fgram_rows=small)
  roomy, _ = step_batch.make_step_batch(batches[i], run.fgram_set, cfg, fgram_rows=rows)
  assert stats['fgram_overflow'] == 1 and over['fgram_tokens'].shape[1] >= big
  trainer = train.create_trainer(cfg, '/unused', run)
  loss = lambda sb: float(trainer.eval_step(
      trainer.state.params, step_batch.device_put_batch(sb, trainer.batch_shardings))['nll_sum'])
  np.testing.assert_allclose(loss(over), loss(roomy), rtol=1e-6)


def test_peak_table_and_mfu_arithmetic():
  assert flops.peak_flops('TPU v5 lite') == 197e12
  assert flops.peak_flops('TPU v5') == 459e12
  assert flops.peak_flops('TPU v6 lite') == 918e12
  assert flops.peak_flops('TPU v4') == 275e12
  assert flops.peak_flops('NVIDIA H200') == 989e12
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert flops.peak_flops('cpu') == 0.0


def test_profile_steps_field_is_checked():
  assert config_lib.parse_profile_steps('3,5') == (3, 5)
  assert config_lib.parse_profile_steps('') is None
  for bad in ('5', '5,5', '0,2', 'a,b', '1,2,3'):
    with pytest.raises(ValueError, match='profile_steps'):
      config_lib.parse_profile_steps(bad)


@pytest.mark.slow
def test_run_compiles_once_reports_mfu_writes_a_trace_and_a_rerun_hits_the_cache(run_setup):
  """A run: both steps compiled before step 1 and nothing after (eval and checkpoints
  included); compile count/seconds, MFU and step time in metrics.jsonl; a profiler trace of
  --config.profile_steps; a second run on this machine loads its steps from the cache."""
  root, cfg, run = run_setup
  cfg = tiny.copy_config(cfg)
  cfg.num_train_steps = 6
  cfg.log_every_steps = 2
  cfg.eval_every_steps = 3
  cfg.checkpoint_every_steps = 3
  cfg.profile_steps = '2,4'
  cfg.peak_flops_per_chip = 1e12  # CPUs have no entry in the peak table
  workdir = str(root / 'once')
  train.train(cfg, workdir, run)
  lines = _metrics(workdir)
  compiled = [m for m in lines if 'compile/compiles' in m]
  assert len(compiled) == 1 and compiled[0]['compile/train_step_compile_s'] > 0
  assert compiled[0]['compile/step_compiles'] == 2
  assert compiled[0]['compile/fgram_rows'] >= cfg.fgram_model.pack_bucket
  logged = [m for m in lines if 'train/loss' in m]
  assert [m['step'] for m in logged] == [2, 4, 6]
  for m in logged:
    # The train and eval steps never compile again (orbax's first save compiles small
    # slicing helpers, counted in compiles_after_step_1).
    assert m['train/step_compiles_after_step_1'] == 0, m
    assert m['train/compiles'] >= 2 and m['train/compile_s'] > 0
    assert m['train/model_flops_per_token'] > 0 and m['train/step_time_s'] > 0
    positions_per_s = cfg.batch_size * cfg.seq_len / m['train/step_time_s']
    np.testing.assert_allclose(
        m['train/mfu'], m['train/model_flops_per_token'] * positions_per_s
        / (1e12 * jax.device_count()), rtol=1e-6)
  assert any('eval/loss' in m for m in lines)
  traces = glob.glob(os.path.join(workdir, train.PROFILE_DIR, '**', '*.xplane.pb'),
                     recursive=True)
  assert traces, os.listdir(workdir)

  # Same config, fresh run directory: the compiled steps come from the persistent cache.
  cfg.profile_steps = ''
  again = str(root / 'again')
  train.train(cfg, again, run)
  second = [m for m in _metrics(again) if 'compile/compiles' in m][0]
  assert second['compile/compile_cache_hits'] >= 2, second
  assert os.listdir(cfg.compilation_cache_dir)
