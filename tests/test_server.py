"""The HTTP server: the official openai client against `--mode=serve` on 127.0.0.1.

Greedy outputs are compared token for token with `serving.load(export).generate`, for a
request alone and for requests that join a running batch at different times; bad requests
get a 4xx and leave the server healthy; a vanished client frees its slot; SIGTERM drains.
"""
# pylint: disable=protected-access
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

from flax import linen as nn
import jax
import numpy as np
import openai
import pytest

from scone_jax import decode
from scone_jax import engine as engine_lib
from scone_jax import model as model_lib
from scone_jax import protocol
from scone_jax import server
from scone_jax import serving
from scone_jax import streaming
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BATCH = 4
PROMPTS = ['The nation must protect', 'Our people', '', 'The congress will build a stronger '
           'union and the government has seen the public interest of every citizen']


def build_export(root: str) -> str:
  """A tiny SCONE export (untrained weights) in a few seconds."""
  return tiny.untrained_export(root)[0]


def start_server(export_dir: str, log_path: str, *extra) -> types.SimpleNamespace:
  """`python -m scone_jax.main --mode=serve` on a free port of 127.0.0.1 (one device).
  Warms the shortest prompt width only unless `extra` says otherwise: all 16 width buckets
  of the tiny model are 128 prefill compiles, minutes on a loaded 2-core host."""
  if not any(a.startswith('--warmup=') for a in extra):
    extra = ('--warmup=shortest', *extra)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  log = open(log_path, 'w')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'scone_jax.main', '--mode=serve', f'--export_dir={export_dir}',
       '--port=0', f'--max_batch={MAX_BATCH}', *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  line = proc.stdout.readline()  # the server's first line says where it listens
  if not line.startswith('serving on '):
    proc.kill()
    raise AssertionError(f'server did not start: {line!r}\n{open(log_path).read()[-3000:]}')
  url = line.split()[-1]
  return types.SimpleNamespace(proc=proc, url=url, log=log, log_path=log_path,
                               client=openai.OpenAI(base_url=url + '/v1', api_key='none',
                                                    max_retries=0, timeout=120))


@pytest.fixture(scope='module')
def live(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('server'))
  export_dir = build_export(root)
  # One token per dispatch: the joining test needs each request still decoding when the
  # next arrives, and this tiny model's 8-step chunks can end a 40-token request before a
  # client thread reacts on a loaded host (it failed once so in CI).
  # tests/test_server_limits.py serves with the default chunks.
  srv = start_server(export_dir, os.path.join(root, 'server.log'), '--tokens_per_dispatch=1')
  gen = serving.load(export_dir)
  yield types.SimpleNamespace(srv=srv, client=srv.client, url=srv.url,
                              model=server.served_name(export_dir), export_dir=export_dir,
                              gen=gen, tok=gen.tokenizer)
  if srv.proc.poll() is None:
    srv.proc.kill()
    srv.proc.wait()
  srv.log.close()


def _get(url):
  with urllib.request.urlopen(url, timeout=30) as r:
    return r.status, json.loads(r.read())


def _post(url, data: bytes):
  req = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _expected(live, prompt: str, max_tokens: int) -> list:
  """Generator.generate's greedy tokens for the prompt alone, EOS dropped."""
  ids = live.tok.encode(prompt).tolist()
  out = live.gen.generate([ids], max_new_tokens=max_tokens)[0]
  return [t for t in out if t != live.tok.eos_id]


def _health(live):
  status, body = _get(live.url + '/health')
  assert status == 200 and body['status'] == 'ok'
  return body['models'][live.model]


# ----------------------------------------------------------------------------- unit tests


def test_row_sampler_keeps_the_right_tokens():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = np.log(np.tile(probs, (4000, 1))).astype(np.float32)
  n = logits.shape[0]
  keys = decode.row_keys(np.arange(n, dtype=np.int32), np.zeros(n, np.int32))
  sample_rows = jax.jit(decode.sample_rows, static_argnames='sampling')

  def sample(temperature, top_p, top_k):
    return np.asarray(sample_rows(logits, np.full(n, temperature, np.float32),
                                  np.full(n, top_p, np.float32), np.full(n, top_k, np.int32),
                                  keys, sampling=True))

  counts = np.bincount(sample(1.0, 0.8, 0), minlength=4)
  assert counts[2] == counts[3] == 0  # {0, 1} is the smallest set with mass >= 0.8
  np.testing.assert_allclose(counts[0] / counts[:2].sum(), 0.5 / 0.8, atol=0.03)
  counts = np.bincount(sample(1.0, 1.0, 3), minlength=4)
  assert counts[3] == 0 and counts[2] > 0
  np.testing.assert_allclose(counts[:3] / counts.sum(), probs[:3] / 0.95, atol=0.03)
  assert (sample(0.0, 1.0, 0) == 0).all()  # temperature 0: greedy, per row
  # Rows differ: greedy, top-1 sampling, and full sampling at a tiny temperature.
  mixed = np.asarray(sample_rows(logits[:3], np.array([0.0, 1.0, 1e-3], np.float32),
                                 np.ones(3, np.float32), np.array([0, 1, 0], np.int32),
                                 keys[:3], sampling=True))
  assert mixed.tolist() == [0, 0, 0]


@pytest.mark.slow
def test_engine_reuses_slots_and_matches_generate():
  """More requests than slots: slots are freed and refilled mid-run; with scanned layers the
  cache's batch axis is the second one. Each request still gets generate()'s tokens."""
  mc = model_lib.ModelConfig(vocab_size=60, num_layers=2, d_model=16, num_heads=2, head_dim=8,
                             mlp_dim=32, dtype='float32', scan_layers=True)
  model = model_lib.SconeLM(mc)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(1), np.zeros(
      (1, 1), np.int32))['params']))()
  gen = serving.Generator(mc, params, None, None, use_table=False, seq_len=16, max_len=64)
  engine = engine_lib.Engine(gen, 2)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, 60, n) for n in (5, 12, 3, 9)]  # one prefill width: few compiles
  outs = {i: [] for i in range(len(prompts))}
  for i, p in enumerate(prompts):
    engine.submit(engine_lib.Request(p, 6 + 3 * i, lambda kind, *a, i=i: kind == 'token' and
                                 outs[i].append(a[0]), ignore_eos=True))
  while engine.load()['pending'] or engine.load()['active']:
    engine._iterate()
  for i, p in enumerate(prompts):
    assert outs[i] == gen.generate([p], max_new_tokens=6 + 3 * i, stop_tokens=())[0], i
  assert engine.stats['requests'] == 4 and engine.stats['shared_steps'] > 0


class _FakeTokenizer:
  vocab_size = 100
  eos_id = 1

  def encode(self, text):
    return np.array([ord(c) % 100 for c in text])

  def decode(self, ids):
    return ''.join(chr(97 + int(i) % 26) for i in ids)


def served(tok, max_len=32, **kw) -> protocol.Served:
  """What parsing knows of a server of model 'm' (the length check: the one Engine.check
  and Generator.check apply, decode.check_prompt, for a rope model of max_len)."""
  def check(ids, max_tokens, add_bos=True):
    return decode.check_prompt(np.asarray(ids), max_tokens, add_bos, tok.vocab_size, max_len,
                               '', ', or load(..., max_len=N)')
  return protocol.Served(models=['m'], tokenizer=tok, max_len=max_len, eos_id=tok.eos_id,
                         check=check, **kw)


def parse(body, tok, max_len=32, **kw) -> protocol.CompletionParams:
  """protocol.parse_completion of a body given as JSON (as the server reads it)."""
  raw = body if isinstance(body, bytes) else json.dumps(body).encode()
  return protocol.parse_completion(protocol.decode(raw, protocol.CompletionRequest),
                                   served(tok, max_len, **kw))


def test_parse_completion_says_what_is_wrong():
  ok = {'model': 'm', 'prompt': 'abc'}
  p = parse(dict(ok), _FakeTokenizer())
  assert p.max_tokens == protocol.DEFAULT_MAX_TOKENS and p.temperature == 1.0 and not p.stream
  assert parse(dict(ok, prompt=[[1, 2], [3]]), _FakeTokenizer()).prompts[1].ids.tolist() == [3]
  # The spec allows these: an integral float is an integer, a null prompt starts a document.
  assert parse(dict(ok, max_tokens=1.0), _FakeTokenizer()).max_tokens == 1
  p = parse(dict(ok, prompt=None), _FakeTokenizer()).prompts[0]
  assert p.fed == [0] and p.add_bos
  assert parse(dict(ok, n=3, best_of=3, seed=2**40), _FakeTokenizer()).n == 3
  bad = [({'prompt': 'abc'}, 400, 'model'), (dict(ok, model='x'), 404, 'does not exist'),
         (dict(ok, max_tokens=-1), 400, 'max_tokens'), (dict(ok, max_tokens=33), 400, 'beyond'),
         (dict(ok, prompt='a' * 30, max_tokens=4), 400, 'positions'),
         (dict(ok, temperature=-0.5), 400, 'temperature'), (dict(ok, top_p=0), 400, 'top_p'),
         (dict(ok, top_p=1.5), 400, 'top_p'), (dict(ok, logprobs=99), 400, 'logprobs'),
         (dict(ok, stop=['']), 400, 'stop'), (dict(ok, n=2, best_of=3), 400, 'best_of'),
         (dict(ok, n=99), 400, 'n'), (dict(ok, prompt=['a'] * 20, n=16), 400, 'per request'),
         (dict(ok, prompt=[]), 400, 'prompt'), (dict(ok, prompt=[[1], 'a']), 400, 'prompt'),
         (dict(ok, prompt=[100]), 400, 'token ids'), (dict(ok, max_tokens=True), 400, 'max_t'),
         (dict(ok, max_tokens=1.5), 400, 'max_t'), (dict(ok, max_tokens='3'), 400, 'max_t'),
         (dict(ok, ignore_eos='yes'), 400, 'ignore_eos'), (dict(ok, suffix='x'), 400, 'suffix'),
         (dict(ok, prompt=[[2**70]]), 400, 'prompt'), (dict(ok, prompt=[2**31]), 400, 'prompt'),
         (dict(ok, prompt=[-1]), 400, 'prompt'), (dict(ok, presence_penalty=2.5), 400, 'pres'),
         (dict(ok, frequency_penalty=-3), 400, 'frequency_penalty'),
         (dict(ok, logit_bias={'5': 101}), 400, 'logit_bias'),
         (dict(ok, logit_bias={'100': 1}), 400, 'logit_bias'),
         (dict(ok, logit_bias={'x': 1}), 400, 'logit_bias'),
         (dict(ok, logit_bias={str(i): 1 for i in range(301)}), 400, 'logit_bias'),
         ([1], 400, 'JSON object'), (b'{"model": "m", "prompt": "a\\ud800b"}', 400, 'JSON'),
         (b'[' * 100_000 + b']' * 100_000, 400, 'deeper'), (b'{"model": ', 400, 'JSON')]
  for body, status, words in bad:
    with pytest.raises(server.ApiError) as e:
      parse(body, _FakeTokenizer())
    assert e.value.status == status and words in e.value.message, (body, e.value.message)
  p = parse(dict(ok, presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={'7': -100}),
            _FakeTokenizer())
  assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (1.5, -0.5, {7: -100.0})


def test_json_depth_counts_brackets_outside_strings():
  assert protocol.json_depth(b'{"a": [1, {"b": "[[[{{"}], "c": "\\"}"}') == 3
  assert protocol.json_depth(b'"[[["') == 0 and protocol.json_depth(b'[' * 50) == 50


def test_stop_strings_cut_and_hold_back():
  params = parse({'model': 'm', 'prompt': '', 'stop': ['cd', 'zzz']}, _FakeTokenizer())
  choice = streaming.Choice(0, protocol.Prompt('', np.zeros(0, np.int64), False), params,
                            _FakeTokenizer(), eos_id=99)
  # Token ids 0.. decode to 'a'...: 'ab' is safe, 'c' might start 'cd', 'z' might start 'zzz'.
  texts = [choice.on_event('token', t, None)[0] for t in (0, 1, 2)]
  assert texts == ['a', 'b', ''] and not choice.done
  assert choice.on_event('token', 3, None)[0] == '' and choice.finish_reason == 'stop'
  assert choice.text() == 'ab' and choice.completion_tokens == 4


# ----------------------------------------------------------------------------- live server


@pytest.mark.slow
def test_models_health_and_a_greedy_completion(live):
  models = live.client.models.list()
  assert [m.id for m in models.data] == [live.model] == ['export']  # the base name, no path
  assert _health(live)['slots'] == MAX_BATCH
  for prompt in PROMPTS[:3]:
    r = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=12,
                                       temperature=0)
    c = r.choices[0]
    want = _expected(live, prompt, 12)
    assert c.token_ids == want, prompt
    ids = live.tok.encode(prompt).tolist()
    assert c.text == live.tok.decode(ids + want)[len(live.tok.decode(ids)):]
    assert c.finish_reason == ('length' if len(want) == 12 else 'stop')
    assert r.object == 'text_completion' and r.id.startswith('cmpl-')
    assert r.usage.prompt_tokens == len(ids) + 1  # BOS included
    assert r.usage.completion_tokens >= len(want)


@pytest.mark.slow
def test_requests_joining_a_running_batch_match_generate_alone(live):
  """Requests join at different steps of one another's decoding (per-slot cache rows and
  positions) and each still gets exactly its own greedy continuation."""
  before = _health(live)['shared_steps']
  lengths = [40, 20, 9, 30, 15]
  prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2], 'Every citizen']
  started = [threading.Event() for _ in prompts]

  def stream(i):
    if i:
      started[i - 1].wait(60)
    out = []
    for chunk in live.client.completions.create(model=live.model, prompt=prompts[i],
                                                max_tokens=lengths[i], temperature=0,
                                                stream=True, logprobs=0):
      out += chunk.choices[0].logprobs.tokens
      if len(out) >= 3:  # the next request joins while this one decodes
        started[i].set()
    started[i].set()
    return out

  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    futures = [pool.submit(stream, i) for i in range(len(prompts))]
    got = [f.result(timeout=120) for f in futures]
  for i, prompt in enumerate(prompts):
    want = _expected(live, prompt, lengths[i])
    ids = live.tok.encode(prompt).tolist()
    texts = streaming.TokenTexts(live.tok)
    pieces = [texts.text(t, at_start=not live.tok.decode(ids + want[:j]))
              for j, t in enumerate(want)]
    assert got[i] == pieces, prompt
  assert _health(live)['shared_steps'] > before + 10


@pytest.mark.slow
def test_streaming_and_batch_prompts_equal_the_plain_response(live):
  kw = dict(model=live.model, max_tokens=10, temperature=0)
  whole = live.client.completions.create(prompt=PROMPTS[:3], **kw)
  assert [c.index for c in whole.choices] == [0, 1, 2]
  for i, c in enumerate(whole.choices):
    assert c.token_ids == _expected(live, PROMPTS[i], 10)
  texts, reasons = ['', '', ''], [None] * 3
  for chunk in live.client.completions.create(prompt=PROMPTS[:3], stream=True,
                                              stream_options={'include_usage': True}, **kw):
    for c in chunk.choices:
      texts[c.index] += c.text
      reasons[c.index] = c.finish_reason or reasons[c.index]
    if chunk.usage:
      assert chunk.usage.completion_tokens == whole.usage.completion_tokens
  assert texts == [c.text for c in whole.choices]
  assert reasons == [c.finish_reason for c in whole.choices]


@pytest.mark.slow
def test_logprobs_and_echo_score_a_prompt(live):
  """lm-eval-harness style: echo=True, max_tokens=0 gives the prompt tokens' logprobs, equal
  to a full forward pass of the model over BOS + prompt. Echo shows the BOS the server put
  first (its text is empty); nothing scores the first token: null, as in the OpenAI format."""
  prompt = PROMPTS[3]
  r = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=2, temperature=0)
  c = r.choices[0]
  ids = live.tok.encode(prompt)
  assert c.text == prompt and c.finish_reason == 'length' and r.usage.completion_tokens == 0
  lp = c.logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == ids.size + 1
  assert ''.join(lp.tokens) == live.tok.decode(ids) and lp.tokens[0] == ''
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  lp.token_logprobs, lp.top_logprobs = lp.token_logprobs[1:], lp.top_logprobs[1:]
  gen = live.gen
  ints = gen.prompt_batch([ids], [True], [1], ids.size + 1).ints_NxWx4
  x = gen.input_vectors(gen.params, gen.rows_for(ints[..., 2]), ints)
  logits = gen.model.apply({'params': gen.params}, x, positions_BxL=ints[..., 1],
                           method=model_lib.SconeLM.backbone)
  logp = np.asarray(jax.nn.log_softmax(logits[0, :-1]))
  np.testing.assert_allclose(lp.token_logprobs, logp[np.arange(ids.size), ids], atol=2e-4)
  for j, top in enumerate(lp.top_logprobs):
    assert len(top) <= 3 and max(top.values()) == pytest.approx(logp[j].max(), abs=2e-4)

  # Echo plus new tokens: the continuation's logprobs follow the prompt's; greedy = top-1.
  r = live.client.completions.create(model=live.model, prompt=PROMPTS[0], max_tokens=5,
                                     echo=True, logprobs=1, temperature=0)
  c = r.choices[0]
  n = live.tok.encode(PROMPTS[0]).size + 1  # BOS first
  assert c.text.startswith(PROMPTS[0]) and len(c.logprobs.tokens) == n + len(c.token_ids)
  for tok_lp, top in zip(c.logprobs.token_logprobs[n:], c.logprobs.top_logprobs[n:]):
    assert tok_lp == pytest.approx(max(top.values()), abs=1e-6)
  assert c.logprobs.text_offset[n] == len(PROMPTS[0])


@pytest.mark.slow
def test_stop_strings_and_seeded_sampling(live):
  full = live.client.completions.create(model=live.model, prompt=PROMPTS[0], max_tokens=24,
                                        temperature=0).choices[0].text
  stop = full[len(full) // 2:len(full) // 2 + 3]
  for stream in (False, True):
    r = live.client.completions.create(model=live.model, prompt=PROMPTS[0], max_tokens=24,
                                       temperature=0, stop=[stop], stream=stream)
    chunks = list(r) if stream else [r]
    text = ''.join(c.choices[0].text for c in chunks if c.choices)
    assert text == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == 'stop'
  kw = dict(model=live.model, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9,
            extra_body={'top_k': 20})
  a = live.client.completions.create(seed=5, **kw).choices[0].token_ids
  assert live.client.completions.create(seed=5, **kw).choices[0].token_ids == a
  assert live.client.completions.create(seed=6, **kw).choices[0].token_ids != a


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_keeps_serving(live):
  url = live.url + '/v1/completions'
  status, body = _post(url, b'{"model": "x", "prompt": ')
  assert status == 400 and 'not valid JSON' in body['error']['message']
  with pytest.raises(openai.NotFoundError, match='does not exist'):
    live.client.completions.create(model='gpt-5', prompt='hi')
  too_long = ' '.join(['the nation'] * 200)
  for kw, words in [(dict(max_tokens=-1), 'max_tokens'), (dict(max_tokens=10**6), 'beyond'),
                    (dict(prompt=too_long), 'positions'), (dict(temperature=-1), 'temperature'),
                    (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
                    (dict(logprobs=50), 'logprobs')]:
    args = dict(model=live.model, prompt='hi', max_tokens=4)
    args.update(kw)
    with pytest.raises(openai.BadRequestError, match=words):
      live.client.completions.create(**args)
  status, body = _post(url, json.dumps({'model': live.model, 'prompt': 'hi', 'top_k': 'x'})
                       .encode())
  assert status == 400 and body['error']['param'] == 'top_k'
  r = live.client.completions.create(model=live.model, prompt=PROMPTS[1], max_tokens=6,
                                     temperature=0)
  assert r.choices[0].token_ids == _expected(live, PROMPTS[1], 6)
  assert _health(live)['errors'] == 0


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_slot(live):
  assert len(_expected(live, PROMPTS[0], 200)) == 200  # no EOS: only the disconnect stops it
  before = _health(live)
  stream = live.client.completions.create(model=live.model, prompt=PROMPTS[0], max_tokens=200,
                                          temperature=0, stream=True)
  for i, _ in enumerate(stream):
    if i == 2:
      break
  stream.close()
  deadline = time.time() + 30
  while _health(live)['active'] and time.time() < deadline:
    time.sleep(0.05)
  load = _health(live)
  assert load['active'] == 0 and load['pending'] == 0
  assert load['tokens'] - before['tokens'] < 150, 'the slot kept decoding for a gone client'
  r = live.client.completions.create(model=live.model, prompt=PROMPTS[1], max_tokens=4,
                                     temperature=0)
  assert r.choices[0].token_ids == _expected(live, PROMPTS[1], 4)


# Last: it stops the module's server.
@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(live):
  first = threading.Event()

  def stream(prompt):
    out, reason = [], None
    for chunk in live.client.completions.create(model=live.model, prompt=prompt, max_tokens=60,
                                                temperature=0, stream=True, logprobs=0):
      out += chunk.choices[0].logprobs.tokens
      reason = chunk.choices[0].finish_reason or reason
      first.set()
    return len(out), reason

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(stream, p) for p in ('The nation', 'Our people')]
    assert first.wait(60)
    live.srv.proc.send_signal(signal.SIGTERM)
    results = [f.result(timeout=120) for f in futures]
  # Recent uvicorn re-raises the signal once it has shut down cleanly; older ones exit 0.
  assert live.srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
  log = open(live.srv.log_path).read()
  assert 'drained' in log and 'Traceback' not in log, log[-2000:]
  for (n, reason), prompt in zip(results, ('The nation', 'Our people')):
    want = _expected(live, prompt, 60)
    assert n == len(want) and reason == ('length' if len(want) == 60 else 'stop')
  with pytest.raises(OSError):
    _get(live.url + '/health')
