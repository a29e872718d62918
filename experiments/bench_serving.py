"""Benchmark of serving from an exported f-gram table, and of the export itself.

Measures, in one run (these machines are noisy, so read the ratios):
- decode tokens/s of SCONE (per token: incremental f-gram match + table row gather on the
  host, rows passed to the jitted KV-cached step) against the same main model and the same
  loop without lookups, at batch 1 and 16, with a table of 2^20 rows in RAM and memory-mapped;
- the host lookup cost per token (match + gather) inside that loop and its share of the
  decode time, and in isolation on a 2^20 x 512 float16 table (RAM and mmap), next to a plain
  numpy gather of random rows;
- export throughput (rows/s, MB/s written) of a >= 100k-row table from scone.py's f-gram
  model, through `export.export` (checkpoint restore, sharded A_fgram pass, zarr3 writer,
  read-back verification).

The table-size part is synthetic: the f-gram set is every bigram over a 1024-token vocabulary
(2^20 f-grams), so after the prompt every decode step matches and gathers a row (the worst
case for lookups); table rows are random. The main model is scone.py's (4 layers, d=256,
rope) with that 1024-token vocabulary and randomly initialised weights.

  python experiments/bench_serving.py            # a few minutes on 2 cores
  python experiments/bench_serving.py --quick    # smoke test

The last line printed is one JSON object with every figure.
"""
import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Run as a script: the checkout's root holds scone_jax and experiments.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
from scone_jax import corpus  # pylint: disable=g-import-not-at-top
from scone_jax import export  # pylint: disable=g-import-not-at-top
from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
from scone_jax import serving  # pylint: disable=g-import-not-at-top
from scone_jax import train  # pylint: disable=g-import-not-at-top
from experiments import machine  # pylint: disable=g-import-not-at-top
from experiments.configs import scone as scone_config  # pylint: disable=g-import-not-at-top


def machine_info():
  cpu = machine.cpu_name()
  return {'platform': platform.platform(), 'cpu': cpu, 'cpus': os.cpu_count(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'load_avg_1m': os.getloadavg()[0]}


def all_bigrams(vocab: int, max_len: int) -> fgrams.FGramSet:
  a, b = np.meshgrid(np.arange(vocab), np.arange(vocab), indexing='ij')
  toks = np.zeros((vocab * vocab, max_len), np.int32)
  toks[:, 0], toks[:, 1] = a.reshape(-1), b.reshape(-1)
  n = vocab * vocab
  return fgrams.FGramSet(toks, np.full(n, 2, np.int32), np.zeros(n, np.int64), max_len)


def random_ngrams(num: int, vocab: int, max_len: int, seed: int) -> fgrams.FGramSet:
  """`num` distinct random n-grams, 2 <= n <= max_len."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (2 * num, max_len)).astype(np.int32)
  lens = rng.integers(2, max_len + 1, 2 * num).astype(np.int32)
  toks[np.arange(max_len)[None, :] >= lens[:, None]] = 0
  _, first = np.unique(np.concatenate([toks, lens[:, None]], axis=1), axis=0, return_index=True)
  keep = np.sort(rng.permutation(first)[:num])
  return fgrams.FGramSet(toks[keep], lens[keep], np.zeros(keep.size, np.int64), max_len)


def random_table(rows: int, dim: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  table = np.empty((rows, dim), np.float16)
  for i in range(0, rows, 1 << 16):
    n = min(1 << 16, rows - i)
    table[i:i + n] = rng.standard_normal((n, dim), np.float32)
  return table


def mmap_copy(table: np.ndarray, path: str) -> np.ndarray:
  out = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint16, shape=table.shape)
  out[:] = table.view(np.uint16)
  out.flush()
  del out
  return np.asarray(np.load(path, mmap_mode='r')).view(table.dtype)


# ----------------------------------------------------------------------------- lookups


def bench_lookup(table: np.ndarray, fgram_set, batch: int, steps: int, storage: str) -> float:
  """µs per token of DecodeLookup.advance (match + gather) over random token streams."""
  lookup = serving.DecodeLookup(serving.Table(table, storage=storage), fgram_set, batch,
                                table.shape[1])
  vocab = int(fgram_set.tokens_padded.max()) + 1
  rng = np.random.default_rng(batch)
  stream = rng.integers(0, vocab, (steps, batch)).astype(np.int32)
  lookup.reset([stream[0, b:b + 1] for b in range(batch)], [1] * batch)
  for i in range(min(steps, 1000)):  # warm up: compile, page in the pages touched first
    lookup.advance(stream[i])
  best = float('inf')
  for _ in range(3):
    t0 = time.perf_counter()
    for i in range(steps):
      lookup.advance(stream[i])
    best = min(best, (time.perf_counter() - t0) / (steps * batch) * 1e6)
  # The last step's output is exactly the public API's answer.
  ids, _ = fgram_set.match_last_batch(lookup.state[:, :lookup.k], lookup.state[:, lookup.k])
  assert np.array_equal(ids, lookup.ints[:, 2]), 'fused lookup disagrees with the matcher'
  hit = ids >= 0
  assert np.array_equal(lookup.rows[hit].view(np.uint16), table[ids[hit]].view(np.uint16))
  return best


def bench_numpy_take(table: np.ndarray, batch: int, steps: int) -> float:
  """µs per row of np.take of random rows into a preallocated buffer (the gather alone)."""
  rng = np.random.default_rng(1)
  ids = rng.integers(0, table.shape[0], (steps, batch))
  out = np.empty((batch, table.shape[1]), table.dtype)
  best = float('inf')
  for _ in range(3):
    t0 = time.perf_counter()
    for i in range(steps):
      np.take(table, ids[i], axis=0, out=out)
    best = min(best, (time.perf_counter() - t0) / (steps * batch) * 1e6)
  return best


# ----------------------------------------------------------------------------- decode


def decode_model_config(vocab: int) -> model_lib.ModelConfig:
  cfg = scone_config.get_config()
  cfg.model.dtype = 'float32'  # faster steps on CPU than bf16: a conservative ratio
  return dataclasses.replace(model_lib.ModelConfig.from_config(cfg, vocab), fgrams_enabled=False)


def bench_decode(gens: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                 vocab: int) -> dict:
  """Tokens/s and host lookup time per generator over `repeats` rounds.

  Each round runs every generator once, in a rotated order. Tokens/s is batch / the median
  wall time of one decode step over all rounds (a slow spell of this shared machine moves
  few steps, so the median barely notices); the per-run rates are kept as a cross-check.
  """
  rng = np.random.default_rng(batch)
  prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
  kw = dict(max_new_tokens=new_tokens, stop_tokens=())
  for gen in gens.values():
    gen.generate(prompts, **kw)  # compile
  names = list(gens)
  step_s = {name: [] for name in names}
  run_rates = {name: [] for name in names}
  host = {name: 0.0 for name in names}
  for i in range(repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      gens[name].generate(prompts, **kw)
      st = gens[name].last_stats
      step_s[name].extend(st['step_s'].tolist())
      run_rates[name].append(st['tokens'] / st['decode_s'])
      host[name] += st['host_lookup_s']
  out = {}
  for name in names:
    median_step = statistics.median(step_s[name])
    out[name] = {
        'tokens_per_s': batch / median_step,
        'tokens_per_s_runs_median': statistics.median(run_rates[name]),
        'ratio': statistics.median(step_s['baseline']) / median_step,
        'ratio_runs_median': statistics.median(
            r / b for r, b in zip(run_rates[name], run_rates['baseline'])),
        'host_us_per_token': host[name] / (len(step_s[name]) * batch) * 1e6,
        'host_share': host[name] / sum(step_s[name]),
    }
  return out


# ----------------------------------------------------------------------------- export


def bench_export(rows: int, workdir: str) -> dict:
  """Export of a `rows`-row table from scone.py's models (random weights, 1 device)."""
  rng = np.random.default_rng(0)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  words = [''.join(rng.choice(letters, rng.integers(2, 9))) for _ in range(30000)]
  texts = [' '.join(words[i:i + 300]) for i in range(0, len(words), 300)]
  tok_path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  corpus.train_tokenizer(texts, vocab_size=1024, model_type='bpe', model_path=tok_path)
  tokenizer = corpus.Tokenizer(tok_path)
  cfg = scone_config.get_config()
  cfg.tokenizer.vocab_size = tokenizer.vocab_size
  cfg.fgrams.num_fgrams = rows
  cfg.export.dtype = 'float16'
  fgram_set = random_ngrams(rows, tokenizer.vocab_size, cfg.fgrams.max_len, seed=0)
  run = artifacts.RunArtifacts(tokenizer, fgram_set, [], [])
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 0})
  mngr.wait_until_finished()
  mngr.close()
  del trainer
  export_dir = os.path.join(workdir, 'export')
  summary = export.export(cfg, workdir, run, export_dir)
  gen = serving.load(export_dir)  # the export is whole: its checksums verify
  assert gen.table.num_rows == rows
  return dict(summary, fgram_model=dict(cfg.fgram_model), compute_dtype=cfg.model.dtype)


# ----------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='small sizes: a smoke test')
  parser.add_argument('--vocab', type=int, default=1024,
                      help='decode vocabulary; the table has vocab^2 rows (all bigrams)')
  parser.add_argument('--new_tokens', type=int, default=32,
                      help='per run; short runs interleave the generators finely')
  parser.add_argument('--repeats', type=int, default=60)
  parser.add_argument('--export_rows', type=int, default=102400)
  parser.add_argument('--lookup_dim', type=int, default=512)
  args = parser.parse_args()
  if args.quick:
    args.vocab, args.new_tokens, args.repeats, args.export_rows = 256, 16, 5, 4096
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  t_start = time.time()
  result = dict(machine_info())

  with tempfile.TemporaryDirectory(prefix='bench_serving_') as tmp:
    t0 = time.time()
    ex = bench_export(args.export_rows, os.path.join(tmp, 'export_run'))
    logging.info('export: %s', ex)
    result.update({
        'export_rows': ex['rows'], 'export_d': ex['d'], 'export_dtype': ex['dtype'],
        'export_rows_per_s': ex['rows_per_s'], 'export_mb_per_s': ex['mb_per_s'],
        'export_seconds_total': ex['seconds'], 'export_bench_seconds': time.time() - t0,
        'export_model': ('scone.py f-gram model (2 layers, d=256, 4x64 heads, mlp 1024, K=5, '
                         f'{ex["compute_dtype"]} compute), random weights, 1 device; rows/s '
                         'covers the sharded A_fgram pass and the zarr3 writes (compile '
                         'included); total seconds add restore and read-back verification'),
    })

    vocab = args.vocab
    fgram_set = all_bigrams(vocab, 5)
    num_rows = len(fgram_set)
    fgram_set.table  # pylint: disable=pointless-statement  # build the match table now

    # Lookups alone on a [num_rows, lookup_dim] float16 table.
    big = random_table(num_rows, args.lookup_dim, seed=1)
    big_mm = mmap_copy(big, os.path.join(tmp, 'big.npy'))
    steps = 2000 if args.quick else 20000
    for b in (1, 16):
      result[f'lookup_us_per_token_b{b}'] = bench_lookup(big, fgram_set, b, steps, 'ram')
      result[f'lookup_mmap_us_per_token_b{b}'] = bench_lookup(big_mm, fgram_set, b, steps,
                                                              'mmap')
      result[f'numpy_take_us_per_row_b{b}'] = bench_numpy_take(big, b, steps)
    logging.info('lookups: %s', {k: v for k, v in result.items() if 'us_per' in k})
    del big, big_mm

    # Decode: SCONE (RAM and mmap tables) vs the baseline, same model, same loop.
    mc = decode_model_config(vocab)
    model = model_lib.SconeLM(mc)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 1), jnp.int32))['params']))()
    table = random_table(num_rows, mc.d_model, seed=2)
    table_mm = mmap_copy(table, os.path.join(tmp, 'table.npy'))
    common = dict(seq_len=128, max_len=1024)
    gens = {
        'baseline': serving.Generator(mc, params, None, None, use_table=False, **common),
        'scone': serving.Generator(mc, params, serving.Table(table), fgram_set, **common),
        'scone_mmap': serving.Generator(mc, params, serving.Table(table_mm, storage='mmap'),
                                        fgram_set, **common),
    }
    for b in (1, 16):
      r = bench_decode(gens, b, 16, args.new_tokens, args.repeats, vocab)
      logging.info('decode batch %d: %s', b, r)
      result.update({
          f'decode_tokens_per_s_baseline_b{b}': r['baseline']['tokens_per_s'],
          f'decode_tokens_per_s_scone_b{b}': r['scone']['tokens_per_s'],
          f'decode_tokens_per_s_scone_mmap_b{b}': r['scone_mmap']['tokens_per_s'],
          f'decode_ratio_b{b}': r['scone']['ratio'],
          f'decode_ratio_mmap_b{b}': r['scone_mmap']['ratio'],
          f'decode_ratio_runs_median_b{b}': r['scone']['ratio_runs_median'],
          f'decode_ratio_mmap_runs_median_b{b}': r['scone_mmap']['ratio_runs_median'],
          f'decode_lookup_us_per_token_b{b}': r['scone']['host_us_per_token'],
          f'decode_lookup_share_b{b}': r['scone']['host_share'],
          f'decode_lookup_mmap_us_per_token_b{b}': r['scone_mmap']['host_us_per_token'],
          f'decode_lookup_mmap_share_b{b}': r['scone_mmap']['host_share'],
          f'decode_baseline_host_us_per_token_b{b}': r['baseline']['host_us_per_token'],
      })

  result.update({
      'table_rows': num_rows, 'decode_table_dim': mc.d_model,
      'lookup_table_dim': args.lookup_dim, 'table_dtype': 'float16',
      'fgram_set': (f'synthetic: all {num_rows:,} bigrams over a {vocab}-token vocabulary '
                    '(max_len 5), so every decode step matches and gathers; random rows'),
      'main_model': (f'scone.py main model ({mc.num_layers} layers, d={mc.d_model}, '
                     f'{mc.num_heads}x{mc.head_dim} heads, mlp {mc.mlp_dim}, {mc.position}, '
                     f'float32 compute), vocab {vocab}, random weights'),
      'decode': (f'prompt 16 tokens, {args.new_tokens} new tokens, greedy, {args.repeats} '
                 'interleaved runs per generator; tokens/s = batch / median decode-step '
                 'time over all runs, ratio = baseline median step / SCONE median step '
                 '(*_runs_median: median over rounds of the per-run tokens/s ratio); '
                 'baseline = same loop and model without match/gather/rows; '
                 'decode_lookup_* = host time of the per-step lookup call and its share of '
                 'decode time (the baseline\'s call, which only fills token ids: '
                 'decode_baseline_host_*)'),
      'mmap_note': 'mmap figures are with the file in the page cache (warm)',
      'seconds': time.time() - t_start,
  })
  print(json.dumps(result))


if __name__ == '__main__':
  main()
