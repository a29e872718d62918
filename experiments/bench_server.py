"""Benchmark of the HTTP server (scone_jax/server.py) under concurrent streaming clients.

One server process serves three engines over one export, each a model id of its own:
- `scone`: continuous batching, f-gram rows matched and gathered from the table per step;
- `baseline`: the same main model, loop and batching with the table lookups off
  (`use_table=False`, as bench_serving.py does): what the main model alone costs;
- `scone_static`: SCONE with static batching (a new batch is admitted only when every
  slot is empty): the comparison point for continuous batching.
N concurrent clients (streaming, on loopback; a bare asyncio HTTP client, since it shares
the CPU with the server) each send a fixed list of requests with mixed prompt and output
lengths (`ignore_eos`, so every engine does the same work). The engines take turns,
rotated over rounds, on the same workload, so the ratios are measured under the same
machine noise.

Reported per engine: output tokens/s (all clients together, wall clock of the round),
p50/p99 over requests of the time per output token (a request's time from its first to its
last token over the tokens in between), p50 time to the first token, decode steps taken
(from /health); then scone/baseline and continuous/static ratios: the median over rounds
of the ratio within a round (`*_ratio`, the headline) and of the totals
(`*_tokens_per_s_ratio`).

--adversarial: the `scone` engine alone, rounds of the normal workload (`plain`), of the
same workload beside an adversarial mix (`adversarial`): 1% of requests (at least one per
round) carry a huge prompt (3 MB of text: refused as too long, after the server has
counted just past the model's limit) and --adversarial_clients extra streaming clients,
half reading slowly (a pause after every event), half leaving after 3 events, one client
sending the huge prompt to /tokenize back to back (answered: a million ids) and
SLOW_HEADER_CLIENTS connections trickling header bytes (closed by --header_timeout); and a load
control (`control`): the same extra clients reading every token at full speed, so the
extra decode work is told apart from the misbehaviour. Reported: p50/p99 time per output
token of the normal requests in each, and the adversarial/plain and adversarial/control
ratios (goal for p99: < 1.2).

Prefill throughput (every run; --prefill_only: this alone): the normal workload's prompts,
clients x requests of them, arrive at once (--prefill_bursts times per round) at an engine
in this process (max_tokens=1: the one token comes from the prefill) with batched prefill
on (those that join together go in one call per prompt width) and off
(`Engine(batch_prefill=False)`: one call each), taking turns over rounds after one untimed
pass that compiles every shape. Reported: prompt tokens (with BOS) prefilled per second,
mean time to the first token, prefill calls and rows (padding included) per burst, and the
batched/one-by-one ratio (median over rounds of the ratio within a round).

The export is synthetic and small so that the run fits in a few minutes of one CPU core:
a 300-piece tokenizer on random words, every bigram of it as an f-gram (90,000 rows, so
every decode step matches and gathers), random weights, a small main model (4 layers,
d=128).

  taskset -c 1 python -m experiments.bench_server            # ~3 minutes on one core
  python -m experiments.bench_server --quick                 # smoke test
  python -m experiments.bench_server --adversarial           # the adversarial mix
  python -m experiments.bench_server --prefill_only          # prefill batched vs one-by-one

The last line printed is one JSON object with every figure.
"""
import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.bench_server')

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINES = ('scone', 'baseline', 'scone_static')
MAX_LEN = 192
OUTPUT_TOKENS = (8, 16, 32, 64, 96)
PROMPT_WORDS = (1, 12)
EXTRA_TOKENS = 64        # --adversarial: each extra client's max_tokens
SLOW_HEADER_CLIENTS = 8  # --adversarial: slowloris connections held open at once
SLOW_HEADER_GAP_S = 0.5  # ... each sending a header byte this often
SLOW_PAUSE_S = 0.05      # a slow reader's pause after every event
LEAVER_THINK_S = 0.1     # a leaving client's pause before its next request


def _percentile(xs, q):
  return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else float('nan')


# ----------------------------------------------------------------------------- the export


def build_export(workdir: str, vocab: int) -> str:
  """A SCONE export with random weights whose f-gram set is every bigram of the vocabulary."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  from scone_jax import export  # pylint: disable=g-import-not-at-top
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import scone as scone_config  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  words = [''.join(rng.choice(letters, rng.integers(2, 8))) for _ in range(20000)]
  texts = [' '.join(words[i:i + 200]) for i in range(0, len(words), 200)]
  tok_path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  os.makedirs(workdir, exist_ok=True)
  corpus.train_tokenizer(texts, vocab_size=vocab, model_type='bpe', model_path=tok_path)
  tokenizer = corpus.Tokenizer(tok_path)
  v = tokenizer.vocab_size
  a, b = np.meshgrid(np.arange(v), np.arange(v), indexing='ij')
  toks = np.stack([a.reshape(-1), b.reshape(-1)], axis=1).astype(np.int32)
  fgram_set = fgrams.FGramSet(toks, np.full(v * v, 2, np.int32), np.zeros(v * v, np.int64), 2)
  cfg = scone_config.get_config()
  cfg.tokenizer.vocab_size = v
  cfg.fgrams.num_fgrams = len(fgram_set)
  cfg.fgrams.max_len = 2
  # A small main model, so the run fits in minutes of one CPU core; the server's own costs
  # (HTTP, streaming, the host lookups) weigh more next to it: a strict ratio.
  cfg.model.num_layers = 4
  cfg.model.d_model = 128
  cfg.model.num_heads = 4
  cfg.model.head_dim = 32
  cfg.model.mlp_dim = 512
  cfg.model.dtype = 'float32'        # faster steps on CPU than bf16
  cfg.fgram_model.num_layers = 1     # only the export pass runs it: keep that short
  cfg.fgram_model.num_heads = 2
  cfg.fgram_model.head_dim = 32
  cfg.fgram_model.mlp_dim = 256
  cfg.export.dtype = 'float16'
  run = artifacts.RunArtifacts(tokenizer, fgram_set, [], [])
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 0})
  mngr.wait_until_finished()
  mngr.close()
  del trainer
  export_dir = os.path.join(workdir, 'export')
  export.export(cfg, workdir, run, export_dir)
  return export_dir


# ----------------------------------------------------------------------------- the server


def serve(export_dir: str, max_batch: int, warm_widths: tuple):
  """The server process: three engines over one export (see the module docstring)."""
  from scone_jax import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import server  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  gen = serving.load(export_dir, max_len=MAX_LEN)
  base = serving.Generator(gen.config, gen.params, None, None, gen.tokenizer,
                           seq_len=gen.seq_len, max_len=MAX_LEN, use_table=False)
  scone = engine_lib.Engine(gen, max_batch)
  engines = {'scone': scone, 'baseline': engine_lib.Engine(base, max_batch),
             'scone_static': engine_lib.Engine(gen, max_batch, static=True, functions=scone.fns)}
  for engine in engines.values():
    engine.warmup(warm_widths)  # every prefill shape the workload can meet: none in a round
  server.serve(server.build_app(engines, gen.tokenizer), '127.0.0.1', 0, log_level='warning')


def start_server(export_dir: str, max_batch: int, log_path: str, warm_widths: list):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  widths = ','.join(map(str, warm_widths))
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.bench_server', '--serve',
                           export_dir, f'--max_batch={max_batch}', f'--warm_widths={widths}'],
                          cwd=ROOT,
                          env=env,
                          stdout=subprocess.PIPE, stderr=open(log_path, 'w'), text=True)
  line = proc.stdout.readline()
  if not line.startswith('serving on '):
    proc.kill()
    raise RuntimeError(f'server did not start: {line!r}; see {log_path}:\n'
                       + open(log_path).read()[-3000:])
  return proc, line.split()[-1]


# ----------------------------------------------------------------------------- clients


def workload(clients: int, per_client: int, words: list, seed: int = 0) -> list:
  """Per client, its requests: (prompt text, max_tokens), mixed lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(clients):
    reqs = []
    for _ in range(per_client):
      n_words = int(rng.integers(PROMPT_WORDS[0], PROMPT_WORDS[1] + 1))
      prompt = ' '.join(rng.choice(words, n_words))
      reqs.append((prompt, int(rng.choice(OUTPUT_TOKENS))))
    out.append(reqs)
  return out


async def _one(host: str, port: int, model: str, prompt: str, max_tokens: int):
  """One streamed completion; returns (start time, arrival time of each output token).

  A bare asyncio HTTP/1.0 client: it shares the CPU with the server here, and the openai
  client's per-chunk parsing would cost more than the server's own work per token.
  """
  body = json.dumps({'model': model, 'prompt': prompt, 'max_tokens': max_tokens,
                     'temperature': 0, 'stream': True, 'ignore_eos': True}).encode()
  t0 = time.perf_counter()
  reader, writer = await asyncio.open_connection(host, port)
  writer.write(b'POST /v1/completions HTTP/1.0\r\nHost: bench\r\n'
               b'Content-Type: application/json\r\n'
               + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
  status = await reader.readline()
  if b' 200 ' not in status:
    raise RuntimeError(f'{status!r}: {await reader.read()!r}')
  while (await reader.readline()).strip():  # headers
    pass
  times = []
  async for line in reader:  # HTTP/1.0: the body runs to the end of the connection
    if line.startswith(b'data: {'):
      now = time.perf_counter()
      for c in json.loads(line[6:])['choices']:
        times += [now] * len(c['token_ids'])
  writer.close()
  return t0, times


async def _huge(host: str, port: int, model: str, prompt: str):
  """One request with a huge prompt; the server must refuse it (400) without stalling."""
  body = json.dumps({'model': model, 'prompt': prompt, 'max_tokens': 8}).encode()
  reader, writer = await asyncio.open_connection(host, port)
  writer.write(b'POST /v1/completions HTTP/1.0\r\nHost: bench\r\n'
               b'Content-Type: application/json\r\n'
               + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
  await writer.drain()
  status = await reader.readline()
  await reader.read()
  writer.close()
  if b' 400 ' not in status:
    raise RuntimeError(f'a huge prompt got {status!r}, not 400')


async def _big_tokenize(host: str, port: int, prompt: str):
  """One /tokenize of a huge prompt (answered, with its million ids, off the event loop)."""
  body = json.dumps({'prompt': prompt}).encode()
  reader, writer = await asyncio.open_connection(host, port)
  writer.write(b'POST /tokenize HTTP/1.0\r\nHost: bench\r\nContent-Type: application/json\r\n'
               + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
  await writer.drain()
  status = await reader.readline()
  await reader.read()
  writer.close()
  if b' 200 ' not in status:
    raise RuntimeError(f'a big /tokenize got {status!r}, not 200')


async def _slow_headers(host: str, port: int, done: asyncio.Event):
  """Slowloris: a header line a byte every SLOW_HEADER_GAP_S until the server closes the
  connection (--header_timeout); then again."""
  reader, writer = await asyncio.open_connection(host, port)
  writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: bench\r\n')
  try:
    while not done.is_set() and not reader.at_eof():
      writer.write(b'X')
      await writer.drain()
      try:
        await asyncio.wait_for(reader.read(1024), SLOW_HEADER_GAP_S)
      except asyncio.TimeoutError:
        pass
  except ConnectionError:
    pass
  writer.close()


async def _misbehaving(host: str, port: int, model: str, prompt: str, max_tokens: int,
                       leave_after: int = 0, pause: float = 0.0):
  """A streaming client that leaves after `leave_after` events or pauses after each."""
  body = json.dumps({'model': model, 'prompt': prompt, 'max_tokens': max_tokens,
                     'temperature': 0, 'stream': True, 'ignore_eos': True}).encode()
  reader, writer = await asyncio.open_connection(host, port)
  writer.write(b'POST /v1/completions HTTP/1.0\r\nHost: bench\r\n'
               b'Content-Type: application/json\r\n'
               + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
  events = 0
  async for line in reader:
    if line.startswith(b'data: {'):
      events += 1
      if leave_after and events >= leave_after:
        break
      if pause:
        await asyncio.sleep(pause)
  writer.close()


async def adversarial_round(url: str, model: str, work: list, huge_prompt: str,
                            words: list, seed: int, extra: int, behave: bool) -> dict:
  """run_round on `work` with `extra` more streaming clients beside it: misbehaving (half
  read slowly, half leave after 3 events) plus 1% huge prompts, or (behave=True, the load
  control) reading every token at full speed."""
  host, port = url.split('//')[1].split(':')
  port = int(port)
  rng = np.random.default_rng(seed)
  n_requests = sum(len(reqs) for reqs in work)
  done = asyncio.Event()
  counts = {'huge': 0, 'slow': 0, 'leaving': 0, 'behaving': 0, 'big_tokenize': 0,
            'slow_headers': 0}

  async def huge_sender():
    for _ in range(max(1, round(0.01 * n_requests))):
      await asyncio.sleep(float(rng.uniform(0.0, 0.5)))
      await _huge(host, port, model, huge_prompt)
      counts['huge'] += 1

  async def big_tokenizer():
    while not done.is_set():
      await _big_tokenize(host, port, huge_prompt)
      counts['big_tokenize'] += 1

  async def slow_header_client():
    while not done.is_set():
      await _slow_headers(host, port, done)
      counts['slow_headers'] += 1

  async def extra_client(i):
    while not done.is_set():
      prompt = ' '.join(rng.choice(words, int(rng.integers(*PROMPT_WORDS))))
      if behave:
        await _misbehaving(host, port, model, prompt, EXTRA_TOKENS)
        counts['behaving'] += 1
      elif i % 2:
        await _misbehaving(host, port, model, prompt, EXTRA_TOKENS, pause=SLOW_PAUSE_S)
        counts['slow'] += 1
      else:
        await _misbehaving(host, port, model, prompt, EXTRA_TOKENS, leave_after=3)
        counts['leaving'] += 1
        await asyncio.sleep(LEAVER_THINK_S)

  async def normal():
    try:
      return await run_round(url, model, work)
    finally:
      done.set()

  extras = [extra_client(i) for i in range(extra)]
  hostile = [] if behave else [huge_sender(), big_tokenizer()] + [
      slow_header_client() for _ in range(SLOW_HEADER_CLIENTS)]
  result, *_ = await asyncio.gather(normal(), *hostile, *extras)
  result['extra_clients'] = counts
  return result


def run_adversarial(args, url: str, work: list, words: list, huge_prompt: str) -> dict:
  """Rounds of plain, load control (the same extra clients, well behaved) and adversarial,
  order rotated per round, on the scone engine."""
  kinds = ('plain', 'control', 'adversarial')
  per_kind = {k: [] for k in kinds}
  counts = []
  for i in range(args.rounds):
    for kind in kinds[i % 3:] + kinds[:i % 3]:
      if kind == 'plain':
        r = asyncio.run(run_round(url, 'scone', work))
      else:
        r = asyncio.run(adversarial_round(url, 'scone', work, huge_prompt, words, seed=i,
                                          extra=args.adversarial_clients,
                                          behave=kind == 'control'))
        counts.append({kind: r['extra_clients']})
      per_kind[kind].append(r)
      logging.info('round %d %s: %.0f tokens/s', i, kind, r['tokens'] / r['wall_s'])
  s = {k: summarize(v) for k, v in per_kind.items()}
  out = {}
  for name in kinds:
    for k, v in s[name].items():
      out[f'{name}_{k}'] = v
  out['extra_clients_per_round'] = counts
  for base in ('plain', 'control'):
    for q in ('p50', 'p99'):
      out[f'adversarial_vs_{base}_ms_per_token_{q}_ratio'] = (
          s['adversarial'][f'ms_per_token_{q}'] / s[base][f'ms_per_token_{q}'])
  out['huge_prompt_mb'] = len(huge_prompt.encode()) / 2**20
  out['adversarial_clients'] = args.adversarial_clients
  return out


def _engine_stats(url: str, model: str) -> dict:
  with urllib.request.urlopen(url + '/health', timeout=60) as r:
    return json.loads(r.read())['models'][model]


async def run_round(url: str, model: str, work: list) -> dict:
  before = _engine_stats(url, model)
  host, port = url.split('//')[1].split(':')

  async def client_loop(reqs):
    return [await _one(host, int(port), model, p, m) for p, m in reqs]

  t0 = time.perf_counter()
  results = await asyncio.gather(*(client_loop(reqs) for reqs in work))
  wall = time.perf_counter() - t0
  steps = _engine_stats(url, model)['steps'] - before['steps']
  tpot, ttft, tokens = [], [], 0
  for (reqs, res) in zip(work, results):
    for (_, max_tokens), (start, times) in zip(reqs, res):
      assert len(times) == max_tokens, (len(times), max_tokens)
      tokens += len(times)
      ttft.append(times[0] - start)
      if len(times) > 1:
        tpot.append((times[-1] - times[0]) / (len(times) - 1))
  return {'tokens': tokens, 'wall_s': wall, 'tpot': tpot, 'ttft': ttft, 'steps': steps}


def summarize(rounds: list) -> dict:
  tokens = sum(r['tokens'] for r in rounds)
  wall = sum(r['wall_s'] for r in rounds)
  tpot = [t for r in rounds for t in r['tpot']]
  ttft = [t for r in rounds for t in r['ttft']]
  steps = sum(r['steps'] for r in rounds)
  # Each request's first token comes from its prefill, not from a decode step.
  return {'tokens': tokens, 'wall_s': wall, 'tokens_per_s': tokens / wall,
          'decode_steps': steps, 'ms_per_decode_step': 1e3 * wall / max(steps, 1),
          'ms_per_token_p50': 1e3 * _percentile(tpot, 50),
          'ms_per_token_p99': 1e3 * _percentile(tpot, 99),
          'ttft_ms_p50': 1e3 * _percentile(ttft, 50),
          'round_tokens_per_s': [r['tokens'] / r['wall_s'] for r in rounds]}


# ----------------------------------------------------------------------------- prefill


def _prefill_round(engine, prompts: list, bursts: int) -> dict:
  """`bursts` times: every prompt submitted at once, the engine run until all are answered
  (one token each, from its prefill)."""
  from scone_jax import engine as engine_lib  # pylint: disable=g-import-not-at-top
  waits = []
  calls, rows = engine.stats['prefill_calls'], engine.stats['prefill_rows']
  wall = 0.0
  for _ in range(bursts):
    t0 = time.perf_counter()
    for p in prompts:
      engine.submit(engine_lib.Request(p, 1, lambda kind, *a, t0=t0: kind == 'done' and
                                       waits.append(time.perf_counter() - t0), ignore_eos=True))
    while engine.load()['pending'] or engine.load()['active']:
      engine.iterate()
    wall += time.perf_counter() - t0
  assert len(waits) == bursts * len(prompts)
  tokens = bursts * sum(p.size + 1 for p in prompts)
  return {'tokens_per_s': tokens / wall, 'wall_s': wall, 'ttft_ms_mean': 1e3 * np.mean(waits),
          'calls': (engine.stats['prefill_calls'] - calls) // bursts,
          'rows': (engine.stats['prefill_rows'] - rows) // bursts}


def prefill_throughput(export_dir: str, prompts: list, max_batch: int, rounds: int,
                       bursts: int) -> dict:
  """Prompt tokens prefilled per second, batched prefill on vs off (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from scone_jax import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  gen = serving.load(export_dir, max_len=MAX_LEN)
  batched = engine_lib.Engine(gen, max_batch)
  engines = {'batched': batched, 'one_by_one': engine_lib.Engine(
      gen, max_batch, functions=batched.fns, batch_prefill=False)}
  for engine in engines.values():
    _prefill_round(engine, prompts, 1)  # compiles every shape this workload needs
  per = {name: [] for name in engines}
  for i in range(rounds):
    for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
      per[name].append(_prefill_round(engines[name], prompts, bursts))
      logging.info('prefill round %d %s: %.0f prompt tokens/s', i, name,
                   per[name][-1]['tokens_per_s'])
  out = {'prefill_requests': len(prompts), 'prefill_bursts_per_round': bursts,
         'prefill_prompt_tokens': sum(p.size + 1
                                                                        for p in prompts),
         'prefill_widths': sorted({-(-(p.size + 1) // 16) * 16 for p in prompts}),
         'prefill_backend': jax.default_backend()}
  for name, rs in per.items():
    out[f'prefill_{name}_tokens_per_s'] = statistics.median(r['tokens_per_s'] for r in rs)
    out[f'prefill_{name}_ttft_ms_mean'] = statistics.median(r['ttft_ms_mean'] for r in rs)
    out[f'prefill_{name}_calls_per_burst'] = rs[0]['calls']
    out[f'prefill_{name}_rows_per_burst'] = rs[0]['rows']  # padding rows included
    out[f'prefill_{name}_round_tokens_per_s'] = [r['tokens_per_s'] for r in rs]
  out['prefill_batched_vs_one_by_one_round_ratios'] = [
      a['tokens_per_s'] / b['tokens_per_s'] for a, b in zip(per['batched'], per['one_by_one'])]
  out['prefill_batched_vs_one_by_one_ratio'] = statistics.median(
      out['prefill_batched_vs_one_by_one_round_ratios'])
  return out


def server_rounds(args, export_dir: str, tok, words: list, work: list, log_path: str,
                  t_start: float):
  """The served rounds: per engine (or, --adversarial, the adversarial mix) their results."""
  # Compile outside the measurement: the server warms every prefill shape of the workload's
  # widths, then one short request per width compiles the rest.
  by_width = {}
  for reqs in work:
    for prompt, _ in reqs:
      by_width.setdefault(-(-(tok.encode(prompt).size + 1) // 16) * 16, prompt)
  proc, url = start_server(export_dir, args.max_batch, log_path, sorted(by_width))
  logging.info('server up at %s after %.0fs', url, time.time() - t_start)
  adversarial = None
  try:
    warm = [[(p, 2)] for p in by_width.values()]
    for name in ENGINES:
      asyncio.run(run_round(url, name, warm))
    logging.info('warm after %.0fs (%d prefill widths)', time.time() - t_start, len(warm))
    if args.adversarial:
      plain = ' '.join(w for w in words if w.isascii() and w.isalpha()) + ' '
      huge_prompt = (plain * (3 * 2**20 // len(plain) + 1))[:3 * 2**20]  # 3 MB as JSON too
      adversarial = run_adversarial(args, url, work, words, huge_prompt)
    per_engine = {name: [] for name in ENGINES}
    for i in range(0 if args.adversarial else args.rounds):
      order = ENGINES[i % 3:] + ENGINES[:i % 3]
      for name in order:
        r = asyncio.run(run_round(url, name, work))
        per_engine[name].append(r)
        logging.info('round %d %s: %.0f tokens/s', i, name, r['tokens'] / r['wall_s'])
  finally:
    proc.terminate()
    proc.wait(60)
  return per_engine, adversarial


# ----------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='small sizes: a smoke test')
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--requests', type=int, default=2, help='per client and round')
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--max_batch', type=int, default=8)
  parser.add_argument('--vocab', type=int, default=300,
                      help='tokenizer pieces (>= 261: byte fallback); vocab^2 f-grams')
  parser.add_argument('--export_dir', help='reuse (or build once into) this synthetic export')
  parser.add_argument('--adversarial', action='store_true',
                      help='plain vs adversarial-mix rounds on the scone engine (docstring)')
  parser.add_argument('--adversarial_clients', type=int, default=0,
                      help='--adversarial: extra streaming clients (default clients / 4)')
  parser.add_argument('--prefill_bursts', type=int, default=20,
                      help='prefill measurement: bursts of all prompts per round and side')
  parser.add_argument('--prefill_only', action='store_true',
                      help='only the prefill measurement (batched vs one-by-one)')
  parser.add_argument('--serve', help=argparse.SUPPRESS)  # internal: the server process
  parser.add_argument('--warm_widths', default='16', help=argparse.SUPPRESS)  # and its widths
  args = parser.parse_args()
  if args.serve:
    serve(args.serve, args.max_batch, tuple(int(w) for w in args.warm_widths.split(',')))
    return
  if args.quick:
    args.clients, args.requests, args.rounds = 4, 2, 1
  args.adversarial_clients = args.adversarial_clients or max(1, args.clients // 4)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('httpx').setLevel(logging.WARNING)
  logging.getLogger('httpx2').setLevel(logging.WARNING)
  t_start = time.time()

  with tempfile.TemporaryDirectory(prefix='bench_server_') as tmp:
    export_dir = args.export_dir and os.path.join(args.export_dir, 'export')
    if not export_dir or not os.path.isdir(export_dir):
      export_dir = build_export(args.export_dir or os.path.join(tmp, 'run'), args.vocab)
    t_export = time.time() - t_start
    logging.info('export built in %.0fs', t_export)
    from scone_jax import corpus  # pylint: disable=g-import-not-at-top
    tok = corpus.Tokenizer(os.path.join(export_dir, 'tokenizer.model'))
    words = sorted({tok.decode([i]).strip() for i in range(3, tok.vocab_size)} - {''})
    work = workload(args.clients, args.requests, words)
    per_engine = adversarial = None
    if not args.prefill_only:
      per_engine, adversarial = server_rounds(args, export_dir, tok, words, work,
                                              os.path.join(tmp, 'server.log'), t_start)
    prefill = prefill_throughput(export_dir, [tok.encode(p) for reqs in work for p, _ in reqs],
                                 args.max_batch, args.rounds, args.prefill_bursts)

  result = {
      'platform': platform.platform(), 'cpus': os.cpu_count(),
      'affinity': sorted(os.sched_getaffinity(0)), 'python': platform.python_version(),
      'load_avg_1m': os.getloadavg()[0],
      'clients': args.clients, 'requests_per_client_round': args.requests,
      'rounds': args.rounds, 'max_batch': args.max_batch,
      'output_tokens_per_request': OUTPUT_TOKENS, 'prompt_words': PROMPT_WORDS,
  }
  if args.adversarial:
    result.update(adversarial)
    setup = ('the synthetic export below; the scone engine only; rounds of plain, '
             'control and adversarial, order rotated per round (adversarial: 1% huge '
             'prompts of 3 MB refused as too long, and --adversarial_clients extra '
             'streaming clients of 64 tokens, half pausing 50 ms after every event, '
             'half leaving after 3 events, one client sending the 3 MB prompt to '
             f'/tokenize back to back, {SLOW_HEADER_CLIENTS} slowloris connections '
             'trickling header bytes; control: the same extra streaming clients reading '
             'at full speed); figures are of the normal requests only. ')
  elif per_engine is not None:
    result.update(engine_ratios(per_engine))
    setup = ('one server process with three engines (scone, baseline = use_table=False, '
             'scone_static = static batching), bare asyncio HTTP/1.0 clients, streaming '
             'greedy requests with ignore_eos on 127.0.0.1; engines take turns on the same '
             'workload, rotated per round; ratios from the same run. ')
  else:
    setup = ''
  result.update(prefill)
  result.update({
      'export_seconds': t_export, 'seconds': time.time() - t_start,
      'setup': setup + (
          f'Synthetic export: {args.vocab}-piece BPE tokenizer on random words, every '
          'bigram an f-gram (every decode step matches and gathers a float16 row), '
          'main model 4 layers d=128 4x32 heads mlp 512 rope (float32, random weights), '
          f'max_len {MAX_LEN}. Prefill: the workload\'s prompts arriving at once at an '
          'in-process scone engine, max_tokens=1, batched prefill on vs '
          'Engine(batch_prefill=False), alternating per round after a compiling pass; '
          'mean time to the first token of a burst\'s requests.'),
  })
  print(json.dumps(result))


def engine_ratios(per_engine: dict) -> dict:
  """Per engine its summary; scone/baseline and continuous/static ratios."""
  s = {name: summarize(rs) for name, rs in per_engine.items()}
  result = {}
  for name in ENGINES:
    for k, v in s[name].items():
      result[f'{name}_{k}'] = v
  # Headline ratios: the median over rounds of the ratio within a round (the engines of a
  # round run back to back, so a slow spell of this shared machine hits a round, not a side).
  round_ratio = lambda a, b: [x / y for x, y in zip(s[a]['round_tokens_per_s'],
                                                   s[b]['round_tokens_per_s'])]
  result['scone_vs_baseline_round_ratios'] = round_ratio('scone', 'baseline')
  result['scone_vs_baseline_ratio'] = statistics.median(result['scone_vs_baseline_round_ratios'])
  result['scone_vs_baseline_tokens_per_s_ratio'] = (s['scone']['tokens_per_s']
                                                    / s['baseline']['tokens_per_s'])
  result['scone_vs_baseline_ms_per_token_p50_ratio'] = (s['baseline']['ms_per_token_p50']
                                                        / s['scone']['ms_per_token_p50'])
  result['continuous_vs_static_round_ratios'] = round_ratio('scone', 'scone_static')
  result['continuous_vs_static_ratio'] = statistics.median(
      result['continuous_vs_static_round_ratios'])
  result['continuous_vs_static_tokens_per_s_ratio'] = (s['scone']['tokens_per_s']
                                                       / s['scone_static']['tokens_per_s'])
  # The same tokens in fewer steps: slots refilled as soon as a request leaves.
  result['static_vs_continuous_decode_steps_ratio'] = (s['scone_static']['decode_steps']
                                                       / max(s['scone']['decode_steps'], 1))
  return result


if __name__ == '__main__':
  main()
