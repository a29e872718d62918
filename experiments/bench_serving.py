"""Benchmark of decoding from an f-gram table: SCONE against the same main model without it.

Measures, in one run (these machines are noisy, so read the ratios):
- decode tokens/s of SCONE and of the baseline (same main model and weights, no f-grams),
  both with the on-device loop (`Generator.generate`, `--tokens_per_dispatch` steps per
  compiled call: match, gather, step and sampling on the device), at batches 1, 16 and 64,
  for each table storage (`device`, `host`, `ram`, `mmap`; tensorstore reads an export on
  disk and is covered by the equality tests, not timed here);
- the old host-synced baseline: the same baseline with one token per dispatch and a host
  sync per token, as serving decoded before the loop moved onto the device.

The f-gram set is every bigram over a V-token vocabulary, V = ceil(sqrt(--table_rows)), so
after the prompt every decode step matches and gathers a row (the worst case for SCONE);
the table rows are random. The main model is `--model`'s config (readme: the README's CPU
model from experiments/configs/scone.py; d768x12: d=768, 12 layers, 12x64 heads, mlp
3072, bf16) with vocabulary V and random weights. Every label in the JSON is derived from
the config actually used. A progress line per phase goes to stdout.

Each ratio is the median over >= 9 interleaved rounds, with its spread (min and max over the
rounds) beside it, and the load average at the start and end of the run (the ratios of a
loaded host are not timings to publish).

  python -m experiments.bench_serving --model=readme          # 10M-row table
  python -m experiments.bench_serving --model=d768x12 --table_rows=1000000 --new_tokens=8

The last line printed is one JSON object with every figure.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_serving')

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
from scone_jax import serving  # pylint: disable=g-import-not-at-top
from experiments import machine  # pylint: disable=g-import-not-at-top
from experiments.configs import scone as scone_config  # pylint: disable=g-import-not-at-top

STORAGES = ('host', 'device', 'ram', 'mmap')   # the first is serving's default
BATCHES = (1, 16, 64)
_T0 = time.time()


def progress(msg: str):
  print(f'[{time.time() - _T0:7.1f}s] {msg}', flush=True)


def machine_info():
  return {'platform': platform.platform(), 'cpu': machine.cpu_name(), 'cpus': os.cpu_count(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
          'load_avg_1m': os.getloadavg()[0]}


def model_config(name: str, vocab: int) -> model_lib.ModelConfig:
  cfg = scone_config.get_config()
  if name == 'd768x12':
    cfg.model.num_layers, cfg.model.d_model, cfg.model.mlp_dim = 12, 768, 3072
    cfg.model.num_heads, cfg.model.head_dim, cfg.model.dtype = 12, 64, 'bfloat16'
  elif name != 'readme':
    raise ValueError(f'--model={name}; use readme or d768x12.')
  return dataclasses.replace(model_lib.ModelConfig.from_config(cfg, vocab), fgrams_enabled=False)


def describe(name: str, mc: model_lib.ModelConfig) -> str:
  return (f'{name}: {mc.num_layers} layers, d={mc.d_model}, {mc.num_heads}x{mc.head_dim} '
          f'heads, mlp {mc.mlp_dim} ({mc.mlp_activation}), {mc.position} positions, '
          f'{mc.dtype} compute, vocab {mc.vocab_size}, random weights')


def all_bigrams(vocab: int, max_len: int) -> fgrams.FGramSet:
  a, b = np.meshgrid(np.arange(vocab), np.arange(vocab), indexing='ij')
  n = vocab * vocab
  toks = np.zeros((n, max_len), np.int32)
  toks[:, 0], toks[:, 1] = a.reshape(-1), b.reshape(-1)
  return fgrams.FGramSet(toks, np.full(n, 2, np.int32), np.zeros(n, np.int64), max_len)


def random_table(rows: int, dim: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  table = np.empty((rows, dim), np.float16)
  for i in range(0, rows, 1 << 18):
    n = min(1 << 18, rows - i)
    table[i:i + n] = rng.standard_normal((n, dim), np.float32)
  return table


def make_table(rows_np: np.ndarray, storage: str, tmp: str) -> serving.Table:
  if storage == 'mmap':
    path = os.path.join(tmp, 'table.npy')
    out = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint16, shape=rows_np.shape)
    out[:] = rows_np.view(np.uint16)
    out.flush()
    del out
    return serving.Table(np.asarray(np.load(path, mmap_mode='r')).view(rows_np.dtype),
                         storage='mmap')
  return serving.place_table(rows_np, storage)


def timed_rounds(gens: dict, prompts, new_tokens: int, repeats: int, per_dispatch: dict) -> dict:
  """Decode tokens/s per generator: the median over `repeats` interleaved rounds (each
  round runs every generator once, in a rotated order) after one compile round."""
  kw = dict(max_new_tokens=new_tokens, stop_tokens=())
  names = list(gens)
  for name in names:
    gens[name].generate(prompts, tokens_per_dispatch=per_dispatch[name], **kw)  # compile
  rates = {name: [] for name in names}
  for i in range(repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      gens[name].generate(prompts, tokens_per_dispatch=per_dispatch[name], **kw)
      st = gens[name].last_stats
      rates[name].append(st['tokens'] / st['decode_s'])
  return {name: statistics.median(r) for name, r in rates.items()}, rates


def bench_storage(storage, table_np, fgram_set, baseline, args, tmp, result, batches):
  """SCONE with the table in `storage` vs the baseline, on-device loops both, every batch;
  with the default storage also the host-synced baseline."""
  t0 = time.time()
  table = make_table(table_np, storage, tmp)
  gens = {'scone': serving.Generator(baseline.config, baseline.params, table, fgram_set,
                                     seq_len=baseline.seq_len, max_len=baseline.max_len,
                                     matcher_storage=args.matcher_storage),
          'baseline': baseline}
  per_dispatch = {'scone': args.tokens_per_dispatch, 'baseline': args.tokens_per_dispatch}
  if storage == STORAGES[0]:
    gens['baseline_host_synced'] = gens['baseline']
    per_dispatch['baseline_host_synced'] = 1
  result[f'matcher_storage_{storage}'] = gens['scone'].matcher_storage
  result[f'fgram_path_bytes_{storage}'] = gens['scone'].fgram_path_bytes()
  progress(f'storage {storage}: table placed in {time.time() - t0:.1f}s, matcher in '
           f'{gens["scone"].matcher_storage}')
  for batch in batches:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, baseline.config.vocab_size, (batch, args.prompt_len)).tolist()
    t1 = time.time()
    med, runs = timed_rounds(gens, prompts, args.new_tokens, args.repeats, per_dispatch)
    ratio_runs = [s / b for s, b in zip(runs['scone'], runs['baseline'])]
    progress(f'storage {storage} batch {batch}: scone {med["scone"]:.0f} tok/s, baseline '
             f'{med["baseline"]:.0f} tok/s, ratio {statistics.median(ratio_runs):.3f} '
             f'[{min(ratio_runs):.3f}, {max(ratio_runs):.3f}] '
             f'({time.time() - t1:.0f}s)')
    suffix = f'_{storage}_b{batch}'
    result[f'decode_tokens_per_s_scone{suffix}'] = med['scone']
    result[f'decode_tokens_per_s_baseline{suffix}'] = med['baseline']
    result[f'decode_ratio{suffix}'] = statistics.median(ratio_runs)
    result[f'decode_ratio{suffix}_min'] = min(ratio_runs)
    result[f'decode_ratio{suffix}_max'] = max(ratio_runs)
    if 'baseline_host_synced' in gens:
      hs = med['baseline_host_synced']
      result[f'decode_tokens_per_s_baseline_host_synced_b{batch}'] = hs
      result[f'decode_loop_speedup_vs_host_synced_b{batch}'] = med['baseline'] / hs
      result[f'decode_ratio_b{batch}'] = result[f'decode_ratio{suffix}']
      result[f'decode_tokens_per_s_scone_b{batch}'] = med['scone']
      result[f'decode_tokens_per_s_baseline_b{batch}'] = med['baseline']
  del gens['scone'], table


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='readme', choices=('readme', 'd768x12'))
  parser.add_argument('--table_rows', type=int, default=10_000_000)
  parser.add_argument('--storages', default=','.join(STORAGES))
  parser.add_argument('--prompt_len', type=int, default=16)
  parser.add_argument('--new_tokens', type=int, default=33, help='per run (the first comes '
                      'from the prefill; the rest are the timed decode steps)')
  parser.add_argument('--repeats', type=int, default=9, help='interleaved rounds (>= 9)')
  parser.add_argument('--matcher_storage', default=None, choices=('device', 'host'),
                      help='default: host unless the table storage is device')
  parser.add_argument('--batches', default=','.join(str(b) for b in BATCHES))
  parser.add_argument('--tokens_per_dispatch', type=int,
                      default=serving.DEFAULT_TOKENS_PER_DISPATCH)
  args = parser.parse_args()
  if args.repeats < 9:
    raise SystemExit(f'--repeats={args.repeats}: at least 9 rounds, for a median and spread.')
  storages = [s for s in args.storages.split(',') if s]
  batches = [int(b) for b in args.batches.split(',') if b]
  if not storages or any(s not in STORAGES for s in storages):
    raise SystemExit(f'--storages={args.storages}; use a subset of {",".join(STORAGES)}.')
  result = dict(machine_info())
  result['load_avg_start'] = list(os.getloadavg())
  vocab = int(np.ceil(np.sqrt(args.table_rows)))
  mc = model_config(args.model, vocab)
  progress(f'model {describe(args.model, mc)}; devices {jax.devices()}')
  fgram_set = all_bigrams(vocab, 5)
  table_np = random_table(len(fgram_set), mc.d_model, seed=2)
  progress(f'f-gram set and table: {len(fgram_set):,} rows x {mc.d_model} float16 '
           f'({table_np.nbytes / 1e9:.2f} GB)')
  model = model_lib.SconeLM(mc)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 1), jnp.int32))['params']))()
  # One baseline for every storage: its programs compile once.
  baseline = serving.Generator(mc, params, None, None, use_table=False, seq_len=128,
                               max_len=args.prompt_len + args.new_tokens + 16)
  with tempfile.TemporaryDirectory(prefix='bench_serving_') as tmp:
    for storage in storages:
      try:
        bench_storage(storage, table_np, fgram_set, baseline, args, tmp, result, batches)
      except Exception as e:  # pylint: disable=broad-except
        # A storage this platform lacks (e.g. no pinned_host memory) is reported, not fatal.
        result[f'error_{storage}'] = f'{type(e).__name__}: {str(e)[:300]}'
        progress(f'storage {storage} FAILED: {result[f"error_{storage}"]}')
  result.update({
      'model': args.model, 'main_model': describe(args.model, mc),
      'table_rows': len(fgram_set), 'table_dim': mc.d_model, 'table_dtype': 'float16',
      'default_storage': serving.DEFAULT_STORAGE, 'storages': storages,
      'fgram_set': (f'synthetic: all {len(fgram_set):,} bigrams over a {vocab}-token '
                    'vocabulary (max_len 5), so every decode step matches and gathers'),
      'decode': (f'prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens '
                 f'(greedy, no stop), {args.tokens_per_dispatch} tokens per dispatch, '
                 f'{args.repeats} interleaved rounds after a compile round; tokens/s = '
                 'decode steps x batch / decode seconds, median over rounds; ratio = median '
                 'over rounds of SCONE / baseline tokens/s (same round), *_min/*_max its '
                 'spread over rounds; decode_ratio_bN = '
                 'the default storage; *_host_synced = baseline at 1 token per dispatch'),
      'seconds': time.time() - _T0,
      'load_avg_end': list(os.getloadavg()),
  })
  print(json.dumps(result))


if __name__ == '__main__':
  main()
