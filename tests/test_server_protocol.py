"""The server against clients nobody here wrote: the official openai client for chat, models
and n; hostile bodies and raw sockets (every 4xx an OpenAI error object, never a 5xx, and a
small request answered meanwhile); schemathesis driven by the server's own /openapi.json.
"""
import concurrent.futures
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from scone_jax import chat_template
from scone_jax import protocol
from scone_jax import streaming
from test_server import build_export, start_server

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 48
KEEP_ALIVE_REQUESTS = 3
# A Hugging Face tokenizer_config.json, as --chat_template may name one.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope='module')
def live(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('server_protocol'))
  export_dir = build_export(root)
  config = os.path.join(root, 'tokenizer_config.json')
  with open(config, 'w') as f:
    json.dump({'chat_template': TEMPLATE, 'model_max_length': 256}, f)
  srv = start_server(export_dir, os.path.join(root, 'server.log'), f'--chat_template={config}',
                     f'--header_timeout={HEADER_TIMEOUT}', f'--body_timeout={BODY_TIMEOUT}',
                     f'--max_connections={MAX_CONNECTIONS}',
                     f'--keep_alive_requests={KEEP_ALIVE_REQUESTS}')
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  gen = serving.load(export_dir)
  yield types.SimpleNamespace(srv=srv, client=srv.client, url=srv.url, model='export',
                              tok=gen.tokenizer, host_port=srv.url.split('//')[1].split(':'))
  if srv.proc.poll() is None:
    srv.proc.kill()
    srv.proc.wait()
  srv.log.close()


def _request(url, data=None, content_type='application/json', method=None):
  headers = {'Content-Type': content_type} if content_type else {}
  req = urllib.request.Request(url, data=data, headers=headers, method=method)
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, dict(r.headers), r.read()
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers), e.read()


def _small_latency(live) -> float:
  t0 = time.perf_counter()
  r = live.client.completions.create(model=live.model, prompt='The nation', max_tokens=2,
                                     temperature=0)
  assert len(r.choices[0].token_ids) <= 2
  return time.perf_counter() - t0


def _server_errors(live) -> str:
  log = open(live.srv.log_path).read()
  return log if 'Traceback' in log or 'request failed' in log else ''


# ----------------------------------------------------------------------------- unit tests


def test_chat_templates_as_hugging_face_stores_them(tmp_path):
  messages = [protocol.ChatMessage(role='system', content='Be brief.'),
              protocol.ChatMessage(role='user', content=[{'type': 'text', 'text': 'Hi'}])]
  default = chat_template.ChatTemplate(None, '<s>', '</s>')
  assert default.render(messages) == 'System: Be brief.\n\nUser: Hi\n\nAssistant:'
  assert default.render(messages, False) == 'System: Be brief.\n\nUser: Hi\n\n'
  config = tmp_path / 'tokenizer_config.json'
  config.write_text(json.dumps({'chat_template': [{'name': 'tool_use', 'template': 'x'},
                                                  {'name': 'default', 'template': TEMPLATE}]}))
  plain = tmp_path / 'template.jinja'
  plain.write_text(TEMPLATE)
  for path in (config, plain):
    t = chat_template.ChatTemplate(chat_template.read_chat_template(str(path)), '<s>', '</s>')
    assert t.render(messages) == '<s><|system|>Be brief.<|user|>Hi<|assistant|>'
  config.write_text('{"model_max_length": 8}')
  with pytest.raises(ValueError, match='chat_template'):
    chat_template.read_chat_template(str(config))
  strict = chat_template.ChatTemplate("{{ raise_exception('only user turns') }}", '', '')
  with pytest.raises(protocol.ApiError, match='only user turns'):
    strict.render(messages)
  sandboxed = chat_template.ChatTemplate("{{ ''.__class__.__mro__ }}", '', '')
  with pytest.raises(protocol.ApiError):   # the sandbox refuses it: a 400, not a leak
    sandboxed.render(messages)


class _ByteTokenizer:
  """A SentencePiece-like vocabulary: '▁caf' and byte pieces for the rest."""
  kind = 'sentencepiece'
  pieces = ['<pad>', '</s>', '\u2581caf', '\u2581ok'] + [f'<0x{b:02X}>' for b in range(256)]

  def id_to_piece(self, i):
    return self.pieces[i]

  def decode(self, ids):
    out = b''.join(bytes([int(self.pieces[i][3:5], 16)]) if self.pieces[i].startswith('<0x')
                   else self.pieces[i].replace('\u2581', ' ').encode() if i > 1 else b''
                   for i in ids)
    return out.decode('utf-8', 'replace').removeprefix(' ')


def test_token_strings_and_offsets_with_byte_tokens():
  tok = _ByteTokenizer()
  texts = streaming.TokenTexts(tok)
  ids = [0, 2] + [4 + b for b in 'é 😀'.encode()] + [3]
  prompt = protocol.Prompt(tok.decode(ids), np.asarray(ids[1:]), True)
  assert prompt.text == 'café 😀 ok'
  params = protocol.CompletionParams(
      model='m', prompts=[prompt], max_tokens=0, temperature=0, top_p=1, top_k=0, stop=[],
      seed=None, stream=False, include_usage=False, logprobs=0, echo=True, ignore_eos=False)
  choice = streaming.Choice(0, prompt, params, tok, eos_id=1, texts=texts)
  n = len(ids) - 1
  outputs = {'logprob': np.zeros(n), 'top_logprob': np.zeros((n, 1)),
             'top_id': np.asarray(ids[1:])[:, None]}
  choice.on_event('prompt', outputs)
  lp = streaming.completion_logprobs(choice.entries)
  assert lp['tokens'] == ['', 'caf', 'bytes:\\xc3', 'bytes:\\xa9', ' ', 'bytes:\\xf0',
                          'bytes:\\x9f', 'bytes:\\x98', 'bytes:\\x80', ' ok']
  assert lp['text_offset'] == [0, 0, 3, 3, 4, 5, 5, 5, 5, 6]
  assert all(a <= b for a, b in zip(lp['text_offset'], lp['text_offset'][1:]))
  assert '\ufffd' not in ''.join(lp['tokens'])


# ----------------------------------------------------------------------------- live server


@pytest.mark.slow
def test_openapi_documents_every_body_and_metrics_as_text(live):
  status, _, raw = _request(live.url + '/openapi.json', content_type=None)
  doc = json.loads(raw)
  schemas = doc['components']['schemas']
  for path in ('/v1/completions', '/v1/chat/completions', '/tokenize', '/detokenize'):
    body = doc['paths'][path]['post']['requestBody']['content']
    ref = body['application/json']['schema']['$ref']
    assert list(body) == ['application/json'] and ref.split('/')[-1] in schemas, path
  completion = schemas['CompletionRequest']['properties']
  for field in ('prompt', 'max_tokens', 'temperature', 'top_p', 'n', 'stop', 'logprobs', 'echo',
                'presence_penalty', 'frequency_penalty', 'logit_bias', 'seed', 'stream'):
    assert field in completion, field
  assert completion['model']['enum'] == [live.model]
  assert 'messages' in schemas['ChatCompletionRequest']['properties']
  assert list(doc['paths']['/metrics']['get']['responses']['200']['content']) == ['text/plain']
  assert '/v1/models/{model_id}' in doc['paths']


def _hostile(live):
  """(path, body, content type, status): bodies a fuzzer or an attacker sends."""
  m = live.model
  deep = b'{"model": "%s", "prompt": ' % m.encode() + b'[' * 100_000 + b']' * 100_000 + b'}'
  return [
      ('/v1/completions', json.dumps({'model': m, 'prompt': [[2**70]]}).encode(), None, 400),
      ('/v1/completions', json.dumps({'model': m, 'prompt': [2**31]}).encode(), None, 400),
      ('/v1/completions', json.dumps({'model': m, 'prompt': [10**6]}).encode(), None, 400),
      ('/v1/completions', b'{"model": "%s", "prompt": "a\\ud800b"}' % m.encode(), None, 400),
      ('/v1/completions', b'{"model": "%s", "prompt": "a\xed\xa0\x80b"}' % m.encode(), None, 400),
      ('/v1/completions', b'{"model": "%s", "prompt": "\xff"}' % m.encode(), None, 400),
      ('/v1/completions', deep, None, 400),
      ('/v1/completions', json.dumps({'model': m, 'prompt': 'hi'}).encode(), 'text/plain', 415),
      ('/v1/completions', json.dumps({'model': m, 'prompt': 'hi'}).encode(), '', 415),
      ('/v1/completions', json.dumps({'model': m, 'prompt': 'x', 'n': 1e300}).encode(), None,
       400),
      ('/v1/chat/completions', json.dumps({'model': m, 'messages': [{'role': 'user',
                                                                     'content': [[1]]}]}).encode(),
       None, 400),
      ('/v1/chat/completions', json.dumps({'model': m, 'messages': []}).encode(), None, 400),
      ('/tokenize', b'{"prompt": "a\\udc00"}', None, 400),
      ('/tokenize', deep.replace(b'"model": "%s", ' % m.encode(), b''), None, 400),
      ('/detokenize', json.dumps({'tokens': [[2**70]]}).encode(), None, 400),
      ('/detokenize', json.dumps({'tokens': [2**70]}).encode(), None, 400),
      ('/detokenize', json.dumps({'tokens': [10**6]}).encode(), None, 400),
      ('/v1/nothing', b'{}', None, 404),
      ('/v1/models', b'{}', None, 405),
  ]


@pytest.mark.slow
def test_hostile_bodies_get_4xx_openai_errors_and_never_delay_a_small_request(live):
  cases = _hostile(live)
  for path, body, content_type, want in cases:
    status, headers, raw = _request(live.url + path, body,
                                    'application/json' if content_type is None else content_type)
    error = json.loads(raw)['error']
    assert status == want, (path, body[:80], raw[:300])
    assert set(error) == {'message', 'type', 'param', 'code'} and error['message'], raw
  # Over --max_body_mb: refused from its Content-Length, before the body is read.
  s = _connect(live)
  s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            b'Content-Length: %d\r\n\r\n[[[[' % (5 << 20))
  head, _, body = _closed_within(s, 10).partition(b'\r\n\r\n')
  s.close()
  assert head.startswith(b'HTTP/1.1 413') and 'max_body_mb' in json.loads(body)['error'][
      'message'], head
  # Sent again, all at once, four times over: a small request meanwhile is answered quickly.
  idle = min(_small_latency(live) for _ in range(3))
  stop = threading.Event()

  def flood(i):
    while not stop.is_set():
      path, body, content_type, _ = cases[i % len(cases)]
      _request(live.url + path, body, 'application/json' if content_type is None
               else content_type)
      i += 1

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(flood, i * 5) for i in range(4)]
    time.sleep(0.5)
    loaded = sorted(_small_latency(live) for _ in range(8))
    stop.set()
    for f in futures:
      f.result(timeout=60)
  print(f'small request idle {idle:.3f}s, beside hostile bodies {loaded}')
  assert np.median(loaded) < 0.5 and np.median(loaded) < idle + 0.4, (idle, loaded)
  assert not _server_errors(live)


@pytest.mark.slow
def test_tokenize_of_a_large_prompt_never_delays_a_small_completion(live):
  """Before: one /tokenize of a 3.9 MB prompt held every request for 2.8 s (its million ids
  were made JSON on the event loop). Now it runs in the large-body pool."""
  prompt = ('The congress will build a stronger union, café 😀 ' * 80_000)[:3_600_000]
  big = json.dumps({'prompt': prompt}, ensure_ascii=False).encode()
  assert 3.5 * 2**20 < len(big) < 4 * 2**20   # just under --max_body_mb
  ids = json.dumps({'tokens': list(range(3, 300)) * 1300}).encode()  # 390k ids
  idle = min(_small_latency(live) for _ in range(3))
  stop, sizes = threading.Event(), []

  def flood(body, path):
    while not stop.is_set():
      status, _, raw = _request(live.url + path, body)
      assert status == 200, raw[:300]
      sizes.append(len(raw))

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = [pool.submit(flood, big, '/tokenize'), pool.submit(flood, big, '/tokenize'),
               pool.submit(flood, ids, '/detokenize')]
    time.sleep(1.0)
    loaded = sorted(_small_latency(live) for _ in range(8))
    stop.set()
    for f in futures:
      f.result(timeout=120)
  print(f'small request idle {idle:.3f}s, beside big /tokenize {loaded}, {len(sizes)} done')
  assert sizes and max(sizes) > 5_000_000
  assert np.median(loaded) < 0.5 and max(loaded) < 1.0, (idle, loaded)


@pytest.mark.slow
def test_chat_completions_plain_and_streamed(live):
  messages = [{'role': 'system', 'content': 'You answer.'},
              {'role': 'user', 'content': 'The nation must protect'}]
  r = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
  c = r.choices[0]
  assert r.object == 'chat.completion' and r.id.startswith('chatcmpl-')
  assert c.message.role == 'assistant' and c.finish_reason in ('stop', 'length')
  # The same as a completion of the template's text (the BOS string read as the BOS token).
  text = chat_template.ChatTemplate(TEMPLATE, '<pad>', '</s>').render(
      [protocol.ChatMessage(**m) for m in messages])
  assert text.startswith('<pad><|system|>')
  ids = live.tok.encode(text[len('<pad>'):]).tolist()
  want = live.client.completions.create(model=live.model, prompt=ids, max_tokens=8,
                                        temperature=0).choices[0]
  assert c.message.content == want.text and r.usage.prompt_tokens == len(ids) + 1
  assert len(c.logprobs.content) == r.usage.completion_tokens - (c.finish_reason == 'stop')
  for entry in c.logprobs.content:
    assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-6)
    assert bytes(entry.bytes).decode('utf-8', 'replace') or entry.token.startswith('bytes:')
  chunks = list(live.client.chat.completions.create(
      model=live.model, messages=messages, max_tokens=8, temperature=0, stream=True,
      stream_options={'include_usage': True}))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(ch.choices[0].delta.content or '' for ch in chunks if ch.choices) == \
      c.message.content
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
  assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
  with pytest.raises(openai.BadRequestError, match='messages'):
    live.client.chat.completions.create(model=live.model, messages=[], max_tokens=2)


@pytest.mark.slow
def test_models_by_id_and_n_completions_with_independent_seeds(live):
  assert live.client.models.retrieve(live.model).id == live.model
  with pytest.raises(openai.NotFoundError, match='does not exist'):
    live.client.models.retrieve('gpt-5')
  kw = dict(model=live.model, prompt='Our people', max_tokens=12, temperature=1.0)
  r = live.client.completions.create(n=3, seed=11, **kw)
  assert [c.index for c in r.choices] == [0, 1, 2]
  alone = [live.client.completions.create(seed=11 + i, **kw).choices[0].token_ids
           for i in range(3)]
  assert [c.token_ids for c in r.choices] == alone and len(set(map(tuple, alone))) == 3
  r = live.client.completions.create(n=2, prompt=['The nation', 'Our people'], seed=3,
                                     **{k: v for k, v in kw.items() if k != 'prompt'})
  assert [c.index for c in r.choices] == [0, 1, 2, 3]
  assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices) + sum(
      c.finish_reason == 'stop' for c in r.choices)
  chat = live.client.chat.completions.create(model=live.model, n=2, seed=4, max_tokens=6,
                                             messages=[{'role': 'user', 'content': 'Hi'}])
  assert [c.index for c in chat.choices] == [0, 1]


@pytest.mark.slow
def test_text_offsets_never_go_back_with_non_ascii_text(live):
  prompt = 'café 😀 ok — naïve'
  r = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=6, echo=True,
                                     logprobs=1, temperature=0)
  c = r.choices[0]
  offsets, tokens = c.logprobs.text_offset, c.logprobs.tokens
  assert all(a <= b for a, b in zip(offsets, offsets[1:])), offsets
  assert all(0 <= o <= len(c.text) for o in offsets) and '\ufffd' not in ''.join(tokens)
  assert any(t.startswith('bytes:\\x') for t in tokens)  # this tiny vocabulary has byte pieces
  for top in c.logprobs.top_logprobs[1:]:
    assert not any('\ufffd' in t for t in top)


def _connect(live) -> socket.socket:
  s = socket.create_connection((live.host_port[0], int(live.host_port[1])), timeout=10)
  return s


def _closed_within(s: socket.socket, seconds: float) -> bytes:
  """What the server sent before closing s (AssertionError if it stays open)."""
  s.settimeout(seconds)
  got = b''
  try:
    while True:
      chunk = s.recv(65536)
      if not chunk:
        return got
      got += chunk
  except socket.timeout:
    raise AssertionError(f'still open after {seconds}s; got {got[:200]!r}') from None
  except ConnectionResetError:
    return got


@pytest.mark.slow
def test_connection_deadlines_and_caps_with_raw_sockets(live):
  # Slowloris: headers a byte at a time never finish; each is answered 408 and closed at
  # --header_timeout, however often bytes trickle in. A connection that sends nothing is
  # closed then too.
  slow = [_connect(live) for _ in range(20)]
  silent = [_connect(live) for _ in range(5)]
  t0 = time.perf_counter()
  for s in slow:
    s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\n')
  # Bytes trickle in until just before the deadline (were they to extend it, it would
  # pass 0.8 + 1 timeouts after the start); then the answers are read.
  while time.perf_counter() - t0 < 0.8 * HEADER_TIMEOUT:
    for s in slow:
      s.sendall(b'X')
    time.sleep(0.1)
  answers = {}
  while len(answers) < len(slow) + len(silent) and time.perf_counter() - t0 < 4 * HEADER_TIMEOUT:
    readable, _, _ = select.select([s for s in slow + silent if s not in answers], [], [], 0.1)
    for s in readable:
      answers[s] = (time.perf_counter() - t0, _closed_within(s, 3))
  assert len(answers) == len(slow) + len(silent), 'connections held past --header_timeout'
  assert max(t for t, _ in answers.values()) < 1.6 * HEADER_TIMEOUT, sorted(answers.values())
  assert all(answers[s][1].startswith(b'HTTP/1.1 408') for s in slow)
  assert all(answers[s][1] == b'' for s in silent)
  for s in slow + silent:
    s.close()
  # A body that never finishes is cut at --body_timeout (the request fails, nothing waits).
  s = _connect(live)
  s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            b'Content-Length: 1000\r\n\r\n{"model": ')
  t0 = time.perf_counter()
  _closed_within(s, BODY_TIMEOUT + 3)
  assert BODY_TIMEOUT - 0.5 < time.perf_counter() - t0 < BODY_TIMEOUT + 3
  s.close()
  # Over --max_connections: the extra connections get 503 and are closed at once; the
  # others still serve.
  idle = [_connect(live) for _ in range(MAX_CONNECTIONS + 10)]
  refused = 0
  for s in idle:
    s.settimeout(0.2)
    try:
      refused += s.recv(100).startswith(b'HTTP/1.1 503')
    except socket.timeout:
      pass
  for s in idle:
    s.close()
  assert 10 <= refused <= 12, refused   # (the first ones may still be closing)
  time.sleep(0.5)
  # Keep-alive: the --keep_alive_requests-th response on a connection says close, and closes.
  s = _connect(live)
  for i in range(KEEP_ALIVE_REQUESTS):
    s.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
    got = b''
    while b'\r\n\r\n' not in got:
      got += s.recv(65536)
    head, _, body = got.partition(b'\r\n\r\n')
    length = int(head.lower().split(b'content-length: ')[1].split(b'\r\n')[0])
    while len(body) < length:
      body += s.recv(65536)
    assert head.startswith(b'HTTP/1.1 200'), head[:100]
    assert (b'connection: close' in head.lower()) == (i == KEEP_ALIVE_REQUESTS - 1), head
  _closed_within(s, 3)
  s.close()
  assert _small_latency(live) < 5 and not _server_errors(live)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(live, tmp_path):
  """Bounded (examples per operation, a time budget), deterministic: every operation the
  server's /openapi.json documents, with valid and invalid bodies; no response is a 5xx."""
  st = os.path.join(os.path.dirname(sys.executable), 'st')
  out = subprocess.run(
      [st, 'run', live.url + '/openapi.json', '--checks=not_a_server_error',
       '--max-examples=6', '--generation-deterministic', '--workers=1', '--max-time=60',
       '--request-timeout=60', '--phases=coverage,fuzzing', '--suppress-health-check=all',
       f'--report-dir={tmp_path}'], capture_output=True, text=True, timeout=240,
      cwd=str(tmp_path))
  tail = out.stdout[-3000:] + out.stderr[-2000:]
  assert out.returncode == 0 and 'passed' in out.stdout, tail
  assert not _server_errors(live), _server_errors(live)[-3000:]


def _children(pid: int) -> list:
  kids = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        if entry.isdigit() and int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
          kids.append(int(entry))
    except (OSError, ValueError, IndexError):
      pass
  return kids


# The "server" of this script dies the moment its tokenizer worker is spawned, while the
# worker is still importing: its initializer then runs with init as its parent.
_DIES_AT_SPAWN = """
import os, signal, sys
from scone_jax import tokenizer, tokenizing
tok = tokenizer.load(sys.argv[1])
pool = tokenizing.Tokenizing(tok, tok.eos_id)
pool.start()
print(' '.join(str(p) for p in pool._pool._processes), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_worker_spawned_as_its_server_dies_exits_too(live):
  """A worker whose server died before the worker had started (killed at start-up) still
  exits: it would otherwise hold the server's stdout open forever (a caller reading it to
  EOF, as subprocess.run(capture_output=True) does, would hang)."""
  export_dir = os.path.join(os.path.dirname(live.srv.log_path), 'export')
  proc = subprocess.run([sys.executable, '-c', _DIES_AT_SPAWN,
                         os.path.join(export_dir, 'tokenizer.model')],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        timeout=60, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  workers = [int(p) for p in proc.stdout.split()]
  assert workers and proc.returncode == -9, (proc.returncode, proc.stdout)


# Last: it kills the module's server.
@pytest.mark.slow
def test_the_tokenizer_worker_dies_with_a_killed_server(live):
  """A server killed outright (SIGKILL, the OOM killer) never shuts its pools down; its
  tokenizer worker process must not outlive it."""
  workers = _children(live.srv.proc.pid)
  assert workers, 'no tokenizer worker process'
  live.srv.proc.kill()
  live.srv.proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(os.path.exists(f'/proc/{p}') for p in workers):
    time.sleep(0.2)
  assert not any(os.path.exists(f'/proc/{p}') for p in workers), workers
