"""An OpenAI-compatible HTTP server over an export: continuous batching, streaming, logprobs.

  python -m scone_jax.main --mode=serve --export_dir=runs/scone/export --port=8000
  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "export", "prompt": "The nation", "max_tokens": 16}'

Endpoints: POST /v1/completions (the OpenAI completions schema: prompt as text, texts or
token ids; max_tokens, temperature, top_p, top_k, stop, seed, stream, logprobs, echo, and
the extensions timeout, add_special_tokens, ignore_eos), POST /tokenize, POST /detokenize,
GET /tokenizer_info (as vLLM serves them; lm-evaluation-harness's remote tokenizer),
GET /v1/models, GET /metrics (Prometheus), GET /health. The model id is
--served_model_name (default: the export directory's base name; the path is never shown).

Nothing a client sends can hold the others: the body is read asynchronously up to
--max_body_mb (413 beyond), JSON parsing and tokenization run in worker threads (large
bodies in a pool of their own, so a flood of them never queues ahead of a small one), and a
prompt is tokenized in whitespace-bounded pieces, counting as it goes, until it is known to
exceed the model's length: the work per prompt is bounded by the model's limit, not by the
prompt's size.

Decoding is `engine.Engine` (continuous batching in its own thread); this module is the
HTTP side: it validates a request, hands each prompt to the engine, and assembles text,
stop strings and logprobs from the engine's events on per-request asyncio queues, so a
slow client never holds the device.
"""
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import re
import socket
import sys
import time
from typing import Optional, Sequence
import uuid

import fastapi
from fastapi import responses
import numpy as np
import uvicorn

from scone_jax import engine as engine_lib
from scone_jax import serving

Engine = engine_lib.Engine
Request = engine_lib.Request
BOS_ID = serving.BOS_ID
MAX_LOGPROBS = engine_lib.MAX_LOGPROBS   # top logprobs a request may ask for per token
MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16    # OpenAI's default
DEFAULT_MAX_BODY_MB = 4.0
DEFAULT_MAX_PROMPTS = 256
DEFAULT_MAX_PENDING = 1024
DEFAULT_DRAIN_TIMEOUT = 30.0
_UNSUPPORTED = {'suffix': None, 'presence_penalty': 0, 'frequency_penalty': 0,
                'logit_bias': None}
# Bodies up to this size are parsed in a pool of their own: a flood of large ones never
# queues ahead of them.
_SMALL_BODY = 64 << 10
# Prompts longer than this are counted piece by piece (encode_within).
_COUNT_CHARS = 4096


@dataclasses.dataclass
class Limits:
  """What the server accepts per request (the --max_* / --request_timeout flags)."""
  max_body_mb: float = DEFAULT_MAX_BODY_MB
  max_prompts_per_request: int = DEFAULT_MAX_PROMPTS
  max_pending: int = DEFAULT_MAX_PENDING   # prompts waiting for a slot; 0 = no bound
  request_timeout: float = 0.0             # seconds; the default and the most a request gets
  drain_timeout: float = DEFAULT_DRAIN_TIMEOUT

  def check(self):
    if not self.max_body_mb > 0:
      raise ValueError(f'--max_body_mb={self.max_body_mb} must be > 0.')
    if self.max_prompts_per_request < 1:
      raise ValueError(f'--max_prompts_per_request={self.max_prompts_per_request} must be >= 1.')
    if self.max_pending < 0 or self.request_timeout < 0 or self.drain_timeout < 0:
      raise ValueError('--max_pending, --request_timeout and --drain_timeout must be >= 0 '
                       '(0: no bound).')
    return self


# ----------------------------------------------------------------------------- requests


class ApiError(Exception):
  """A request the server refuses: HTTP status and an OpenAI-style error body."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               kind: str = 'invalid_request_error', headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': None}}


@dataclasses.dataclass
class Prompt:
  text: str
  ids: np.ndarray        # what the model reads after the BOS (if any)
  add_bos: bool          # the server puts BOS first (add_special_tokens)
  shown_bos: int = BOS_ID  # the client's token the BOS stands for (echo shows it)

  @property
  def fed(self) -> list:
    """Every token the model reads, the BOS as the client sent it: what echo returns."""
    return ([self.shown_bos] if self.add_bos else []) + [int(t) for t in self.ids]


@dataclasses.dataclass
class CompletionParams:
  model: str
  prompts: list          # of Prompt
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  stop: list
  seed: Optional[int]
  stream: bool
  include_usage: bool
  logprobs: Optional[int]
  echo: bool
  ignore_eos: bool
  timeout: float = 0.0   # seconds from arrival; 0 = none


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def encode_within(tokenizer, text: str, limit: int) -> Optional[np.ndarray]:
  """text's token ids, or None as soon as it is known to need more than `limit` tokens.

  A long text is counted in pieces that end before whitespace (which SentencePiece pieces
  never span, so the pieces' counts add up to the whole's; a margin covers tokenizers
  that add a prefix per piece), stopping once the count passes the limit: a 20 MB prompt
  costs about one model length of tokenization. A text that passes is then encoded whole.
  """
  n = len(text)
  if n > _COUNT_CHARS:
    count, margin, start = 0, 0, 0
    while start < n:
      end = start + _COUNT_CHARS
      if end < n:
        cut = max(text.rfind(' ', start + 1, end), text.rfind('\n', start + 1, end))
        margin += 2 if cut > start else 32   # no whitespace: a cut inside a word
        end = cut if cut > start else end
      count += len(tokenizer.encode(text[start:end]))
      if count - margin > limit:
        return None
      start = end
  ids = np.asarray(tokenizer.encode(text), np.int64)
  return ids if ids.size <= limit else None


def parse_completion(body, models: Sequence[str], tokenizer, max_len: int, *,
                     max_prompts: int = DEFAULT_MAX_PROMPTS, max_timeout: float = 0.0,
                     eos_id: Optional[int] = None) -> CompletionParams:
  """The request's parameters, or ApiError saying which one is wrong and why.

  Runs in a worker thread (it tokenizes); bounded work per prompt (encode_within).
  """
  if not isinstance(body, dict):
    raise ApiError(400, 'the request body must be a JSON object.')

  def get(name, default):
    value = body.get(name)
    return default if value is None else value

  model = body.get('model')
  if not isinstance(model, str):
    raise ApiError(400, '"model" is required (a string); GET /v1/models lists them.', 'model')
  if model not in models:
    raise ApiError(404, f'model {model!r} does not exist; this server serves '
                   f'{", ".join(map(repr, models))}.', 'model', 'not_found_error')
  for name, neutral in _UNSUPPORTED.items():
    if body.get(name) not in (None, neutral, {}):
      raise ApiError(400, f'"{name}" is not supported by this server.', name)
  for name in ('n', 'best_of'):
    if body.get(name) not in (None, 1):
      raise ApiError(400, f'"{name}" must be 1 (one completion per prompt); send the prompt '
                     'again with other seeds for more.', name)

  max_tokens = get('max_tokens', DEFAULT_MAX_TOKENS)
  if not _is_int(max_tokens) or max_tokens < 0:
    raise ApiError(400, f'"max_tokens" must be an integer >= 0, got {max_tokens!r}.',
                   'max_tokens')
  if max_tokens > max_len:
    raise ApiError(400, f'max_tokens={max_tokens} is beyond this model\'s length: prompt '
                   f'(with BOS) + max_tokens - 1 must fit in {max_len} positions.', 'max_tokens')
  add_special = get('add_special_tokens', True)
  if not isinstance(add_special, bool):
    raise ApiError(400, '"add_special_tokens" must be true or false.', 'add_special_tokens')

  prompt = body.get('prompt')
  if isinstance(prompt, str):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    prompts = prompt
  elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
    prompts = [prompt]
  elif (isinstance(prompt, list) and prompt and all(
      isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)):
    prompts = prompt
  else:
    raise ApiError(400, '"prompt" must be a string, a non-empty list of strings, a list of '
                   'token ids or a list of such lists.', 'prompt')
  if len(prompts) > max_prompts:
    raise ApiError(400, f'this request has {len(prompts)} prompts; this server takes at most '
                   f'{max_prompts} per request (--max_prompts_per_request): split it.', 'prompt')

  def too_long(i, n_tokens, add_bos, at_least=False):
    bos = ' (+1 BOS)' if add_bos else ''
    n = f'more than {n_tokens}' if at_least else f'{n_tokens}'
    return ApiError(400, f'prompt {i} has {n} tokens{bos} and max_tokens={max_tokens}: that '
                    f'needs more than the {max_len} positions this model allows; shorten the '
                    'prompt or lower max_tokens.', 'prompt')

  if eos_id is None:
    eos_id = getattr(tokenizer, 'eos_id', 1)
  parsed = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      add_bos = add_special
      limit = max_len - int(add_bos) - max(max_tokens, 1) + 1
      ids = encode_within(tokenizer, p, max(limit, 0))
      if ids is None:
        raise too_long(i, max(limit, 0), add_bos, at_least=True)
      text = p
    else:
      ids = np.asarray(p, np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ApiError(400, f'prompt token ids must be in [0, {tokenizer.vocab_size}).',
                       'prompt')
      # A leading BOS is the server's own: never doubled. With add_special_tokens a leading
      # EOS starts a document too (lm-eval's prefix token when the BOS id is 0), as the
      # model saw documents start: after BOS, never after EOS.
      starts = (BOS_ID, eos_id) if add_special else (BOS_ID,)
      shown_bos = int(ids[0]) if ids.size and ids[0] in starts else BOS_ID
      add_bos = add_special or (ids.size > 0 and ids[0] == BOS_ID)
      if ids.size and ids[0] in starts:
        ids = ids[1:]
      if ids.size + int(add_bos) + max(max_tokens, 1) - 1 > max_len:
        raise too_long(i, ids.size, add_bos)
      text = None
    if ids.size + int(add_bos) == 0:
      raise ApiError(400, f'prompt {i} is empty and add_special_tokens is false: there is '
                     'nothing to condition on.', 'prompt')
    if text is None:
      text = tokenizer.decode(ids)
    parsed.append(Prompt(text, ids, bool(add_bos)) if isinstance(p, str) else
                  Prompt(text, ids, bool(add_bos), shown_bos))

  temperature = get('temperature', 1.0)
  if not _is_number(temperature) or temperature < 0:
    raise ApiError(400, f'"temperature" must be a number >= 0 (0 = greedy), got '
                   f'{temperature!r}.', 'temperature')
  top_p = get('top_p', 1.0)
  if not _is_number(top_p) or not 0 < top_p <= 1:
    raise ApiError(400, f'"top_p" must be in (0, 1], got {top_p!r}.', 'top_p')
  top_k = get('top_k', 0)
  if not _is_int(top_k) or top_k < -1:
    raise ApiError(400, f'"top_k" must be an integer >= 0 (0 or -1 = off), got {top_k!r}.',
                   'top_k')
  stop = get('stop', [])
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
      or not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f'"stop" must be a non-empty string or a list of at most '
                   f'{MAX_STOP_STRINGS} of them.', 'stop')
  seed = body.get('seed')
  if seed is not None and not _is_int(seed):
    raise ApiError(400, f'"seed" must be an integer, got {seed!r}.', 'seed')
  stream = get('stream', False)
  echo = get('echo', False)
  ignore_eos = get('ignore_eos', False)  # an extension (as in vLLM), for benchmarks
  for name, value in (('stream', stream), ('echo', echo), ('ignore_eos', ignore_eos)):
    if not isinstance(value, bool):
      raise ApiError(400, f'"{name}" must be true or false.', name)
  options = get('stream_options', {})
  if not isinstance(options, dict) or not isinstance(options.get('include_usage', False), bool):
    raise ApiError(400, '"stream_options" must be an object like {"include_usage": true}.',
                   'stream_options')
  logprobs = body.get('logprobs')
  if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
    raise ApiError(400, f'"logprobs" must be an integer in [0, {MAX_LOGPROBS}], got '
                   f'{logprobs!r}.', 'logprobs')
  timeout = body.get('timeout')
  if timeout is not None and (not _is_number(timeout) or timeout <= 0):
    raise ApiError(400, f'"timeout" must be a number of seconds > 0, got {timeout!r}.',
                   'timeout')
  if max_timeout > 0:
    timeout = max_timeout if timeout is None else min(timeout, max_timeout)
  return CompletionParams(
      model=model, prompts=parsed, max_tokens=max_tokens, temperature=float(temperature),
      top_p=float(top_p), top_k=max(top_k, 0), stop=stop, seed=seed, stream=stream,
      include_usage=bool(options.get('include_usage', False)), logprobs=logprobs, echo=echo,
      ignore_eos=ignore_eos, timeout=float(timeout or 0.0))


# ----------------------------------------------------------------------------- text


class _Detokenizer:
  """Text of new tokens as they come: decodes a short window so that a token's leading space
  and multi-byte characters split over tokens come out right (held back until whole)."""

  def __init__(self, tokenizer, prompt_ids):
    self._tok = tokenizer
    self._ids = [int(t) for t in prompt_ids]
    self._read = len(self._ids)
    self._prefix = max(0, self._read - 6)

  def push(self, token: int, final: bool = False) -> str:
    if token is not None:
      self._ids.append(int(token))
    prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
    new_text = self._tok.decode(self._ids[self._prefix:])
    if len(new_text) > len(prefix_text) and (final or not new_text.endswith('\ufffd')):
      self._prefix, self._read = self._read, len(self._ids)
      return new_text[len(prefix_text):]
    return ''

  def flush(self) -> str:
    return self.push(None, final=True)


def _token_text(tokenizer, context, token) -> str:
  """The text one token adds after a few tokens of context (for logprobs' token strings)."""
  ctx = [int(t) for t in context[-4:]]
  return tokenizer.decode(ctx + [int(token)])[len(tokenizer.decode(ctx)):]


class _Choice:
  """One prompt's completion as it streams in: text (stop strings applied), logprobs, the
  finish reason."""

  def __init__(self, index, prompt: 'Prompt', params: CompletionParams, tokenizer, eos_id):
    self.index = index
    self.params = params
    self.tokenizer = tokenizer
    self.eos_id = eos_id
    self.prompt = prompt
    self.prompt_ids = prompt.fed   # BOS included when the server adds it (echo shows it)
    self.context = list(self.prompt_ids)
    self.request: Optional[Request] = None
    self.detok = _Detokenizer(tokenizer, self.prompt_ids)
    self.prefix = prompt.text if params.echo else ''
    self.raw = ''          # completion text decoded so far (may run past a stop string)
    self.sent = 0          # characters of raw already handed out
    self.token_ids = []
    self.ids_sent = 0      # of token_ids, in streamed chunks
    self.completion_tokens = 0
    self.finish_reason = None
    self.error = None
    self.error_kind = 'server_error'
    self.first_token_at = None
    self.last_token_at = None
    self.lp = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    self.echo_pending = params.echo  # the prompt text still to hand out

  @property
  def done(self):
    return self.finish_reason is not None or self.error is not None

  def _add_logprob(self, context, token, outputs, offset):
    """One token's logprobs entry; outputs None: the first prompt token, which nothing
    scores (null, as in the OpenAI format)."""
    tok = self.tokenizer
    self.lp['tokens'].append(_token_text(tok, context, token))
    self.lp['text_offset'].append(offset)
    if outputs is None:
      self.lp['token_logprobs'].append(None)
      self.lp['top_logprobs'].append(None)
      return
    self.lp['token_logprobs'].append(float(outputs['logprob']))
    top = {}
    for i, v in zip(outputs['top_id'][:self.params.logprobs], outputs['top_logprob']):
      top.setdefault(_token_text(tok, context, i), float(v))
    top.setdefault(self.lp['tokens'][-1], float(outputs['logprob']))
    self.lp['top_logprobs'].append(top)

  def on_event(self, kind, *args):
    """Folds one engine event in; returns the (text, logprobs) to hand out now."""
    if self.done:
      return '', None
    mark = len(self.lp['tokens'])
    text = ''
    if self.echo_pending:
      text, self.echo_pending = self.prefix, False
    if kind == 'prompt':
      # The engine scores every fed token after the first (BOS included when there is one).
      offset = 0
      for j, token in enumerate(self.prompt_ids):
        out = None if j == 0 else {k: v[j - 1] for k, v in args[0].items()}
        self._add_logprob(self.prompt_ids[:j], token, out, offset)
        offset += len(self.lp['tokens'][-1])
    elif kind == 'token':
      token, outputs = args
      self.completion_tokens += 1
      self.last_token_at = time.perf_counter()
      if self.first_token_at is None:
        self.first_token_at = self.last_token_at
      if token != self.eos_id:
        offset = len(self.prefix) + len(self.raw)
        if outputs is not None:
          self._add_logprob(self.context, token, outputs, offset)
        self.context.append(token)
        self.token_ids.append(token)
        self.raw += self.detok.push(token)
      text += self._release(final=False)
    elif kind == 'done':
      self.raw += self.detok.flush()
      text += self._release(final=True)
      if self.finish_reason is None:
        self.finish_reason = args[0]
    elif kind == 'error':
      self.error = args[0]
    lp = None
    if self.params.logprobs is not None:
      lp = {k: v[mark:] for k, v in self.lp.items()}
    return text, lp

  def _release(self, final):
    """The completion text that is safe to hand out: up to a stop string (then finish), and
    never a tail that may still grow into one."""
    stops = self.params.stop
    cut = min((i for i in (self.raw.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
      self.raw = self.raw[:cut]
      self.finish_reason = 'stop'
      if self.request is not None:
        self.request.cancel()
      end = cut
    elif final:
      end = len(self.raw)
    else:
      hold = 0
      for s in stops:
        for k in range(min(len(s) - 1, len(self.raw)), hold, -1):
          if self.raw.endswith(s[:k]):
            hold = k
            break
      end = len(self.raw) - hold
    end = max(end, self.sent)
    text = self.raw[self.sent:end]
    self.sent = end
    return text

  def text(self):
    return self.prefix + self.raw[:self.sent]

  def choice(self, text=None, logprobs=None, final=True):
    """The whole choice (text=None) or a streamed chunk of it. Both carry `token_ids`, not
    in OpenAI's schema: the exact new tokens (EOS excluded)."""
    out = {'text': self.text() if text is None else text, 'index': self.index,
           'logprobs': None, 'finish_reason': self.finish_reason if final else None}
    if self.params.logprobs is not None:
      out['logprobs'] = self.lp if logprobs is None else logprobs
    if text is None:
      out['token_ids'] = self.token_ids
    else:
      out['token_ids'] = self.token_ids[self.ids_sent:]
      self.ids_sent = len(self.token_ids)
    return out


# ----------------------------------------------------------------------------- the app


def _error_response(e: ApiError):
  return responses.JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def read_api_keys(api_key: Optional[str] = None, api_key_file: Optional[str] = None) -> tuple:
  """The accepted keys: --api_key and/or one per line of --api_key_file (# comments)."""
  keys = [api_key] if api_key else []
  if api_key_file:
    with open(api_key_file) as f:
      lines = [line.strip() for line in f]
    file_keys = [line for line in lines if line and not line.startswith('#')]
    if not file_keys:
      raise ValueError(f'--api_key_file={api_key_file} holds no key (one per line).')
    keys += file_keys
  return tuple(keys)


_ENDPOINTS = ('/v1/completions', '/v1/models', '/health', '/metrics', '/tokenize',
              '/detokenize', '/tokenizer_info')


class _Gate:
  """ASGI middleware: the API key on every path but /health (401 otherwise; every key is
  compared in constant time), and requests counted by endpoint and status."""

  def __init__(self, app, keys: tuple, metrics):
    self.app = app
    self.keys = tuple(k.encode() for k in keys)
    self.metrics = metrics

  def _authorized(self, scope) -> bool:
    given = b''
    for name, value in scope.get('headers', ()):
      if name == b'authorization':
        given = value
    scheme, _, token = given.partition(b' ')
    ok = False
    for key in self.keys:  # no early exit: the time does not depend on which key matched
      ok |= hmac.compare_digest(token.strip(), key)
    return ok and scheme.lower() == b'bearer'

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    status = [500]

    async def send_and_count(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
      await send(message)

    path = scope['path']
    try:
      if self.keys and path != '/health' and not self._authorized(scope):
        e = ApiError(401, 'this server needs an API key: send "Authorization: Bearer KEY".',
                     kind='authentication_error', headers={'WWW-Authenticate': 'Bearer'})
        await _error_response(e)(scope, receive, send_and_count)
      else:
        await self.app(scope, receive, send_and_count)
    finally:
      self.metrics.requests.labels(path if path in _ENDPOINTS else 'other',
                                   str(status[0])).inc()


class _Metrics:
  """The server's Prometheus metrics (a registry of its own: one per app)."""

  def __init__(self, engines: dict):
    import prometheus_client as prom  # pylint: disable=g-import-not-at-top
    self.prom = prom
    r = self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter('scone_http_requests', 'HTTP requests by endpoint and status.',
                                 ['endpoint', 'status'], registry=r)
    self.prompt_tokens = prom.Counter('scone_prompt_tokens', 'Prompt tokens admitted.',
                                      ['model'], registry=r)
    self.generation_tokens = prom.Counter('scone_generation_tokens', 'Tokens generated.',
                                          ['model'], registry=r)
    self.ttft = prom.Histogram(
        'scone_time_to_first_token_seconds', 'From a request\'s arrival to its first token.',
        ['model'], registry=r,
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
    self.tpot = prom.Histogram(
        'scone_time_per_output_token_seconds', 'Per request: (last token - first token) / '
        '(tokens - 1).', ['model'], registry=r,
        buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56))
    step_buckets = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, .01, .03, .1, .3, 1, 3)
    self.timings = {
        'table_lookup': prom.Histogram(
            'scone_table_lookup_seconds', 'Host table lookup per decode step (ram, mmap, '
            'tensorstore storages; device and host storages gather inside the step).',
            ['model'], registry=r, buckets=step_buckets),
        'decode_step': prom.Histogram(
            'scone_decode_step_seconds', 'One decode step of every slot (lookup included), '
            'its share of an on-device decode chunk.',
            ['model'], registry=r, buckets=step_buckets)}
    gauges = {
        'pending': prom.Gauge('scone_queue_length', 'Prompts waiting for a decode slot.',
                              ['model'], registry=r),
        'active': prom.Gauge('scone_active_slots', 'Decode slots in use.', ['model'],
                             registry=r),
        'slots': prom.Gauge('scone_slots', 'Decode slots (--max_batch).', ['model'],
                            registry=r)}
    rate = prom.Gauge('scone_tokens_per_second', 'Tokens generated per second since the '
                      'previous scrape (PromQL: rate(scone_generation_tokens_total)).',
                      ['model'], registry=r)
    for name, engine in engines.items():
      for key, gauge in gauges.items():
        gauge.labels(name).set_function(lambda e=engine, k=key: e.load()[k])
      rate.labels(name).set_function(self._rate(engine))
      engine.on_timing = (lambda kind, seconds, n=name:
                          self.timings[kind].labels(n).observe(seconds))

  @staticmethod
  def _rate(engine):
    last = [time.monotonic(), engine.stats['tokens']]

    def tokens_per_second():
      now, tokens = time.monotonic(), engine.stats['tokens']
      value = max(tokens - last[1], 0) / max(now - last[0], 1e-9)
      last[:] = [now, tokens]
      return value
    return tokens_per_second

  def finished(self, model: str, arrived: float, choices):
    for c in choices:
      self.generation_tokens.labels(model).inc(c.completion_tokens)
      if c.first_token_at is not None:
        self.ttft.labels(model).observe(c.first_token_at - arrived)
        if c.completion_tokens > 1:
          self.tpot.labels(model).observe((c.last_token_at - c.first_token_at)
                                          / (c.completion_tokens - 1))

  def text(self) -> bytes:
    return self.prom.generate_latest(self.registry)


async def _read_body(http: fastapi.Request, limit: int) -> bytes:
  """The body, read as it arrives (a slow sender holds only its own request); 413 as soon
  as it is over the limit."""
  too_big = ApiError(413, f'the request body is over {limit / 2**20:g} MB (--max_body_mb): '
                     'send fewer or shorter prompts per request.')
  declared = http.headers.get('content-length', '')
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  chunks, size = [], 0
  async for chunk in http.stream():
    size += len(chunk)
    if size > limit:
      raise too_big
    chunks.append(chunk)
  return b''.join(chunks)


def _json_object(raw: bytes):
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f'the request body is not valid JSON ({e}).') from e


def build_app(engines: dict, tokenizer, *, limits: Optional[Limits] = None,
              api_keys: Sequence[str] = ()):
  """The FastAPI app serving `engines` ({model name: Engine}); starts and drains them with
  the app's lifespan."""
  limits = (limits or Limits()).check()
  models = list(engines)
  created = int(time.time())
  state = {'draining': False}
  max_body = int(limits.max_body_mb * 2**20)
  engine_any = next(iter(engines.values()))
  max_len = engine_any.gen.max_len
  metrics = _Metrics(engines)
  # Parsing and tokenizing run here, never on the event loop or the decode thread; large
  # bodies in a pool of their own, so that a flood of them never delays a small request.
  small_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='parse-small')
  large_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='parse-large')

  async def in_pool(size: int, fn, *args):
    pool = small_pool if size <= _SMALL_BODY else large_pool
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    for engine in engines.values():
      engine.start()
    yield
    # The HTTP side has drained (uvicorn waits up to --drain_timeout for open requests,
    # then cancels them, which cancels their engine requests); finish what is queued.
    state['draining'] = True
    for model, engine in engines.items():
      await asyncio.to_thread(engine.stop, limits.drain_timeout or None)
      logging.info('drained %s: %s', model, engine.load())
    small_pool.shutdown(wait=False, cancel_futures=True)
    large_pool.shutdown(wait=False, cancel_futures=True)

  app = fastapi.FastAPI(title='scone_jax', lifespan=lifespan)
  app.add_middleware(_Gate, keys=tuple(api_keys), metrics=metrics)

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return _error_response(e)

  @app.exception_handler(Exception)
  async def _internal_error(_, e: Exception):
    logging.exception('request failed')
    return _error_response(ApiError(500, f'{type(e).__name__}: {e}', kind='server_error'))

  @app.get('/health')
  async def health():
    return responses.JSONResponse({'status': 'draining' if state['draining'] else 'ok',
                         'models': {m: e.load() for m, e in engines.items()}},
                        status_code=503 if state['draining'] else 200)

  @app.get('/metrics')
  async def prometheus_metrics():
    return responses.Response(metrics.text(), media_type=metrics.prom.CONTENT_TYPE_LATEST)

  @app.get('/v1/models')
  async def list_models():
    return {'object': 'list', 'data': [
        {'id': m, 'object': 'model', 'created': created, 'owned_by': 'scone_jax',
         'max_model_len': e.gen.max_len} for m, e in engines.items()]}

  # -- the tokenizer, as vLLM serves it (lm-evaluation-harness's remote tokenizer) ----------

  specials = {tokenizer.id_to_piece(i): i for i in (BOS_ID, engine_any.eos_id)}
  special_re = re.compile('|'.join(re.escape(s) for s in specials))

  def encode_with_specials(text):
    """SentencePiece ids, with the BOS and EOS strings ('<pad>', '</s>') read as those tokens
    wherever they appear, as HF tokenizers (and so vLLM's /tokenize) read special tokens:
    lm-eval finds the special ids this way, and a task can end a document with '</s>'."""
    ids, start = [], 0
    for m in special_re.finditer(text):
      ids += tokenizer.encode(text[start:m.start()]).tolist() + [specials[m.group()]]
      start = m.end()
    return ids + tokenizer.encode(text[start:]).tolist()

  def tokenize(body):
    if not isinstance(body, dict) or not isinstance(body.get('prompt'), str):
      raise ApiError(400, '"prompt" (a string) is required; chat messages are not supported.',
                     'prompt')
    add_special = body.get('add_special_tokens', True)
    if not isinstance(add_special, bool):
      raise ApiError(400, '"add_special_tokens" must be true or false.', 'add_special_tokens')
    model = body.get('model')
    if model is not None and model not in models:
      raise ApiError(404, f'model {model!r} does not exist; this server serves '
                     f'{", ".join(map(repr, models))}.', 'model', 'not_found_error')
    ids = ([BOS_ID] if add_special else []) + [int(t) for t in encode_with_specials(
        body['prompt'])]
    out = {'count': len(ids), 'max_model_len': max_len, 'tokens': ids, 'token_strs': None}
    if body.get('return_token_strs'):
      out['token_strs'] = [tokenizer.id_to_piece(t) for t in ids]
    return out

  def detokenize(body):
    tokens = body.get('tokens') if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
      raise ApiError(400, '"tokens" (a list of token ids) is required.', 'tokens')
    if tokens and not 0 <= min(tokens) <= max(tokens) < tokenizer.vocab_size:
      raise ApiError(400, f'token ids must be in [0, {tokenizer.vocab_size}).', 'tokens')
    return {'prompt': tokenizer.decode(tokens)}

  @app.post('/tokenize')
  async def tokenize_endpoint(http: fastapi.Request):
    raw = await _read_body(http, max_body)
    return await in_pool(len(raw), lambda: tokenize(_json_object(raw)))

  @app.post('/detokenize')
  async def detokenize_endpoint(http: fastapi.Request):
    raw = await _read_body(http, max_body)
    return await in_pool(len(raw), lambda: detokenize(_json_object(raw)))

  @app.get('/tokenizer_info')
  async def tokenizer_info():
    piece = tokenizer.id_to_piece
    return {'tokenizer_class': 'SentencePiece', 'vocab_size': tokenizer.vocab_size,
            'model_max_length': max_len, 'bos_token': piece(BOS_ID), 'bos_token_id': BOS_ID,
            'eos_token': piece(engine_any.eos_id), 'eos_token_id': engine_any.eos_id,
            'pad_token': piece(tokenizer.pad_id) if hasattr(tokenizer, 'pad_id') else None,
            'unk_token': piece(tokenizer.unk_id) if hasattr(tokenizer, 'unk_id') else None,
            'add_bos_token': True, 'add_eos_token': False, 'chat_template': None}

  # -- completions ----------------------------------------------------------------------

  @app.post('/v1/completions')
  async def completions(http: fastapi.Request):
    arrived = time.perf_counter()
    raw = await _read_body(http, max_body)
    params = await in_pool(len(raw), lambda: parse_completion(
        _json_object(raw), models, tokenizer, max_len,
        max_prompts=limits.max_prompts_per_request, max_timeout=limits.request_timeout,
        eos_id=engine_any.eos_id))
    deadline = arrived + params.timeout if params.timeout else None
    engine = engines[params.model]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    eos_id = None if params.ignore_eos else engine.eos_id  # else EOS is a token like any
    choices = [_Choice(i, p, params, tokenizer, eos_id) for i, p in enumerate(params.prompts)]
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), 'little')
    for c in choices:
      if params.max_tokens == 0 and not (params.echo and params.logprobs is not None):
        c.on_event('done', 'length')  # nothing to compute
        continue
      c.request = Request(
          np.asarray(c.prompt.ids, np.int64), params.max_tokens,
          on_event=lambda *ev, i=c.index: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)),
          temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
          seed=(seed + c.index) % (1 << 31), logprobs=params.logprobs, echo=params.echo,
          ignore_eos=params.ignore_eos, add_bos=c.prompt.add_bos)
    todo = [c.request for c in choices if c.request is not None]
    pending = engine.load()['pending']
    if limits.max_pending and todo and pending and pending + len(todo) > limits.max_pending:
      raise ApiError(503, f'{pending} prompts are waiting for a decode slot and this request '
                     f'adds {len(todo)}: over --max_pending={limits.max_pending}; retry later.',
                     kind='server_error', headers={'Retry-After': '1'})
    try:
      for r in todo:
        engine.submit(r)
    except RuntimeError as e:
      for r in todo:
        r.cancel()
      raise ApiError(503, str(e), kind='server_error') from e
    metrics.prompt_tokens.labels(params.model).inc(sum(len(c.prompt_ids) for c in choices))
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
            'created': int(time.time()), 'model': params.model}
    timed_out = ApiError(408, f'the request did not finish within its timeout of '
                         f'{params.timeout:g}s (the request\'s "timeout", at most the server\'s '
                         '--request_timeout).', 'timeout', 'timeout_error')

    def usage():
      prompt_tokens = sum(len(c.prompt_ids) for c in choices)
      completion_tokens = sum(c.completion_tokens for c in choices)
      return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
              'total_tokens': prompt_tokens + completion_tokens}

    finished = []

    def cancel_all():
      for r in todo:
        r.cancel()
      if not finished:
        finished.append(True)
        metrics.finished(params.model, arrived, choices)

    async def next_event():
      if deadline is None:
        return await queue.get()
      return await asyncio.wait_for(queue.get(), max(deadline - time.perf_counter(), 0))

    if params.stream:
      async def events():
        try:
          for c in choices:  # finished before they started (max_tokens=0)
            if c.done:
              yield _sse(dict(head, choices=[c.choice(final=True, text=c.text())]))
          while not all(c.done for c in choices):
            try:
              i, ev = await next_event()
            except asyncio.TimeoutError:
              yield _sse(timed_out.body())
              break
            c = choices[i]
            was_done = c.done
            text, lp = c.on_event(*ev)
            if c.error is not None and not was_done:
              yield _sse({'error': {'message': c.error, 'type': 'server_error', 'param': None,
                                    'code': None}})
              break
            if text or lp and lp['tokens'] or (c.done and not was_done):
              yield _sse(dict(head, choices=[c.choice(text, lp, final=c.done)]))
          if params.include_usage:
            yield _sse(dict(head, choices=[], usage=usage()))
          yield 'data: [DONE]\n\n'
        finally:
          cancel_all()  # a client that went away frees its slots at the next step

      return responses.StreamingResponse(events(), media_type='text/event-stream',
                               headers={'Cache-Control': 'no-cache'})

    async def collect():
      while not all(c.done for c in choices):
        i, ev = await queue.get()
        choices[i].on_event(*ev)

    task = asyncio.ensure_future(collect())
    try:
      while not task.done():
        wait = 0.5 if deadline is None else min(0.5, max(deadline - time.perf_counter(), 0))
        await asyncio.wait({task}, timeout=wait)
        if task.done():
          break
        if deadline is not None and time.perf_counter() >= deadline:
          task.cancel()
          raise timed_out
        if await http.is_disconnected():
          task.cancel()
          return responses.JSONResponse({}, status_code=499)
    finally:
      cancel_all()
    errors = [c.error for c in choices if c.error is not None]
    if errors:
      raise ApiError(500, errors[0], kind='server_error')
    return responses.JSONResponse(dict(head, choices=[c.choice() for c in choices], usage=usage()))

  return app


def _sse(obj) -> str:
  return f'data: {json.dumps(obj)}\n\n'


# ----------------------------------------------------------------------------- running


def serve(app, host: str = '127.0.0.1', port: int = 8000, *, log_level: str = 'info',
          drain_timeout: Optional[float] = DEFAULT_DRAIN_TIMEOUT, announce=sys.stdout):
  """Runs the app under uvicorn until SIGTERM/SIGINT, then drains: new connections are
  refused, in-flight requests finish for up to drain_timeout seconds (None or 0: no
  deadline), then are cancelled. port=0 picks a free port; the first line written to
  `announce` says where it listens."""
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  bound = sock.getsockname()[1]
  config = uvicorn.Config(app, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=drain_timeout or None)
  server = uvicorn.Server(config)
  print(f'serving on http://{host}:{bound}', file=announce, flush=True)
  server.run(sockets=[sock])


def served_name(export_dir: str) -> str:
  """The default model name: the export directory's base name (never the path)."""
  return os.path.basename(os.path.normpath(export_dir.rstrip('/'))) or 'scone'


def run(export_dir: str, *, host: str = '127.0.0.1', port: int = 8000,
        table_storage: str = 'host', table_dtype: Optional[str] = None, max_batch: int = 8,
        matcher_storage: Optional[str] = None,
        max_len: Optional[int] = None,
        tokens_per_dispatch: int = 8,
        served_model_name: Optional[str] = None, limits: Optional[Limits] = None,
        api_keys: Sequence[str] = (), mesh=None):
  """Loads an export and serves it as `served_model_name` (default served_name(export_dir));
  mesh: a serving mesh (`--mesh`, sharding.serving_mesh) the model is split over."""
  limits = (limits or Limits()).check()
  name = served_model_name or served_name(export_dir)
  t0 = time.time()
  gen = serving.load(export_dir, table_storage, max_len=max_len, mesh=mesh,
                     table_dtype=table_dtype, matcher_storage=matcher_storage)
  if tokens_per_dispatch < 1:
    raise ValueError(f'--tokens_per_dispatch={tokens_per_dispatch} must be at least 1.')
  engine = Engine(gen, max_batch, tokens_per_dispatch=tokens_per_dispatch)
  engine.warmup()
  logging.info('serving %s as %r: %d slots, %d positions, %s, %s, ready in %.1fs', export_dir,
               name, max_batch, gen.max_len, 'API key required' if api_keys else 'no API key',
               f'mesh {dict(mesh.shape)}' if mesh is not None else 'one device',
               time.time() - t0)
  serve(build_app({name: engine}, gen.tokenizer, limits=limits, api_keys=api_keys), host, port,
        drain_timeout=limits.drain_timeout)
