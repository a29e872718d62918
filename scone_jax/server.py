"""An OpenAI-compatible HTTP server over an export: continuous batching, streaming, logprobs.

  python -m scone_jax.main --mode=serve --export_dir=runs/scone/export --port=8000
  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "runs/scone/export", "prompt": "The nation", "max_tokens": 16}'

Endpoints: POST /v1/completions (the OpenAI completions schema: prompt as text, texts or
token ids; max_tokens, temperature, top_p, top_k, stop, seed, stream, logprobs, echo),
GET /v1/models, GET /health. The model id is the --export_dir as given.

Continuous batching: the `Engine` holds `max_batch` decode slots, each a row of one KV cache
whose rows keep their own fill level (the model's per-row cache index). A request joins at
the next step: its prompt is prefilled alone into a fresh one-row cache that then replaces
its slot's row; from then on it decodes with the other slots, one token per step, and
leaves when it stops, runs out of tokens or its client goes away. Per step the host matches
and gathers the f-gram rows of every slot in one `DecodeLookup.advance` call. The loop runs
in its own thread and hands tokens to per-request asyncio queues, so a slow client never
holds the device; text, stop strings and logprobs are assembled on the asyncio side.
"""
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence
import uuid

import fastapi
from fastapi import responses
import jax
import jax.numpy as jnp
import numpy as np
import uvicorn

from scone_jax import corpus
from scone_jax import model as model_lib
from scone_jax import serving

# pylint: disable=protected-access
# The Generator's own input layout and embedding, so that a request decoded here is the
# same computation as Generator.generate (greedy outputs are compared token for token).
_TOK, _POS, _FID, _VALID = serving._TOK, serving._POS, serving._FID, serving._VALID
_PREFILL_BUCKET = serving._PREFILL_BUCKET
_CACHE_BUCKET = serving._CACHE_BUCKET
_bucket = serving._bucket
# pylint: enable=protected-access

MAX_LOGPROBS = 20          # top logprobs a request may ask for per token
MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16    # OpenAI's default
_UNSUPPORTED = {'suffix': None, 'presence_penalty': 0, 'frequency_penalty': 0,
                'logit_bias': None}


# ----------------------------------------------------------------------------- sampling


def _sample_rows(logits_BxV, temperature_B, top_p_B, top_k_B, keys_B, *, sampling):
  """Per-row sampling: greedy where temperature == 0, else the top_k (0 = all) tokens within
  the top_p mass at that temperature; the same filters as serving._sample, row by row."""
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  if not sampling:
    return greedy_B
  vocab = logits_BxV.shape[-1]
  neg = jnp.finfo(jnp.float32).min
  scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, neg, sorted_BxV)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
  kept_BxV = before_BxV < top_p_B[:, None]
  threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  filtered_BxV = jnp.where((scaled_BxV < kth_Bx1) | (scaled_BxV < threshold_Bx1), neg,
                           scaled_BxV)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def _row_keys(seeds_B, counters_B):
  """One key per row and token: a request's samples depend on its seed alone, never on which
  other requests share the batch."""
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds_B,
                                                                            counters_B)


def _logprob_outputs(logits_NxV, chosen_N, top):
  """Log-probabilities (the model's, before temperature and filters) of the chosen tokens and
  the `top` most likely ones."""
  logp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp_NxV, chosen_N[:, None], axis=-1)[:, 0]
  top_lp, top_id = jax.lax.top_k(logp_NxV, top)
  return {'logprob': chosen, 'top_logprob': top_lp, 'top_id': top_id.astype(jnp.int32)}


# ----------------------------------------------------------------------------- device functions


class StepFunctions:
  """The jitted prefill (one request into one slot) and decode step (all slots) for a
  Generator, a number of slots and a per-slot cache length. Engines over the same Generator
  and sizes may share one, and with it the compiled programs."""

  def __init__(self, gen: serving.Generator, batch: int, cache_len: int):
    self.gen = gen
    self.batch = int(batch)
    self.cache_len = int(cache_len)
    self.top = min(MAX_LOGPROBS, gen.config.vocab_size)
    # Scanned layers stack their cache on a leading layer axis: the batch axis is next.
    self._batch_axis = 1 if gen.config.scan_layers else 0
    self._row_shapes = jax.eval_shape(lambda: gen.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, self.cache_len, gen.config.d_model)),
        decode=True, method=model_lib.SconeLM.backbone)['cache'])
    self._prefill = {}
    self._decode = {}

  def new_cache(self):
    return self.gen._empty_cache(self.batch, self.cache_len)  # pylint: disable=protected-access

  def _apply(self, params, cache, rows_BxLxD, ints_BxLx4):
    gen = self.gen
    x_BxLxD = gen._input_vectors(params, rows_BxLxD, ints_BxLx4)  # pylint: disable=protected-access
    logits_BxLxV, state = gen.model.apply(
        {'params': params, 'cache': cache}, x_BxLxD, positions_BxL=ints_BxLx4[..., _POS],
        valid_BxL=ints_BxLx4[..., _VALID] > 0, decode=True,
        method=model_lib.SconeLM.backbone, mutable=['cache'])
    return logits_BxLxV, state['cache']

  def prefill(self, width: int, sampling: bool, logprobs: bool):
    """fn(params, cache, slot, rows [1, W, d] | None, ints [1, W, 4], sampling [1, 3],
    seed [1]) → (outputs, cache): the prompt (left-padded, as Generator.generate lays it out)
    goes into a fresh one-row cache that replaces row `slot`; outputs hold the first new
    token and, with logprobs, those of every position (position j scores input j + 1)."""
    key = (width, sampling, logprobs)
    if key not in self._prefill:
      def fn(params, cache, slot, rows_1xWxD, ints_1xWx4, sampling_1x3, seed_1):
        fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._row_shapes)
        logits_1xWxV, row_cache = self._apply(params, fresh, rows_1xWxD, ints_1xWx4)
        cache = jax.tree.map(
            lambda big, row: jax.lax.dynamic_update_slice_in_dim(big, row, slot,
                                                                 self._batch_axis),
            cache, row_cache)
        keys = _row_keys(seed_1, jnp.zeros((1,), jnp.int32))
        tok_1 = _sample_rows(logits_1xWxV[:, -1], sampling_1x3[:, 0], sampling_1x3[:, 1],
                             sampling_1x3[:, 2].astype(jnp.int32), keys, sampling=sampling)
        out = {'token': tok_1}
        if logprobs:
          next_W = jnp.concatenate([ints_1xWx4[0, 1:, _TOK], tok_1])
          out.update(_logprob_outputs(logits_1xWxV[0], next_W, self.top))
        return out, cache
      self._prefill[key] = jax.jit(fn, donate_argnums=(1,))
    return self._prefill[key]

  def decode(self, sampling: bool, logprobs: bool):
    """fn(params, cache, rows [B, d] | None, ints [B, 4], sampling [B, 3], seeds [B],
    counters [B]) → (outputs, cache): one token for every slot (rows with valid=0 compute
    too; their outputs are ignored)."""
    key = (sampling, logprobs)
    if key not in self._decode:
      def fn(params, cache, rows_BxD, ints_Bx4, sampling_Bx3, seeds_B, counters_B):
        rows_Bx1xD = None if rows_BxD is None else rows_BxD[:, None]
        logits_Bx1xV, cache = self._apply(params, cache, rows_Bx1xD, ints_Bx4[:, None])
        logits_BxV = logits_Bx1xV[:, 0]
        tok_B = _sample_rows(logits_BxV, sampling_Bx3[:, 0], sampling_Bx3[:, 1],
                             sampling_Bx3[:, 2].astype(jnp.int32), _row_keys(seeds_B, counters_B),
                             sampling=sampling)
        out = {'token': tok_B}
        if logprobs:
          out.update(_logprob_outputs(logits_BxV, tok_B, self.top))
        return out, cache
      self._decode[key] = jax.jit(fn, donate_argnums=(1,))
    return self._decode[key]


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass
class Request:
  """One prompt to continue. `on_event` is called from the decode thread with
  ('prompt', logprob_outputs) once (echo with logprobs), ('token', id, logprob_outputs or
  None) per new token, then ('done', 'stop' | 'length') or ('error', message)."""
  prompt_ids: np.ndarray            # without BOS
  max_tokens: int
  on_event: Callable
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  logprobs: Optional[int] = None    # None: none; n: the chosen token's and the top n
  echo: bool = False
  ignore_eos: bool = False          # run to max_tokens (benchmarks)
  cancelled: bool = False           # set by the client side; the slot is freed next step

  def cancel(self):
    self.cancelled = True


@dataclasses.dataclass
class _Slot:
  request: Request
  last: int          # the latest token, fed in at the next step
  generated: int     # tokens emitted so far


class Engine:
  """Continuous batching over a Generator: `max_batch` slots of one KV cache, one thread.

  static=True admits new requests only when every slot is empty (static batching: the
  comparison point of experiments/bench_server.py).
  """

  def __init__(self, gen: serving.Generator, max_batch: int = 8, *, static: bool = False,
               functions: Optional[StepFunctions] = None):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch} must be at least 1.')
    self.gen = gen
    self.max_batch = int(max_batch)
    self.static = bool(static)
    # Prompts are left-padded to a multiple of the prefill bucket before their first token.
    cache_len = _bucket(gen.max_len + _PREFILL_BUCKET - 1, _CACHE_BUCKET)
    if functions is None:
      functions = StepFunctions(gen, self.max_batch, cache_len)
    elif (functions.gen is not gen or functions.batch != self.max_batch):
      raise ValueError('shared StepFunctions were made for another Generator or max_batch.')
    self.fns = functions
    self.eos_id = gen.tokenizer.eos_id if gen.tokenizer is not None else corpus.EOS_ID
    self._cache = self.fns.new_cache()
    self._lookup = serving.DecodeLookup(gen.table if gen.use_table else None, gen.fgram_set,
                                        self.max_batch, gen.config.d_model)
    self._slots: list = [None] * self.max_batch
    self._pending = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread = None
    # shared_steps: steps that decoded two or more requests together.
    self.stats = {'steps': 0, 'shared_steps': 0, 'tokens': 0, 'requests': 0, 'prefills': 0,
                  'errors': 0}

  # -- the client side (any thread) ---------------------------------------

  def check(self, prompt_ids: np.ndarray, max_tokens: int) -> Optional[str]:
    """Why this request cannot run here (None if it can)."""
    vocab = self.gen.config.vocab_size
    if prompt_ids.size and (prompt_ids.min() < 0 or prompt_ids.max() >= vocab):
      return f'the prompt has token ids outside [0, {vocab}).'
    needed = prompt_ids.size + 1 + max(max_tokens, 1) - 1  # BOS; the last token is not fed
    if needed > self.gen.max_len:
      return (f'the prompt has {prompt_ids.size} tokens (+1 BOS) and max_tokens={max_tokens}: '
              f'that needs {needed} positions but this model allows {self.gen.max_len}; '
              'shorten the prompt or lower max_tokens.')
    return None

  def submit(self, request: Request):
    problem = self.check(request.prompt_ids, request.max_tokens)
    if problem:
      raise ValueError(problem)
    with self._cv:
      if self._stopping:
        raise RuntimeError('the server is shutting down.')
      self._pending.append(request)
      self._cv.notify()

  def load(self) -> dict:
    return {'slots': self.max_batch, 'active': sum(s is not None for s in self._slots),
            'pending': len(self._pending), **self.stats}

  def start(self):
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name='decode-loop', daemon=True)
      self._thread.start()

  def stop(self, timeout: Optional[float] = None):
    """Finishes every admitted and queued request, then ends the loop."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def warmup(self):
    """Compiles the common programs (short prompt, greedy) before the first request."""
    done = threading.Event()
    self.submit(Request(np.zeros(1, np.int64), 2, lambda *e: e[0] in ('done', 'error') and
                        done.set()))
    if self._thread is None:
      while self._pending or any(s is not None for s in self._slots):
        self._iterate()
    else:
      done.wait()
    self.stats = dict.fromkeys(self.stats, 0)

  # -- the decode thread ----------------------------------------------------

  def _loop(self):
    while True:
      with self._cv:
        while not (self._pending or self._stopping or any(self._slots)):
          self._cv.wait()
        if self._stopping and not self._pending and not any(self._slots):
          return
      self._iterate()

  def _iterate(self):
    try:
      self._admit()
      self._free_cancelled()
      if any(self._slots):
        self._step()
    except Exception as e:  # pylint: disable=broad-except
      # One bad step fails the requests in it, never the server.
      logging.exception('decode step failed')
      self.stats['errors'] += 1
      for b, slot in enumerate(self._slots):
        if slot is not None:
          slot.request.on_event('error', f'{type(e).__name__}: {e}')
          self._slots[b] = None
      self._cache = self.fns.new_cache()

  def _admit(self):
    if self.static and any(self._slots):
      return
    while True:
      with self._cv:
        free = [b for b, s in enumerate(self._slots) if s is None]
        if not free or not self._pending:
          return
        request = self._pending.popleft()
      if request.cancelled:
        continue
      self.stats['requests'] += 1
      try:
        self._prefill(free[0], request)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception('prefill failed')
        self.stats['errors'] += 1
        request.on_event('error', f'{type(e).__name__}: {e}')
        self._cache = self.fns.new_cache()
        for b, slot in enumerate(self._slots):  # their rows were in the donated cache
          if slot is not None:
            slot.request.on_event('error', 'the batch was reset after another request failed')
            self._slots[b] = None

  def _prefill(self, b: int, request: Request):
    gen = self.gen
    prompt = np.asarray(request.prompt_ids, np.int64)
    length = prompt.size + 1
    width = _bucket(length, _PREFILL_BUCKET)
    # pylint: disable=protected-access
    ints = gen._prefill_inputs([prompt], np.array([length]), width, True)
    rows = gen._rows_for(ints[..., _FID]) if gen.use_table else None
    # pylint: enable=protected-access
    sampling = request.temperature > 0
    want_lp = request.logprobs is not None
    fn = self.fns.prefill(width, sampling, want_lp)
    params = np.array([[request.temperature, request.top_p, request.top_k]], np.float32)
    out, self._cache = fn(gen.params, self._cache, np.int32(b), rows, ints, params,
                          np.array([request.seed], np.int32))
    out = jax.device_get(out)
    self.stats['prefills'] += 1
    if want_lp and request.echo:
      prompt_part = slice(width - length, width - 1)  # the positions that score prompt tokens
      request.on_event('prompt', {k: v[prompt_part] for k, v in out.items() if k != 'token'})
    if request.max_tokens == 0:
      request.on_event('done', 'length')
      return
    tok = int(out['token'][0])
    slot = _Slot(request, tok, 0)
    lp = {k: v[-1] for k, v in out.items() if k != 'token'} if want_lp else None
    if self._emit(slot, tok, lp):
      self._lookup.reset_row(b, prompt, length)
      self._slots[b] = slot

  def _emit(self, slot: _Slot, tok: int, lp) -> bool:
    """Hands one token to its request; False when the request is finished."""
    request = slot.request
    slot.generated += 1
    slot.last = tok
    self.stats['tokens'] += 1
    request.on_event('token', tok, lp)
    if tok == self.eos_id and not request.ignore_eos:
      request.on_event('done', 'stop')
      return False
    if slot.generated >= request.max_tokens:
      request.on_event('done', 'length')
      return False
    return not request.cancelled

  def _free_cancelled(self):
    for b, slot in enumerate(self._slots):
      if slot is not None and slot.request.cancelled:
        self._slots[b] = None

  def _step(self):
    gen = self.gen
    batch = self.max_batch
    active = np.array([s is not None for s in self._slots])
    tokens = np.array([s.last if s else 0 for s in self._slots], np.int64)
    rows, ints = self._lookup.advance(tokens)  # match + gather for every slot: one call
    ints[~active, _VALID] = 0
    params = np.zeros((batch, 3), np.float32)
    seeds = np.zeros(batch, np.int32)
    counters = np.zeros(batch, np.int32)
    for b, s in enumerate(self._slots):
      if s is not None:
        r = s.request
        params[b] = (r.temperature, r.top_p, r.top_k)
        seeds[b], counters[b] = r.seed, s.generated
    live = [s for s in self._slots if s is not None]
    sampling = any(s.request.temperature > 0 for s in live)
    want_lp = any(s.request.logprobs is not None for s in live)
    fn = self.fns.decode(sampling, want_lp)
    out, self._cache = fn(gen.params, self._cache, rows if gen.use_table else None, ints,
                          params, seeds, counters)
    out = jax.device_get(out)
    self.stats['steps'] += 1
    self.stats['shared_steps'] += int(active.sum() >= 2)
    for b, slot in enumerate(self._slots):
      if slot is None:
        continue
      lp = None
      if slot.request.logprobs is not None:
        lp = {k: v[b] for k, v in out.items() if k != 'token'}
      if not self._emit(slot, int(out['token'][b]), lp):
        self._slots[b] = None


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
