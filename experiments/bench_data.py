"""Training input at corpus scale: prepare, read-by-row with on-the-fly matching, memory, overlap.

On a corpus the benchmark generates (Zipf-distributed words plus a Zipf table of recurring
phrases, so f-grams are as skewed as in text; written as text shards of blank-line
documents), at two sizes (`--small_tokens`, default 10M, and `--tokens`, default 200M
SentencePiece tokens; the small corpus is a prefix of the large one):
  * prepare: the training split tokenized into token shards, in process (`token_shards.
    write_shards`) on both corpora, and through the Beam pipeline (`fgrams_beam
    --shards_output`, FnApiRunner with a worker process per CPU here, counting the f-grams
    in the same pass) on `--beam_corpus` (small by default); tokens/s;
  * training input per host core: `Loader` over the shards (read by row, match on the fly,
    pack) + step-batch building (micro-batches, dedupe), tokens per second of wall time
    and per CPU second, in a fresh process per corpus, which also reports its peak RSS
    (does memory grow with the corpus?);
  * overlap: SCONE train steps (experiments/configs/scone.py) fed by the real input (batches
    built ahead in background threads) vs the same batches already in memory, and the
    control: the real input built inline (prefetch 0), same process, rotated rounds;
    overlap_ratio = in-memory step time / real-input step time, control_ratio = in-memory /
    inline. Twice: the CPU config (a step of hundreds of host batch times, where even no
    overlap reads near 1) and `SMALL_MODEL` (a step a few host batch times, where input
    decides the step rate): prefetch works where overlap_ratio beats control_ratio;
  * CLI `--mode=train` runs of a few steps from each corpus's shards (`data.train_shards`,
    with the tokenizer and f-gram set given, so no process reads the training text), and
    their peak RSS.
The f-gram set (`--num_fgrams`) is extracted from the small corpus and used for both: what
input throughput depends on is the set's size and match rate, not where it came from.

`--only=formats` (or the `formats` entry of a full run) measures prepare by corpus format:
`--format_tokens` tokens of the small corpus written as text, JSONL.zst and Parquet, then,
per format, the read + tokenize stage (`corpus.iter_documents` streamed in batches into
`encode_batch`) with a Hugging Face byte-level BPE tokenizer.json trained here and with the
SentencePiece model, and the whole in-process prepare (`token_shards.write_shards`); tokens
per second of wall time and per CPU second (all the process's threads: the Hugging Face
tokenizer batches over cores). Text is the baseline, in the same run. And the peak RSS of a
fresh process streaming a Parquet file of `--parquet_mb` (and of one a quarter that size:
memory must not grow with the file), next to the same process's RSS before reading.

  python -m experiments.bench_data [--tokens 200000000] [--small_tokens 10000000] \
      [--workdir /tmp/scone_bench_data]
  python -m experiments.bench_data --only=formats --small_tokens 2000000 \
      --format_tokens 2000000 --parquet_mb 2000

Generated files are reused across runs (delete the workdir to regenerate). The last line
printed is one JSON object.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_data')

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top

from scone_jax import corpus  # pylint: disable=g-import-not-at-top
from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
from scone_jax import paths  # pylint: disable=g-import-not-at-top
from scone_jax import token_shards  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCONE_CONFIG = os.path.join(_REPO, 'experiments', 'configs', 'scone.py')
_WORDS_PER_TOKEN = 0.9   # this generator gives ~0.87 words per token with an 8k BPE vocabulary


# ----------------------------------------------------------------------------- corpus


def _pseudo_words(rng, n):
  """n distinct pronounceable words, shorter ones for the frequent ranks (as in text)."""
  cons, vows = list('bcdfghklmnprstvwz'), list('aeiou')
  words, seen = [], set()
  while len(words) < n:
    syl = 1 + min(int(rng.exponential(0.5 + len(words) / n * 2.0)), 4)
    w = ''.join(rng.choice(cons) + rng.choice(vows) for _ in range(syl))
    if rng.random() < 0.3:
      w += rng.choice(cons)
    if w not in seen:
      seen.add(w)
      words.append(w)
  return np.array(words)


def _zipf_cdf(n, s):
  p = 1.0 / np.arange(1, n + 1) ** s
  return np.cumsum(p / p.sum())


def generate_corpus(directory, num_words, *, seed=0, words_per_file=20_000_000,
                    vocab=60_000, phrases=30_000):
  """Writes train-NNNNN.txt files of blank-line-separated documents; returns their paths.

  Text is a stream of units: a word, a Zipf(1.1) draw from `vocab` pseudo-words (70%), or a
  recurring 2-6 word phrase, a Zipf(1.0) draw from `phrases` (30%). Documents are 50-2,000
  words (log-normal), sentences 5-25 words, capitalized and ended with a full stop.
  Deterministic in seed; file k depends only on (seed, k), so a smaller corpus is a prefix.
  """
  os.makedirs(directory, exist_ok=True)
  base = np.random.default_rng(seed)
  words = _pseudo_words(base, vocab)
  word_cdf = _zipf_cdf(vocab, 1.1)
  phrase_len = base.integers(2, 7, phrases)
  phrase_words = np.searchsorted(word_cdf, base.random(int(phrase_len.sum())))
  # Unit u < vocab is word u; unit vocab + j is phrase j.
  unit_len = np.concatenate([np.ones(vocab, np.int64), phrase_len])
  unit_start = np.concatenate([np.arange(vocab), vocab + np.cumsum(phrase_len) - phrase_len])
  unit_words = np.concatenate([np.arange(vocab), phrase_words])
  phrase_cdf = _zipf_cdf(phrases, 1.0)
  # Spellings: plain, Capitalized (sentence start), with a full stop, both.
  spell = np.array([w for w in words] + [w.capitalize() for w in words] +
                   [w + '.' for w in words] + [w.capitalize() + '.' for w in words], object)
  out = []
  for k in range(-(-num_words // words_per_file)):
    path = os.path.join(directory, f'train-{k:05d}.txt')
    out.append(path)
    if os.path.isfile(path):
      continue
    rng = np.random.default_rng([seed, k])
    target = min(words_per_file, num_words - k * words_per_file)
    units_n = int(1.1 * target / (0.7 + 0.3 * phrase_len.mean())) + 1   # cut to target below
    phrase = rng.random(units_n) < 0.3
    units = np.where(phrase, vocab + np.searchsorted(phrase_cdf, rng.random(units_n)),
                     np.searchsorted(word_cdf, rng.random(units_n)))
    lens = unit_len[units]
    idx = np.repeat(unit_start[units] - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
    ids = unit_words[idx][:target]
    # Sentence ends, then sentence starts (the word after an end, and each document start).
    end = np.zeros(ids.size, bool)
    end[np.cumsum(rng.integers(5, 26, ids.size // 5 + 1))[:-1].clip(0, ids.size - 1)] = True
    doc_cuts = np.cumsum(np.clip(rng.lognormal(5.5, 0.9, ids.size // 50 + 1), 50, 2000)
                         .astype(np.int64))
    doc_cuts = doc_cuts[doc_cuts < ids.size]
    end[doc_cuts - 1] = True
    end[-1] = True
    start = np.concatenate([[True], end[:-1]])
    text_ids = ids + vocab * (start + 2 * end)
    docs = [' '.join(d) for d in np.split(spell[text_ids], doc_cuts)]
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write('\n\n'.join(docs) + '\n')
    os.replace(tmp, path)
    logging.info('wrote %s: %d documents, %d words', path, len(docs), ids.size)
  return out


# ----------------------------------------------------------------------------- measurements


def _config(num_fgrams, max_len, overrides=()):
  from experiments import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.load(_SCONE_CONFIG, overrides)
  cfg.fgrams.num_fgrams = num_fgrams
  cfg.fgrams.max_len = max_len
  return cfg


def input_rate(shards_dir, fgram_path, steps, seq_len, batch_size, num_fgrams, max_len):
  """In this process: Loader + step batches over the shards, inline (one thread)."""
  from scone_jax import packing  # pylint: disable=g-import-not-at-top
  from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
  cfg = _config(num_fgrams, max_len)
  cfg.seq_len, cfg.batch_size = seq_len, batch_size
  fgram_set = fgrams.FGramSet.load(fgram_path)
  shards = token_shards.TokenShards(shards_dir, fgram_set)
  loader = packing.Loader(shards, seq_len=seq_len, batch_size=batch_size, seed=0)
  make = lambda s: step_batch.make_step_batch(loader.batch_at(s), fgram_set, cfg)
  make(0)   # the matcher's table is built lazily
  wall, cpu = time.perf_counter(), time.process_time()
  matched = 0
  for s in range(1, steps + 1):
    matched += make(s)[1]['fgram_matched']
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  tokens = steps * seq_len * batch_size
  return {'corpus_tokens': shards.num_tokens, 'tokens': tokens,
          'tokens_per_s': round(tokens / wall), 'tokens_per_cpu_s': round(tokens / cpu),
          'match_rate': round(matched / tokens, 4),
          'peak_rss_mb': _peak_rss_mb()}


def _peak_rss_mb() -> float:
  """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: a child made by
  fork/vfork + exec inherits its parent's high-water mark there."""
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return round(int(line.split()[1]) / 1024, 1)
  raise RuntimeError('no VmHWM in /proc/self/status (Linux only)')


def _in_subprocess(fn_name, *args):
  """Runs input_rate & co. in a fresh process (its own peak RSS); returns its JSON."""
  code = (f'import json; from experiments import bench_data; '
          f'print(json.dumps(bench_data.{fn_name}(*{args!r})))')
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                       text=True, cwd=_REPO)
  return json.loads(out.stdout.strip().splitlines()[-1])


# A step only a few times the host's batch-building time, where overlap decides the step
# rate: the main and f-gram models shrunk to one narrow block (the vocabulary's logits
# remain the bulk of the step).
SMALL_MODEL = ('model.d_model=16', 'model.num_layers=1', 'model.num_heads=1',
               'model.head_dim=16', 'model.mlp_dim=32', 'fgram_model.num_layers=1',
               'fgram_model.num_heads=1', 'fgram_model.head_dim=16', 'fgram_model.mlp_dim=32')


def overlap(shards_dir, fgram_path, tokenizer_path, steps, rounds, num_fgrams, max_len,
            prefetch, workers, overrides=()):
  """SCONE train-step time with the real input (built `prefetch` ahead in background
  threads) vs the same batches already in memory, and the control that shows what no
  overlap looks like: the real input built inline (prefetch 0). overlap_ratio and
  control_ratio are in-memory step time over each; the first must beat the second by
  about the host batch time's share of a step, or the prefetch does not overlap."""
  import jax  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import packing  # pylint: disable=g-import-not-at-top
  from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  cfg = _config(num_fgrams, max_len, overrides)
  tok = corpus.Tokenizer(tokenizer_path)
  cfg.tokenizer.vocab_size = tok.vocab_size
  fgram_set = fgrams.FGramSet.load(fgram_path)
  run = artifacts.RunArtifacts(tok, fgram_set, [], [])
  trainer = train.create_trainer(cfg, '/tmp', run)
  shards = token_shards.TokenShards(shards_dir, fgram_set)
  loader = packing.Loader(shards, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=0)
  rng = jax.device_put(jax.random.PRNGKey(0), trainer.state_shardings.step)
  build = lambda s: step_batch.make_step_batch(loader.batch_at(s), fgram_set, cfg)[0]
  state = trainer.state

  def run_steps(batches):
    nonlocal state
    t0 = time.perf_counter()
    for sb in batches:
      state, metrics = trainer.train_step(
          state, step_batch.device_put_batch(sb, trainer.batch_shardings), rng)
    jax.block_until_ready(metrics['loss'])
    return time.perf_counter() - t0

  # Compile every f-gram row bucket the timed steps hit first: a compile inside a timed
  # round would be charged to whichever variant met the shape first.
  first, shapes = 3, set()
  for s in range(first, first + rounds * steps):
    sb = build(s)
    if sb['fgram_tokens'].shape not in shapes:
      shapes.add(sb['fgram_tokens'].shape)
      run_steps([sb])
  real, memory, inline = [], [], []
  for r in range(rounds):
    steps_r = range(first, first + steps)
    first += steps
    in_memory = [build(s) for s in steps_r]
    # Rotate the order each round, so drift and warm caches favour no variant.
    for variant in [(0, 1, 2), (1, 2, 0), (2, 0, 1)][r % 3]:
      if variant == 0:
        memory.append(run_steps(in_memory))
      elif variant == 1:
        real.append(run_steps(packing.ahead(build, steps_r, prefetch=prefetch,
                                            workers=workers)))
      else:
        inline.append(run_steps(packing.ahead(build, steps_r, prefetch=0)))
    logging.info('overlap round %d: in memory %.3f s, real input %.3f s, inline %.3f s', r,
                 memory[-1], real[-1], inline[-1])
  host_ms = 1e3 * _time_builds(build, 20)
  step_s = sum(memory) / (rounds * steps)
  return {'steps_per_round': steps, 'rounds': rounds, 'prefetch': prefetch,
          'workers': workers, 'model_overrides': list(overrides),
          'step_s_real_input': round(sum(real) / (rounds * steps), 5),
          'step_s_in_memory': round(step_s, 5),
          'step_s_inline_control': round(sum(inline) / (rounds * steps), 5),
          'overlap_ratio': round(sum(memory) / sum(real), 4),
          'control_ratio': round(sum(memory) / sum(inline), 4),
          'host_batch_ms': round(host_ms, 2),
          'step_over_host_batch': round(1e3 * step_s / host_ms, 1)}


def _overlap_stage(result, work, fgram_path, tok_path, args):
  """Two regimes: the CPU config's step (~1 s, hundreds of host batch times: overlap can
  hardly show there) and a small model whose step is a few host batch times."""
  data = _config(args.num_fgrams, args.max_len).data
  for key, overrides in (('overlap', ()), ('overlap_small_model', SMALL_MODEL)):
    result[key] = _in_subprocess('overlap', os.path.join(work, 'shards-large'), fgram_path,
                                 tok_path, args.overlap_steps, args.overlap_rounds,
                                 args.num_fgrams, args.max_len, data.prefetch, data.workers,
                                 overrides)
    logging.info('%s: %s', key, result[key])


def _time_builds(build, n):
  t0 = time.perf_counter()
  for s in range(1000, 1000 + n):
    build(s)
  return (time.perf_counter() - t0) / n


def _rss_of(module_args):
  """Runs `python -m MODULE ARGS` reporting its own peak RSS at exit (VmHWM; see
  _peak_rss_mb); returns (seconds, peak RSS MB, proc)."""
  wrapper = ('import atexit, runpy, sys; from experiments import bench_data; '
             'atexit.register(lambda: print("PEAK_RSS_MB", bench_data._peak_rss_mb(), '
             'file=sys.stderr)); sys.argv = sys.argv[1:]; '
             'runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)')
  t0 = time.time()
  proc = subprocess.run([sys.executable, '-c', wrapper] + module_args, capture_output=True,
                        text=True, cwd=_REPO)
  seconds = time.time() - t0
  if proc.returncode:
    raise RuntimeError(f'{" ".join(module_args[:3])} failed:\n{proc.stdout[-2000:]}\n'
                       f'{proc.stderr[-4000:]}')
  rss = [float(line.split()[1]) for line in proc.stderr.splitlines()
         if line.startswith('PEAK_RSS_MB ')]
  return seconds, rss[-1], proc


# ----------------------------------------------------------------------------- formats


def train_hf_tokenizer(texts, path, vocab_size):
  """A GPT-2-style byte-level BPE tokenizer.json (the `tokenizers` trainer, Rust)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens(['<|endoftext|>'])
  tok.save(path)
  return path


def write_formats(docs, directory):
  """The documents as one text file, one JSONL.zst file and one Parquet file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import zstandard  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  out = {'text': os.path.join(directory, 'corpus.txt'),
         'jsonl.zst': os.path.join(directory, 'corpus.jsonl.zst'),
         'parquet': os.path.join(directory, 'corpus.parquet')}
  if all(os.path.isfile(p) for p in out.values()):
    return out
  with open(out['text'], 'w', encoding='utf-8') as f:
    f.write('\n\n'.join(d.text for d in docs) + '\n')
  with open(out['jsonl.zst'], 'wb') as f:
    with zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
      for d in docs:
        w.write((json.dumps({'id': d.id, 'text': d.text}) + '\n').encode('utf-8'))
  pq.write_table(pa.table({'id': [d.id for d in docs], 'text': [d.text for d in docs]}),
                 out['parquet'], row_group_size=4096)
  return out


def read_tokenize_rate(path, tokenizer_path, batch_docs=1024):
  """The read + tokenize stage over one file: streamed documents, batched encode."""
  tok = corpus.Tokenizer(tokenizer_path)
  t0, c0 = time.perf_counter(), time.process_time()
  tokens = docs = 0
  batch = []
  for d in corpus.iter_documents([path]):
    batch.append(d.text)
    if len(batch) == batch_docs:
      tokens += sum(x.size for x in tok.encode_batch(batch))
      docs += len(batch)
      batch = []
  if batch:
    tokens += sum(x.size for x in tok.encode_batch(batch))
    docs += len(batch)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {'tokens': tokens, 'documents': docs, 'wall_s': round(wall, 2),
          'cpu_s': round(cpu, 2), 'tokens_per_s': round(tokens / wall),
          'tokens_per_cpu_s': round(tokens / cpu)}


def prepare_rate(path, tokenizer_path, directory, num_shards):
  """The whole in-process prepare of one file: read, tokenize, write token shards."""
  tok = corpus.Tokenizer(tokenizer_path)
  t0, c0 = time.perf_counter(), time.process_time()
  index = token_shards.write_shards(corpus.iter_documents([path]), tok, directory,
                                    num_shards=num_shards)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {'tokens': index['num_tokens'], 'wall_s': round(wall, 2), 'cpu_s': round(cpu, 2),
          'tokens_per_s': round(index['num_tokens'] / wall),
          'tokens_per_cpu_s': round(index['num_tokens'] / cpu), 'docs_digest': index['docs']}


def parquet_read_rss(path):
  """Peak RSS of streaming every document of a Parquet file (this fresh process)."""
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  before = _peak_rss_mb()
  t0 = time.perf_counter()
  docs = chars = 0
  for d in corpus.iter_documents([path]):
    docs += 1
    chars += len(d.text)
  return {'file_mb': round(os.path.getsize(path) / 2**20, 1), 'documents': docs,
          'text_chars': chars, 'seconds': round(time.perf_counter() - t0, 1),
          'rss_before_read_mb': before, 'peak_rss_mb': _peak_rss_mb()}


def write_big_parquet(docs, path, target_mb):
  """A Parquet file of about target_mb, the documents repeated under fresh ids, written a
  row group at a time (4,096 rows, as `write_formats`)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if os.path.isfile(path) and os.path.getsize(path) >= 0.9 * target_mb * 2**20:
    return path
  texts = [d.text for d in docs]
  tmp = path + '.tmp'
  with pq.ParquetWriter(tmp, pa.schema([('id', pa.string()), ('text', pa.string())])) as w:
    rep = 0
    while rep == 0 or os.path.getsize(tmp) < target_mb * 2**20:
      for lo in range(0, len(texts), 4096):
        part = texts[lo:lo + 4096]
        w.write_table(pa.table({'id': [f'r{rep}-{lo + i}' for i in range(len(part))],
                                'text': part}))
      rep += 1
  os.replace(tmp, path)
  return path


def formats_bench(work, small_files, args):
  """Prepare by corpus format (text baseline, JSONL.zst, Parquet), two tokenizers; peak RSS
  of reading a large Parquet file."""
  docs = corpus.read_text_documents(small_files)
  # About --format_tokens tokens (~1.15 tokens per word here).
  words = np.cumsum([d.text.count(' ') + 1 for d in docs])
  docs = docs[:max(1, int(np.searchsorted(words, args.format_tokens / 1.15)))]
  fdir = os.path.join(work, f'formats-{len(docs)}')
  files = write_formats(docs, fdir)
  hf_path = os.path.join(work, f'hf-bpe{args.vocab_size}.json')
  if not os.path.isfile(hf_path):
    train_hf_tokenizer([d.text for d in docs[:3000]], hf_path, args.vocab_size)
  sp_path = os.path.join(work, f'sp{args.vocab_size}.model')
  if not os.path.isfile(sp_path):
    corpus.train_tokenizer([d.text for d in docs[:3000]], vocab_size=args.vocab_size,
                           model_type='bpe', model_path=sp_path)
  out = {'documents': len(docs), 'file_mb': {k: round(os.path.getsize(p) / 2**20, 1)
                                             for k, p in files.items()},
         'read_tokenize': {}, 'prepare': {}}
  for tname, tpath in (('huggingface', hf_path), ('sentencepiece', sp_path)):
    for fmt, path in files.items():
      out['read_tokenize'][f'{fmt}/{tname}'] = _in_subprocess('read_tokenize_rate', path, tpath)
      logging.info('read+tokenize %s/%s: %s', fmt, tname, out['read_tokenize'][f'{fmt}/{tname}'])
  for fmt, path in files.items():
    out['prepare'][f'{fmt}/huggingface'] = _in_subprocess(
        'prepare_rate', path, hf_path, os.path.join(fdir, f'shards-{fmt}'), args.num_shards)
  # Text files carry no ids ('<file>#<n>'), so only the formats with an id field must agree.
  digests = {k.split('/')[0]: v.pop('docs_digest') for k, v in out['prepare'].items()}
  out['prepare_same_shards_jsonl_zst_and_parquet'] = digests['jsonl.zst'] == digests['parquet']
  rt = out['read_tokenize']
  out['hf_tokens_per_cpu_s_vs_text'] = {
      fmt: round(rt[f'{fmt}/huggingface']['tokens_per_cpu_s'] /
                 rt['text/huggingface']['tokens_per_cpu_s'], 3) for fmt in files}
  big = write_big_parquet(docs, os.path.join(work, f'big-{args.parquet_mb}mb.parquet'),
                          args.parquet_mb)
  quarter = write_big_parquet(docs, os.path.join(work, f'big-{args.parquet_mb // 4}mb.parquet'),
                              args.parquet_mb // 4)
  out['parquet_rss'] = {'large': _in_subprocess('parquet_read_rss', big),
                        'quarter': _in_subprocess('parquet_read_rss', quarter)}
  return out


def _machine() -> dict:
  import platform  # pylint: disable=g-import-not-at-top
  model = ''
  with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
    for line in f:
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  return {'cpu': model, 'cpus': len(os.sched_getaffinity(0)), 'python': platform.python_version(),
          'note': 'shared host: other jobs ran at the same time'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/scone_bench_data')
  parser.add_argument('--tokens', type=int, default=200_000_000)
  parser.add_argument('--small_tokens', type=int, default=10_000_000)
  parser.add_argument('--beam_corpus', default='small', choices=('small', 'large'),
                      help='the corpus the Beam prepare runs on (FnApiRunner, one worker '
                      'process per host CPU)')
  parser.add_argument('--vocab_size', type=int, default=8000)
  parser.add_argument('--num_fgrams', type=int, default=100_000)
  parser.add_argument('--max_len', type=int, default=5)
  parser.add_argument('--num_shards', type=int, default=64)
  parser.add_argument('--input_steps', type=int, default=300)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--overlap_steps', type=int, default=20)
  parser.add_argument('--overlap_rounds', type=int, default=3)
  parser.add_argument('--cli_steps', type=int, default=30)
  parser.add_argument('--only', default='all', choices=('all', 'formats', 'overlap'),
                      help='formats: only the prepare-by-format and Parquet RSS measurements; '
                      'overlap: only the input/step overlap and its inline control (on a '
                      '--tokens corpus; run it on a quiet host)')
  parser.add_argument('--out', default='', help='also write the JSON result to this file')
  parser.add_argument('--format_tokens', type=int, default=5_000_000)
  parser.add_argument('--parquet_mb', type=int, default=2000)
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  work = args.workdir
  os.makedirs(work, exist_ok=True)
  result = {'bench': 'data', 'host_cpus': len(os.sched_getaffinity(0))}

  # 1. Corpora: the small one is a prefix (whole files) of the large one.
  per_file = max(1, min(20_000_000, int(args.small_tokens * _WORDS_PER_TOKEN)))
  t0 = time.time()
  total = args.small_tokens if args.only == 'formats' else args.tokens
  big_files = generate_corpus(os.path.join(work, 'corpus'),
                              int(total * _WORDS_PER_TOKEN), words_per_file=per_file)
  result['generate_s'] = round(time.time() - t0, 1)
  small_files = big_files[:1]
  sizes = {'small': small_files, 'large': big_files}
  result['corpus_bytes'] = {k: sum(os.path.getsize(f) for f in v) for k, v in sizes.items()}
  if args.only != 'overlap':
    result['formats'] = formats_bench(work, small_files, args)
    logging.info('formats: %s', result['formats'])
  else:
    sizes = {'large': big_files}
  if args.only == 'formats':
    result['machine'] = _machine()
    if args.out:
      paths.write_json_atomic(args.out, result, indent=1)
    print(json.dumps(result))
    return

  # 2. Tokenizer (a sample of the small corpus) and f-grams (the small corpus).
  tok_path = os.path.join(work, f'sp{args.vocab_size}.model')
  small_docs = corpus.read_text_documents(small_files)
  if not os.path.isfile(tok_path):
    corpus.train_tokenizer([d.text for d in small_docs[:3000]], vocab_size=args.vocab_size,
                           model_type='bpe', model_path=tok_path)
  tok = corpus.Tokenizer(tok_path)
  fgram_path = os.path.join(work, f'fgrams-{args.num_fgrams}.npz')
  if not os.path.isfile(fgram_path):
    t0 = time.time()
    ids = tok.encode_batch([d.text for d in small_docs])
    fgrams.extract(ids, max_len=args.max_len, min_count=2,
                   num_fgrams=args.num_fgrams).save(fgram_path)
    result['fgram_extract_s'] = round(time.time() - t0, 1)
  del small_docs

  # 3. Prepare in process (each corpus) and through Beam (the small one).
  prepare = {}
  for name, files in sizes.items():
    directory = os.path.join(work, f'shards-{name}')
    index = token_shards.read_index(directory)
    if index is None or index.get('request') != {'files': len(files)}:
      t0 = time.time()
      docs = corpus.read_text_documents(files)
      t_read = time.time() - t0
      index = token_shards.write_shards(docs, tok, directory, num_shards=args.num_shards,
                                        request={'files': len(files)})
      del docs
      seconds = time.time() - t0
      prepare[name] = {'tokens': index['num_tokens'], 'documents': index['num_docs'],
                       'seconds': round(seconds, 1), 'read_s': round(t_read, 1),
                       'tokens_per_s': round(index['num_tokens'] / seconds)}
      paths.write_json_atomic(os.path.join(directory, 'prepare_timing.json'), prepare[name])
    else:
      prepare[name] = paths.read_json(os.path.join(directory, 'prepare_timing.json'))
    logging.info('prepare %s: %s', name, prepare[name])
  result['prepare_in_process'] = prepare
  if args.only == 'overlap':
    _overlap_stage(result, work, fgram_path, tok_path, args)
    result['machine'] = _machine()
    result['load_average'] = os.getloadavg()
    if args.out:
      paths.write_json_atomic(args.out, result, indent=1)
    print(json.dumps(result))
    return
  beam_dir = os.path.join(work, 'shards-beam')
  beam_files = sizes[args.beam_corpus]
  seconds, _, _ = _rss_of([
      'scone_jax.fgrams_beam', '--input', ','.join(beam_files),
      '--input_format=text', '--tokenizer', tok_path, '--output',
      os.path.join(work, 'fgrams-beam.npz'), '--max_len', str(args.max_len),
      '--num_fgrams', str(args.num_fgrams), '--shards_output', beam_dir,
      '--num_token_shards', str(args.num_shards), '--runner=FnApiRunner',
      f'--direct_num_workers={result["host_cpus"]}', '--direct_running_mode=multi_processing'])
  beam_index = token_shards.read_index(beam_dir)
  same = all(
      open(os.path.join(beam_dir, token_shards.shard_name(s, args.num_shards)), 'rb').read()
      == open(os.path.join(work, f'shards-{args.beam_corpus}',
                           token_shards.shard_name(s, args.num_shards)), 'rb').read()
      for s in range(args.num_shards))
  result['prepare_beam'] = {
      'corpus': args.beam_corpus, 'tokens': beam_index['num_tokens'],
      'seconds': round(seconds, 1), 'tokens_per_s': round(beam_index['num_tokens'] / seconds),
      'workers': result['host_cpus'], 'also_counted_fgrams': True,
      'shards_equal_in_process': same}

  # 4. Training input per host core, and peak RSS, in a fresh process per corpus.
  rates = {}
  for name in sizes:
    rates[name] = _in_subprocess('input_rate', os.path.join(work, f'shards-{name}'), fgram_path,
                                 args.input_steps, args.seq_len, args.batch_size,
                                 args.num_fgrams, args.max_len)
    logging.info('input %s: %s', name, rates[name])
  result['input'] = rates
  result['input_seq_len'], result['input_batch_size'] = args.seq_len, args.batch_size
  result['peak_rss_mb_small_vs_large'] = [rates['small']['peak_rss_mb'],
                                          rates['large']['peak_rss_mb']]

  # 5. Overlap of input and step, on the large corpus.
  _overlap_stage(result, work, fgram_path, tok_path, args)

  # 6. The CLI trains from the large corpus's shards.
  eval_path = os.path.join(work, 'eval.txt')
  if not os.path.isfile(eval_path):
    with open(small_files[0], encoding='utf-8') as f:
      head = f.read(400_000)
    with open(eval_path, 'w', encoding='utf-8') as f:
      f.write(head[:head.rfind('\n\n')] + '\n')
  result['cli_train'] = {}
  for name, files in sizes.items():
    run_dir = os.path.join(work, f'run-{name}')
    if os.path.isdir(run_dir):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(run_dir)
    seconds, rss, proc = _rss_of([
        'scone_jax.main', '--mode=train', f'--config={_SCONE_CONFIG}',
        f'--workdir={run_dir}', '--config.corpus.name=text',
        f'--config.corpus.train_files={",".join(files)}',
        f'--config.corpus.eval_files={eval_path}',
        f'--config.data.train_shards={os.path.join(work, "shards-" + name)}',
        f'--config.tokenizer.path={tok_path}',
        f'--config.tokenizer.vocab_size={args.vocab_size}',
        f'--config.fgrams.path={fgram_path}', f'--config.fgrams.num_fgrams={args.num_fgrams}',
        f'--config.fgrams.max_len={args.max_len}', f'--config.num_train_steps={args.cli_steps}',
        f'--config.eval_every_steps={args.cli_steps}', '--config.eval_batches=2',
        f'--config.checkpoint_every_steps={args.cli_steps}'])
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    result['cli_train'][name] = {
        'corpus_tokens': prepare[name]['tokens'], 'steps': args.cli_steps,
        'seconds': round(seconds, 1), 'peak_rss_mb': round(rss, 1),
        'loss': round(last['loss'], 4), 'eval_ppl': round(last.get('eval_ppl', float('nan')), 2)}
    logging.info('CLI train from %s shards: %s', name, result['cli_train'][name])
  print(json.dumps(result))


if __name__ == '__main__':
  main()
