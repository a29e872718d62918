"""Continuous batching over an export: decode slots, per-row KV cache, decode in chunks.

The `Engine` holds `max_batch` decode slots, each a row of one KV cache whose rows keep
their own fill level (the model's per-row cache index). A request joins between chunks:
its prompt is prefilled alone into a fresh one-row cache that then replaces its slot's row;
from then on it decodes with the other slots and leaves when it stops, runs out of tokens
or is cancelled. A chunk is `serving.make_decode_loop`: up to `tokens_per_dispatch` steps
on the device, each matching the f-gram ending at every slot's newest token, gathering its
table row, running the model and sampling per row, with no Python between tokens; then
each token of the chunk is handed out as its own event. The loop runs in its own thread
and hands events ('token', 'done', 'error') to each request's callback, so the caller (the
HTTP server in `server.py`, a benchmark) never holds the device.

  engine = engine_lib.Engine(serving.load('runs/scone/export'), max_batch=8)
  engine.start()
  engine.submit(engine_lib.Request(prompt_ids, max_tokens=16, on_event=callback))
"""
import collections
import logging
import dataclasses
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import corpus
from scone_jax import device_match
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
# Decode steps per dispatch: requests join and leave between chunks, so this bounds the
# extra wait of a joining request (and how late a cancelled one is noticed).
DEFAULT_TOKENS_PER_DISPATCH = 8

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
  """The jitted prefill (one request into one slot) and decode chunk (all slots, up to
  `tokens_per_dispatch` steps on the device) for a Generator, a number of slots and a
  per-slot cache length. Engines over the same Generator and sizes may share one, and with
  it the compiled programs."""

  def __init__(self, gen: serving.Generator, batch: int, cache_len: int, *,
               tokens_per_dispatch: int = DEFAULT_TOKENS_PER_DISPATCH):
    if tokens_per_dispatch < 1:
      raise ValueError(f'tokens_per_dispatch={tokens_per_dispatch} must be at least 1.')
    self.gen = gen
    self.batch = int(batch)
    self.cache_len = int(cache_len)
    self.tokens_per_dispatch = int(tokens_per_dispatch)
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

  def prefill(self, width: int, sampling: bool, logprobs: bool):
    """fn(params, cache, slot, rows [1, W, d] | None, ints [1, W, 4], sampling [1, 3],
    seed [1]) → (outputs, cache): the prompt (left-padded, as Generator.generate lays it out)
    goes into a fresh one-row cache that replaces row `slot`; outputs hold the first new
    token and, with logprobs, those of every position (position j scores input j + 1)."""
    key = (width, sampling, logprobs)
    if key not in self._prefill:
      def fn(params, cache, slot, rows_1xWxD, ints_1xWx4, sampling_1x3, seed_1):
        fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._row_shapes)
        logits_1xWxV, row_cache = serving.apply_cached(self.gen.model, params, fresh,
                                                       rows_1xWxD, ints_1xWx4)
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
      self._prefill[key] = self.gen.jit(fn, donate_argnums=(1,), cache_out=1)
    return self._prefill[key]

  def decode(self, sampling: bool, logprobs: bool):
    """fn(params, cache, table, matcher, carry, sampling [B, 3], is_stop [V]) → (carry,
    cache, outs): `serving.make_decode_loop` over every slot, sampling per row (a row's
    key: its seed and its token count), outs with per-token logprobs when asked."""
    key = (sampling, logprobs)
    if key not in self._decode:
      def sample(logits_BxV, c, sampling_Bx3):
        tok_B = _sample_rows(logits_BxV, sampling_Bx3[:, 0], sampling_Bx3[:, 1],
                             sampling_Bx3[:, 2].astype(jnp.int32),
                             _row_keys(c['seed'], c['count']), sampling=sampling)
        return tok_B, c
      outputs = ((lambda logits_BxV, tok_B: _logprob_outputs(logits_BxV, tok_B, self.top))
                 if logprobs else None)
      loop = serving.make_decode_loop(self.gen.model, self.tokens_per_dispatch, sample,
                                      self.gen.row_gather(), outputs)
      self._decode[key] = self.gen.jit(loop, donate_argnums=(1,), cache_out=1)
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
  add_bos: bool = True              # False: the prompt is read as given (server.py)

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
               functions: Optional[StepFunctions] = None,
               tokens_per_dispatch: int = DEFAULT_TOKENS_PER_DISPATCH):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch} must be at least 1.')
    self.gen = gen
    self.max_batch = int(max_batch)
    self.static = bool(static)
    # Prompts are left-padded to a multiple of the prefill bucket before their first token.
    cache_len = _bucket(gen.max_len + _PREFILL_BUCKET - 1, _CACHE_BUCKET)
    if functions is None:
      functions = StepFunctions(gen, self.max_batch, cache_len,
                                tokens_per_dispatch=tokens_per_dispatch)
    elif (functions.gen is not gen or functions.batch != self.max_batch):
      raise ValueError('shared StepFunctions were made for another Generator or max_batch.')
    self.fns = functions
    self.eos_id = gen.tokenizer.eos_id if gen.tokenizer is not None else corpus.EOS_ID
    self._is_stop = np.zeros(gen.config.vocab_size, bool)
    self._is_stop[self.eos_id] = True
    self._cache = self.fns.new_cache()
    self._carry = self._empty_carry()
    self._sampling = np.zeros((self.max_batch, 3), np.float32)
    self._slots: list = [None] * self.max_batch
    self._pending = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread = None
    # shared_steps: steps that decoded two or more requests together.
    self.stats = {'steps': 0, 'shared_steps': 0, 'tokens': 0, 'requests': 0, 'prefills': 0,
                  'errors': 0}
    # on_timing(kind, seconds) per decode chunk, kind 'table_lookup' | 'decode_step' (server
    # metrics); seconds are per token step of the chunk.
    self.on_timing: Optional[Callable[[str, float], None]] = None

  # -- the client side (any thread) ---------------------------------------

  def check(self, prompt_ids: np.ndarray, max_tokens: int,
            add_bos: bool = True) -> Optional[str]:
    """Why this request cannot run here (None if it can)."""
    vocab = self.gen.config.vocab_size
    if prompt_ids.size and (prompt_ids.min() < 0 or prompt_ids.max() >= vocab):
      return f'the prompt has token ids outside [0, {vocab}).'
    if prompt_ids.size + int(add_bos) == 0:
      return 'the prompt is empty and has no BOS: there is nothing to condition on.'
    needed = prompt_ids.size + int(add_bos) + max(max_tokens, 1) - 1  # the last is not fed
    if needed > self.gen.max_len:
      return (f'the prompt has {prompt_ids.size} tokens{" (+1 BOS)" * add_bos} and '
              f'max_tokens={max_tokens}: '
              f'that needs {needed} positions but this model allows {self.gen.max_len}; '
              'shorten the prompt or lower max_tokens.')
    return None

  def submit(self, request: Request):
    problem = self.check(request.prompt_ids, request.max_tokens, request.add_bos)
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
      self._carry = self._empty_carry()

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
        self._carry = self._empty_carry()
        for b, slot in enumerate(self._slots):  # their rows were in the donated cache
          if slot is not None:
            slot.request.on_event('error', 'the batch was reset after another request failed')
            self._slots[b] = None

  def _prefill(self, b: int, request: Request):
    gen = self.gen
    prompt = np.asarray(request.prompt_ids, np.int64)
    length = prompt.size + int(request.add_bos)
    width = _bucket(length, _PREFILL_BUCKET)
    # pylint: disable=protected-access
    ints = gen._prefill_inputs([prompt], np.array([length]), width, request.add_bos)
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
      self._start_row(b, request, prompt, length, tok)
      self._slots[b] = slot

  def _empty_carry(self) -> dict:
    """The decode loop's per-slot state (serving.make_decode_loop), every slot empty."""
    gen, batch = self.gen, self.max_batch
    k = gen.fgram_set.max_len if (gen.use_table and gen.fgram_set is not None) else 2
    zeros = lambda *shape: np.zeros((batch,) + shape, np.int32)
    return {'tok': zeros(), 'ctx': zeros(k), 'doc_len': zeros(), 'pos': zeros(),
            'done': np.ones(batch, bool), 'left': zeros(), 'count': zeros(),
            'honor_stop': np.ones(batch, bool), 'seed': zeros()}

  def _start_row(self, b: int, request: Request, prompt: np.ndarray, length: int, tok: int):
    """Slot b decodes `request` from its first token on (the prompt is in its cache row)."""
    c = self._carry
    ctx, doc_len = device_match.window([prompt], c['ctx'].shape[1])
    c['ctx'][b], c['doc_len'][b] = ctx[0], doc_len[0]
    c['tok'][b], c['pos'][b], c['done'][b] = tok, length, False
    c['left'][b], c['count'][b] = request.max_tokens - 1, 1
    c['honor_stop'][b], c['seed'][b] = not request.ignore_eos, request.seed
    self._sampling[b] = (request.temperature, request.top_p, request.top_k)

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
    """One decode chunk for every slot, then each slot's tokens handed out in order."""
    gen = self.gen
    active = np.array([s is not None for s in self._slots])
    self._carry['done'] |= ~active
    live = [s for s in self._slots if s is not None]
    fn = self.fns.decode(any(s.request.temperature > 0 for s in live),
                         any(s.request.logprobs is not None for s in live))
    table = gen.table if gen.use_table else None
    t0, lookup0 = time.perf_counter(), table.host_lookup_seconds if table else 0.0
    # pylint: disable=protected-access
    carry, self._cache, outs = fn(gen.params, self._cache, gen._table_operand(),
                                  gen._matcher(), self._carry, self._sampling, self._is_stop)
    # pylint: enable=protected-access
    carry, outs = jax.device_get((carry, outs))
    self._report_timing(int(outs['steps']), time.perf_counter() - t0,
                        (table.host_lookup_seconds - lookup0) if table else 0.0)
    self._carry = {k: np.array(v) for k, v in carry.items()}  # writable host copies
    steps = int(outs.pop('steps'))
    self.stats['steps'] += steps
    self.stats['shared_steps'] += steps if active.sum() >= 2 else 0
    for b, slot in enumerate(self._slots):
      if slot is not None:
        self._hand_out(b, slot, outs, steps)

  def _report_timing(self, steps: int, seconds: float, lookup_seconds: float):
    """on_timing per token step of a chunk: the step's share of the chunk's time, and of
    the host lookups it made (ram/mmap/tensorstore; device and host storages gather inside
    the compiled step, so their lookup time is part of the decode step and not reported)."""
    if self.on_timing is None or steps <= 0:
      return
    for _ in range(steps):
      self.on_timing('decode_step', seconds / steps)
      if lookup_seconds > 0:
        self.on_timing('table_lookup', lookup_seconds / steps)

  def _hand_out(self, b: int, slot: _Slot, outs: dict, steps: int):
    """Slot b's tokens of the chunk, as events; frees the slot when its request ends."""
    for j in range(steps):
      tok = int(outs['tokens'][b, j])
      if tok < 0:
        break
      lp = None
      if slot.request.logprobs is not None:
        lp = {k: v[b, j] for k, v in outs.items() if k != 'tokens'}
      if not self._emit(slot, tok, lp):
        self._slots[b] = None
        self._carry['done'][b] = True
        return
