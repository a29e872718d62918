"""An OpenAI-compatible HTTP server over an export: continuous batching, streaming, logprobs.

  python -m scone_jax.main --mode=serve --export_dir=runs/scone/export --port=8000
  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "runs/scone/export", "prompt": "The nation", "max_tokens": 16}'

Endpoints: POST /v1/completions (the OpenAI completions schema: prompt as text, texts or
token ids; max_tokens, temperature, top_p, top_k, stop, seed, stream, logprobs, echo),
GET /v1/models, GET /health. The model id is the --export_dir as given.

Decoding is `engine.Engine` (continuous batching in its own thread); this module is the
HTTP side: it validates a request, hands each prompt to the engine, and assembles text,
stop strings and logprobs from the engine's events on per-request asyncio queues, so a
slow client never holds the device.
"""
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
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
MAX_LOGPROBS = engine_lib.MAX_LOGPROBS   # top logprobs a request may ask for per token
MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16    # OpenAI's default
_UNSUPPORTED = {'suffix': None, 'presence_penalty': 0, 'frequency_penalty': 0,
                'logit_bias': None}


# ----------------------------------------------------------------------------- requests


class ApiError(Exception):
  """A request the server refuses: HTTP status and an OpenAI-style error body."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': None}}


@dataclasses.dataclass
class CompletionParams:
  model: str
  prompts: list          # of (text, ids)
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


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_completion(body, models: Sequence[str], tokenizer, max_len: int) -> CompletionParams:
  """The request's parameters, or ApiError saying which one is wrong and why."""
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
  parsed = []
  for p in prompts:
    if isinstance(p, str):
      parsed.append((p, np.asarray(tokenizer.encode(p), np.int64)))
    else:
      ids = np.asarray(p, np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ApiError(400, f'prompt token ids must be in [0, {tokenizer.vocab_size}).',
                       'prompt')
      parsed.append((tokenizer.decode(ids), ids))

  max_tokens = get('max_tokens', DEFAULT_MAX_TOKENS)
  if not _is_int(max_tokens) or max_tokens < 0:
    raise ApiError(400, f'"max_tokens" must be an integer >= 0, got {max_tokens!r}.',
                   'max_tokens')
  if max_tokens > max_len:
    raise ApiError(400, f'max_tokens={max_tokens} is beyond this model\'s length: prompt '
                   f'(with BOS) + max_tokens - 1 must fit in {max_len} positions.', 'max_tokens')
  for i, (_, ids) in enumerate(parsed):
    needed = ids.size + max(max_tokens, 1)
    if needed > max_len:
      raise ApiError(400, f'prompt {i} is {ids.size} tokens long; with BOS and '
                     f'max_tokens={max_tokens} it needs {needed} positions but this model '
                     f'allows {max_len}; shorten the prompt or lower max_tokens.', 'prompt')

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
  return CompletionParams(
      model=model, prompts=parsed, max_tokens=max_tokens, temperature=float(temperature),
      top_p=float(top_p), top_k=max(top_k, 0), stop=stop, seed=seed, stream=stream,
      include_usage=bool(options.get('include_usage', False)), logprobs=logprobs, echo=echo,
      ignore_eos=ignore_eos)


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

  def __init__(self, index, prompt_text, prompt_ids, params: CompletionParams, tokenizer,
               eos_id):
    self.index = index
    self.params = params
    self.tokenizer = tokenizer
    self.eos_id = eos_id
    self.prompt_ids = [int(t) for t in prompt_ids]
    self.context = list(self.prompt_ids)
    self.request: Optional[Request] = None
    self.detok = _Detokenizer(tokenizer, prompt_ids)
    self.prefix = prompt_text if params.echo else ''
    self.raw = ''          # completion text decoded so far (may run past a stop string)
    self.sent = 0          # characters of raw already handed out
    self.token_ids = []
    self.ids_sent = 0      # of token_ids, in streamed chunks
    self.completion_tokens = 0
    self.finish_reason = None
    self.error = None
    self.lp = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    self.echo_pending = params.echo  # the prompt text still to hand out

  @property
  def done(self):
    return self.finish_reason is not None or self.error is not None

  def _add_logprob(self, context, token, outputs, offset):
    tok = self.tokenizer
    self.lp['tokens'].append(_token_text(tok, context, token))
    self.lp['token_logprobs'].append(float(outputs['logprob']))
    top = {}
    for i, v in zip(outputs['top_id'][:self.params.logprobs], outputs['top_logprob']):
      top.setdefault(_token_text(tok, context, i), float(v))
    top.setdefault(self.lp['tokens'][-1], float(outputs['logprob']))
    self.lp['top_logprobs'].append(top)
    self.lp['text_offset'].append(offset)

  def on_event(self, kind, *args):
    """Folds one engine event in; returns the (text, logprobs) to hand out now."""
    if self.done:
      return '', None
    mark = len(self.lp['tokens'])
    text = ''
    if self.echo_pending:
      text, self.echo_pending = self.prefix, False
    if kind == 'prompt':
      offset = 0
      for j, token in enumerate(self.prompt_ids):
        out = {k: v[j] for k, v in args[0].items()}
        self._add_logprob(self.prompt_ids[:j], token, out, offset)
        offset += len(self.lp['tokens'][-1])
    elif kind == 'token':
      token, outputs = args
      self.completion_tokens += 1
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
  return responses.JSONResponse(e.body(), status_code=e.status)


def build_app(engines: dict, tokenizer):
  """The FastAPI app serving `engines` ({model id: Engine}); starts and drains them with the
  app's lifespan."""
  models = list(engines)
  created = int(time.time())
  state = {'draining': False}

  @contextlib.asynccontextmanager
  async def lifespan(_):
    for engine in engines.values():
      engine.start()
    yield
    # The HTTP side has drained (uvicorn waits for open requests); finish what is queued.
    state['draining'] = True
    for model, engine in engines.items():
      await asyncio.to_thread(engine.stop)
      logging.info('drained %s: %s', model, engine.load())

  app = fastapi.FastAPI(title='scone_jax', lifespan=lifespan)

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

  @app.get('/v1/models')
  async def list_models():
    return {'object': 'list', 'data': [
        {'id': m, 'object': 'model', 'created': created, 'owned_by': 'scone_jax',
         'max_model_len': e.gen.max_len} for m, e in engines.items()]}

  @app.post('/v1/completions')
  async def completions(http: fastapi.Request):
    try:
      body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f'the request body is not valid JSON ({e}).') from e
    engine_any = next(iter(engines.values()))
    params = parse_completion(body, models, tokenizer, engine_any.gen.max_len)
    engine = engines[params.model]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    eos_id = None if params.ignore_eos else engine.eos_id  # else EOS is a token like any
    choices = [_Choice(i, text, ids, params, tokenizer, eos_id)
               for i, (text, ids) in enumerate(params.prompts)]
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), 'little')
    for c in choices:
      if params.max_tokens == 0 and not (params.echo and params.logprobs is not None):
        c.on_event('done', 'length')  # nothing to compute
        continue
      c.request = Request(
          np.asarray(c.prompt_ids, np.int64), params.max_tokens,
          on_event=lambda *ev, i=c.index: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)),
          temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
          seed=(seed + c.index) % (1 << 31), logprobs=params.logprobs, echo=params.echo,
          ignore_eos=params.ignore_eos)
    try:
      for c in choices:
        if c.request is not None:
          engine.submit(c.request)
    except RuntimeError as e:
      for c in choices:
        if c.request is not None:
          c.request.cancel()
      raise ApiError(503, str(e), kind='server_error') from e
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
            'created': int(time.time()), 'model': params.model}

    def usage():
      prompt_tokens = sum(len(c.prompt_ids) for c in choices)
      completion_tokens = sum(c.completion_tokens for c in choices)
      return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
              'total_tokens': prompt_tokens + completion_tokens}

    def cancel_all():
      for c in choices:
        if c.request is not None:
          c.request.cancel()

    if params.stream:
      async def events():
        try:
          for c in choices:  # finished before they started (max_tokens=0)
            if c.done:
              yield _sse(dict(head, choices=[c.choice(final=True, text=c.text())]))
          while not all(c.done for c in choices):
            i, ev = await queue.get()
            c = choices[i]
            was_done = c.done
            text, lp = c.on_event(*ev)
            if c.error is not None and not was_done:
              yield _sse({'error': {'message': c.error, 'type': 'server_error', 'param': None,
                                    'code': None}})
              cancel_all()
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
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await http.is_disconnected():
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
          announce=sys.stdout):
  """Runs the app under uvicorn until SIGTERM/SIGINT, then drains: in-flight requests finish,
  new connections are refused. port=0 picks a free port; the first line written to
  `announce` says where it listens."""
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  bound = sock.getsockname()[1]
  config = uvicorn.Config(app, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=None)
  server = uvicorn.Server(config)
  print(f'serving on http://{host}:{bound}', file=announce, flush=True)
  server.run(sockets=[sock])


def run(export_dir: str, *, host: str = '127.0.0.1', port: int = 8000,
        table_storage: str = 'ram', max_batch: int = 8, max_len: Optional[int] = None):
  """Loads an export and serves it (the model id is `export_dir` as given)."""
  t0 = time.time()
  gen = serving.load(export_dir, table_storage, max_len=max_len)
  engine = Engine(gen, max_batch)
  engine.warmup()
  logging.info('serving %s: %d slots, %d positions, ready in %.1fs', export_dir, max_batch,
               gen.max_len, time.time() - t0)
  serve(build_app({export_dir: engine}, gen.tokenizer), host, port)
