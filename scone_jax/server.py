"""An OpenAI-compatible HTTP server over an export: continuous batching, streaming, logprobs.

  python -m scone_jax.main --mode=serve --export_dir=runs/scone/export --port=8000
  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "export", "prompt": "The nation", "max_tokens": 16}'

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI's schemas, `protocol`),
POST /tokenize, POST /detokenize, GET /tokenizer_info (as vLLM serves them;
lm-evaluation-harness's remote tokenizer), GET /v1/models and /v1/models/{id}, GET /metrics
(Prometheus, `server_metrics`), GET /health; /openapi.json documents each. The model id is
--served_model_name (default: the export directory's base name; the path is never shown).

Nothing a client sends can hold the others: connections have header and body deadlines and
a cap (`connections`); the body is read asynchronously up to --max_body_mb (413 beyond);
decoding, validating and tokenizing it, and building a body-sized response (/tokenize), run
in worker threads (large bodies in a pool of their own, so a flood of them never queues
ahead of a small one); a prompt is tokenized only until it is known to exceed the model's
length. Decoding is `engine.Engine` in its own thread; `streaming` turns its events into
responses on per-request queues, so a slow client never holds the device.
"""
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import socket
import sys
import time
from typing import Optional, Sequence

import fastapi
from fastapi import responses
import numpy as np
from starlette import exceptions as starlette_exceptions
from starlette import requests as starlette_requests
import uvicorn

from scone_jax import chat_template as chat_lib
from scone_jax import connections
from scone_jax import engine as engine_lib
from scone_jax import protocol
from scone_jax import server_metrics
from scone_jax import serving
from scone_jax import streaming
from scone_jax import tokenizing

Engine = engine_lib.Engine
ApiError = protocol.ApiError
BOS_ID = serving.BOS_ID
DEFAULT_MAX_BODY_MB = 4.0
DEFAULT_MAX_PROMPTS = 256
DEFAULT_MAX_PENDING = 1024
DEFAULT_DRAIN_TIMEOUT = 30.0
# Bodies up to this size are handled in a pool of their own: a flood of large ones never
# queues ahead of them.
_SMALL_BODY = 64 << 10
# Large bodies in the pool or waiting for it, beyond which more get 503 (each holds its body).
_MAX_LARGE_JOBS = 16
# Items per piece when a body-sized JSON list is written: the GIL is let go between pieces.
_JSON_PIECE = 32768


@dataclasses.dataclass
class Limits(connections.ConnectionLimits):
  """What the server accepts per request and connection (the --max_*, --*_timeout flags)."""
  max_body_mb: float = DEFAULT_MAX_BODY_MB
  max_prompts_per_request: int = DEFAULT_MAX_PROMPTS
  max_pending: int = DEFAULT_MAX_PENDING   # prompts waiting for a slot; 0 = no bound
  request_timeout: float = 0.0             # seconds; the default and the most a request gets
  drain_timeout: float = DEFAULT_DRAIN_TIMEOUT

  def check(self):
    super().check()
    if not self.max_body_mb > 0:
      raise ValueError(f'--max_body_mb={self.max_body_mb} must be > 0.')
    if self.max_prompts_per_request < 1:
      raise ValueError(f'--max_prompts_per_request={self.max_prompts_per_request} must be >= 1.')
    if self.max_pending < 0 or self.request_timeout < 0 or self.drain_timeout < 0:
      raise ValueError('--max_pending, --request_timeout and --drain_timeout must be >= 0 '
                       '(0: no bound).')
    return self


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


def _error_response(e: ApiError):
  return responses.JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
      endpoint = path if path in server_metrics.ENDPOINTS else (
          '/v1/models/{id}' if path.startswith('/v1/models/') else 'other')
      self.metrics.requests.labels(endpoint, str(status[0])).inc()


async def _read_body(http: fastapi.Request, limit: int) -> bytes:
  """The JSON body, read as it arrives (a slow sender holds only its own request): 415 if
  it is not declared JSON, 413 as soon as it is over the limit."""
  protocol.check_content_type(http.headers.get('content-type'))
  too_big = ApiError(413, f'the request body is over {limit / 2**20:g} MB (--max_body_mb): '
                     'send fewer or shorter prompts per request.')
  declared = http.headers.get('content-length', '')
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  chunks, size = [], 0
  try:
    async for chunk in http.stream():
      size += len(chunk)
      if size > limit:
        raise too_big
      chunks.append(chunk)
  except starlette_requests.ClientDisconnect:
    raise ApiError(400, 'the client went away (or --body_timeout passed) before the body '
                   'arrived.') from None
  return b''.join(chunks)


def json_list(items, piece: int = _JSON_PIECE) -> bytes:
  """json.dumps(list(items)) (a list or an array) written piece by piece, letting other
  threads run between pieces."""
  as_list = (lambda x: x.tolist()) if isinstance(items, np.ndarray) else list
  parts = [json.dumps(as_list(items[i:i + piece]))[1:-1] for i in range(0, len(items), piece)]
  return ('[' + ','.join(p for p in parts if p) + ']').encode()


_ERRORS = {status: {'model': protocol.ErrorResponse, 'description': what} for status, what in (
    (400, 'A field is wrong (the message names it).'), (401, 'No or a wrong API key.'),
    (404, 'No such model or route.'), (408, 'The request\'s timeout passed.'),
    (413, 'The body is over --max_body_mb.'), (415, 'The body is not declared JSON.'),
    (503, 'Over --max_pending, or shutting down.'))}


def _body(model) -> dict:
  """openapi_extra documenting a route's JSON body (the routes read it themselves, off the
  event loop)."""
  return {'requestBody': {'required': True, 'content': {'application/json': {
      'schema': {'$ref': f'#/components/schemas/{model.__name__}'}}}}}


def _openapi(app, models: Sequence[str]):
  """The app's OpenAPI document with the request models in its components."""
  from fastapi import openapi as fastapi_openapi  # pylint: disable=g-import-not-at-top
  from pydantic import json_schema  # pylint: disable=g-import-not-at-top

  def openapi():
    if app.openapi_schema is None:
      doc = fastapi_openapi.utils.get_openapi(title=app.title, version=app.version,
                                              routes=app.routes)
      _, defs = json_schema.models_json_schema(
          [(m, 'validation') for m in protocol.REQUEST_MODELS],
          ref_template='#/components/schemas/{model}')
      schemas = doc.setdefault('components', {}).setdefault('schemas', {})
      for name, schema in defs.get('$defs', {}).items():
        schemas.setdefault(name, schema)
      for name in ('CompletionRequest', 'ChatCompletionRequest'):  # the models served
        schemas[name]['properties']['model'] = {'type': 'string', 'enum': list(models)}
      app.openapi_schema = doc
    return app.openapi_schema
  return openapi


class _Pools:
  """Worker threads for everything body-sized: small bodies and large ones in pools of
  their own; 503 when too many large ones are already waiting."""

  def __init__(self):
    self.small = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='body-small')
    self.large = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='body-large')
    self.large_jobs = 0

  async def run(self, size: int, fn, *args):
    if size <= _SMALL_BODY:
      return await asyncio.get_running_loop().run_in_executor(self.small, fn, *args)
    if self.large_jobs >= _MAX_LARGE_JOBS:
      raise ApiError(503, f'{self.large_jobs} large requests are being handled; retry later.',
                     kind='server_error', headers={'Retry-After': '1'})
    self.large_jobs += 1
    try:
      return await asyncio.get_running_loop().run_in_executor(self.large, fn, *args)
    finally:
      self.large_jobs -= 1

  def shutdown(self):
    self.small.shutdown(wait=False, cancel_futures=True)
    self.large.shutdown(wait=False, cancel_futures=True)


def build_app(engines: dict, tokenizer, *, limits: Optional[Limits] = None,
              api_keys: Sequence[str] = (), chat_template: Optional[str] = None):
  """The FastAPI app serving `engines` ({model name: Engine}); starts and drains them with
  the app's lifespan. chat_template: Jinja source (None: chat_template.DEFAULT)."""
  limits = (limits or Limits()).check()
  engine_any = next(iter(engines.values()))
  state = {'draining': False}
  metrics = server_metrics.Metrics(engines)
  pools = _Pools()
  text_workers = tokenizing.Tokenizing(tokenizer, engine_any.eos_id)
  piece = tokenizer.id_to_piece
  served = protocol.Served(
      models=list(engines), tokenizer=tokenizer, max_len=engine_any.gen.max_len,
      check=engine_any.check, eos_id=engine_any.eos_id,
      max_prompts=limits.max_prompts_per_request, max_timeout=limits.request_timeout,
      chat_template=chat_lib.ChatTemplate(chat_template, piece(BOS_ID),
                                          piece(engine_any.eos_id)),
      specials=protocol.Specials(tokenizer, engine_any.eos_id))

  @contextlib.asynccontextmanager
  async def lifespan(_):
    for engine in engines.values():
      engine.start()
    text_workers.start()
    yield
    # The HTTP side has drained (uvicorn waits up to --drain_timeout for open requests,
    # then cancels them, which cancels their engine requests); finish what is queued.
    state['draining'] = True
    for model, engine in engines.items():
      await asyncio.to_thread(engine.stop, limits.drain_timeout or None)
      logging.info('drained %s: %s', model, engine.load())
    pools.shutdown()
    text_workers.shutdown()

  app = fastapi.FastAPI(title='scone_jax', version='1', lifespan=lifespan)
  app.openapi = _openapi(app, list(engines))
  app.add_middleware(_Gate, keys=tuple(api_keys), metrics=metrics)
  _error_handlers(app)
  _info_routes(app, engines, served, state, metrics)
  _tokenizer_routes(app, served, pools, int(limits.max_body_mb * 2**20), text_workers)
  _completion_routes(app, engines, served, pools, metrics, limits)
  return app


def _error_handlers(app):
  """Every error an OpenAI error object: 404 and 405 included, never FastAPI's "detail"."""

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return _error_response(e)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(http, e):
    kind = 'not_found_error' if e.status_code == 404 else 'invalid_request_error'
    what = {404: f'no route {http.url.path!r}; GET /openapi.json lists them.',
            405: f'{http.method} is not allowed on {http.url.path!r}.'}.get(e.status_code,
                                                                            str(e.detail))
    return _error_response(ApiError(e.status_code, what, kind=kind, headers=e.headers))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _invalid(_, e):
    err = e.errors()[0]
    return _error_response(ApiError(400, f'{".".join(map(str, err["loc"]))}: {err["msg"]}.'))

  @app.exception_handler(Exception)
  async def _internal_error(_, e: Exception):
    logging.exception('request failed')
    return _error_response(ApiError(500, f'{type(e).__name__}: {e}', kind='server_error'))


def _info_routes(app, engines: dict, served: protocol.Served, state: dict, metrics):
  created = int(time.time())
  tokenizer = served.tokenizer

  def card(name):
    return {'id': name, 'object': 'model', 'created': created, 'owned_by': 'scone_jax',
            'max_model_len': engines[name].gen.max_len}

  @app.get('/health')
  async def health():
    return responses.JSONResponse({'status': 'draining' if state['draining'] else 'ok',
                                   'models': {m: e.load() for m, e in engines.items()}},
                                  status_code=503 if state['draining'] else 200)

  @app.get('/metrics', response_class=responses.PlainTextResponse)
  async def prometheus_metrics():
    return responses.Response(metrics.text(), media_type=metrics.prom.CONTENT_TYPE_LATEST)

  @app.get('/v1/models', response_model=protocol.ModelList, responses=_ERRORS)
  async def list_models():
    return {'object': 'list', 'data': [card(m) for m in engines]}

  @app.get('/v1/models/{model_id:path}', response_model=protocol.ModelCard, responses=_ERRORS)
  async def get_model(model_id: str):
    if model_id not in engines:
      raise protocol._not_found(model_id, list(engines))  # pylint: disable=protected-access
    return card(model_id)

  @app.get('/tokenizer_info')
  async def tokenizer_info():
    piece, eos = tokenizer.id_to_piece, served.eos_id
    return {'tokenizer_class': 'SentencePiece', 'vocab_size': tokenizer.vocab_size,
            'model_max_length': served.max_len, 'bos_token': piece(BOS_ID),
            'bos_token_id': BOS_ID, 'eos_token': piece(eos), 'eos_token_id': eos,
            'pad_token': piece(tokenizer.pad_id) if hasattr(tokenizer, 'pad_id') else None,
            'unk_token': piece(tokenizer.unk_id) if hasattr(tokenizer, 'unk_id') else None,
            'add_bos_token': True, 'add_eos_token': False,
            'chat_template': served.chat_template.source}


def _tokenizer_routes(app, served: protocol.Served, pools: _Pools, max_body: int,
                      text_workers: tokenizing.Tokenizing):
  """/tokenize and /detokenize as vLLM serves them (lm-evaluation-harness's remote
  tokenizer). Decoding, tokenizing and the response's JSON all run in the pools: a 4 MB
  prompt's million ids never reach the event loop as a list."""
  tokenizer = served.tokenizer

  def tokenize(raw: bytes) -> bytes:
    req = protocol.decode(raw, protocol.TokenizeRequest)
    if req.model is not None and req.model not in served.models:
      raise protocol._not_found(req.model, served.models)  # pylint: disable=protected-access
    # The BOS and EOS strings are read as those tokens (lm-eval finds the special ids this
    # way, and a task can end a document with '</s>').
    ids = text_workers.encode(req.prompt)
    if req.add_special_tokens is not False:
      ids = np.concatenate([np.asarray([BOS_ID], ids.dtype), ids])
    strs = b'null'
    if req.return_token_strs:
      strs = json_list([tokenizer.id_to_piece(t) for t in ids])
    return (b'{"count": %d, "max_model_len": %d, "tokens": %s, "token_strs": %s}'
            % (len(ids), served.max_len, json_list(ids), strs))

  def detokenize(raw: bytes) -> bytes:
    req = protocol.decode(raw, protocol.DetokenizeRequest)
    if req.tokens and max(req.tokens) >= tokenizer.vocab_size:
      raise ApiError(400, f'token ids must be in [0, {tokenizer.vocab_size}).', 'tokens')
    return json.dumps({'prompt': text_workers.decode(req.tokens)}).encode()

  def route(fn):
    async def handle(http: fastapi.Request):
      raw = await _read_body(http, max_body)
      return responses.Response(await pools.run(len(raw), fn, raw),
                                media_type='application/json')
    return handle

  for path, fn, model, out in (('/tokenize', tokenize, protocol.TokenizeRequest,
                                protocol.TokenizeResponse),
                               ('/detokenize', detokenize, protocol.DetokenizeRequest,
                                protocol.DetokenizeResponse)):
    app.post(path, openapi_extra=_body(model), response_model=out,
             responses=_ERRORS)(route(fn))


def _completion_routes(app, engines: dict, served: protocol.Served, pools: _Pools, metrics,
                       limits: Limits):
  max_body = int(limits.max_body_mb * 2**20)
  texts = streaming.TokenTexts(served.tokenizer)

  async def complete(http: fastapi.Request, model, parse):
    arrived = time.perf_counter()
    raw = await _read_body(http, max_body)
    params = await pools.run(len(raw), lambda: parse(protocol.decode(raw, model), served))
    run = streaming.Completion(params, engines[params.model], served.tokenizer,
                               arrived=arrived, on_finish=metrics.finished, texts=texts)
    run.submit(limits.max_pending)
    metrics.prompt_tokens.labels(params.model).inc(
        sum(len(p.fed) for p in params.prompts) * params.n)
    if params.stream:
      return responses.StreamingResponse(run.events(), media_type='text/event-stream',
                                         headers={'Cache-Control': 'no-cache'})
    return await _collect(http, run)

  @app.post('/v1/completions', openapi_extra=_body(protocol.CompletionRequest),
            response_model=protocol.CompletionResponse, responses=_ERRORS)
  async def completions(http: fastapi.Request):
    return await complete(http, protocol.CompletionRequest, protocol.parse_completion)

  @app.post('/v1/chat/completions', openapi_extra=_body(protocol.ChatCompletionRequest),
            response_model=protocol.ChatCompletionResponse, responses=_ERRORS)
  async def chat_completions(http: fastapi.Request):
    return await complete(http, protocol.ChatCompletionRequest, protocol.parse_chat)


async def _collect(http: fastapi.Request, run: streaming.Completion):
  """A whole (not streamed) response: waits for every choice, the request's deadline and
  the client (one that went away frees its slots)."""
  try:
    while not all(c.done for c in run.choices):
      try:
        await run.next_event(timeout=0.5)
      except asyncio.TimeoutError:
        if run.deadline is not None and time.perf_counter() >= run.deadline:
          raise run.timed_out() from None
        if await http.is_disconnected():
          return responses.JSONResponse({}, status_code=499)
  finally:
    run.cancel()
  return responses.JSONResponse(run.response())


# ----------------------------------------------------------------------------- running


def serve(app, host: str = '127.0.0.1', port: int = 8000, *, log_level: str = 'info',
          limits: Optional[Limits] = None, announce=sys.stdout):
  """Runs the app under uvicorn until SIGTERM/SIGINT, then drains: new connections are
  refused, in-flight requests finish for up to limits.drain_timeout seconds (0: no
  deadline), then are cancelled. port=0 picks a free port; the first line written to
  `announce` says where it listens."""
  limits = (limits or Limits()).check()
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  bound = sock.getsockname()[1]
  config = uvicorn.Config(app, log_level=log_level, access_log=False,
                          http=connections.guarded_protocol(limits),
                          timeout_keep_alive=limits.keep_alive_timeout,
                          timeout_graceful_shutdown=limits.drain_timeout or None)
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
        api_keys: Sequence[str] = (), mesh=None, chat_template: Optional[str] = None,
        warmup: str = 'all'):
  """Loads an export and serves it as `served_model_name` (default served_name(export_dir));
  mesh: a serving mesh (`--mesh`, sharding.serving_mesh) the model is split over;
  chat_template: a file (chat_template.read_chat_template); warmup: 'all' compiles every
  prompt width bucket before serving (no request waits for a compile), 'shortest' only the
  shortest one."""
  limits = (limits or Limits()).check()
  name = served_model_name or served_name(export_dir)
  template = chat_lib.read_chat_template(chat_template) if chat_template else None
  t0 = time.time()
  gen = serving.load(export_dir, table_storage, max_len=max_len, mesh=mesh,
                     table_dtype=table_dtype, matcher_storage=matcher_storage)
  if tokens_per_dispatch < 1:
    raise ValueError(f'--tokens_per_dispatch={tokens_per_dispatch} must be at least 1.')
  engine = Engine(gen, max_batch, tokens_per_dispatch=tokens_per_dispatch)
  app = build_app({name: engine}, gen.tokenizer, limits=limits, api_keys=api_keys,
                  chat_template=template)  # before warmup: a bad template fails fast
  if warmup not in ('all', 'shortest'):
    raise ValueError(f'--warmup={warmup!r}: use all or shortest.')
  if warmup == 'all':
    engine.warmup(engine.prefill_widths())
  else:
    engine.warmup()  # the shortest width
  logging.info('serving %s as %r: %d slots, %d positions, %s, %s, ready in %.1fs', export_dir,
               name, max_batch, gen.max_len, 'API key required' if api_keys else 'no API key',
               f'mesh {dict(mesh.shape)}' if mesh is not None else 'one device',
               time.time() - t0)
  serve(app, host, port, limits=limits)
