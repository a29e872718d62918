"""Continuous batching over an export: decode slots, per-row KV cache, decode in chunks.

The `Engine` holds `max_batch` decode slots, each a row of one KV cache whose rows keep
their own fill level (the model's per-row cache index). A request joins between chunks: the
requests that join together are prefilled in one call per prompt width bucket (padded to a
power of two rows) into fresh cache rows that then replace their slots' rows (each row
samples with its own parameters and seed, as it would alone); from then on a request
decodes with the other slots and leaves when it stops, runs out of tokens or is cancelled.
A chunk is `serving.make_decode_loop`: up to `tokens_per_dispatch` steps
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
  """The jitted prefill (N requests into N slots) and decode chunk (all slots, up to
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
    self._prefill = {}
    self._decode = {}

  def new_cache(self):
    return self.gen._empty_cache(self.batch, self.cache_len)  # pylint: disable=protected-access

  def prefill(self, width: int, rows: int, sampling: bool, logprobs: bool):
    """fn(params, cache, slots [N], rows [N, W, d] | None, ints [N, W, 4], sampling [N, 3],
    seeds [N]) → (outputs, cache): N prompts (left-padded, as Generator.generate lays them
    out) go into fresh cache rows that replace rows `slots` of the cache (a slot >= batch is
    a padding row: dropped); outputs hold each row's first new token [N] and, with logprobs,
    those of every position [N, W, ...] (position j scores input j + 1). Every row samples
    with its own parameters and seed, as it would alone."""
    key = (width, rows, sampling, logprobs)
    if key not in self._prefill:
      fresh_shapes = serving.cache_shapes(self.gen.model, rows, self.cache_len)

      def fn(params, cache, slots_N, rows_NxWxD, ints_NxWx4, sampling_Nx3, seeds_N):
        fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fresh_shapes)
        logits_NxWxV, new_cache = serving.apply_cached(self.gen.model, params, fresh,
                                                       rows_NxWxD, ints_NxWx4)
        cache = jax.tree.map(lambda big, new: self._put_rows(big, new, slots_N), cache,
                             new_cache)
        keys = _row_keys(seeds_N, jnp.zeros_like(seeds_N))
        tok_N = _sample_rows(logits_NxWxV[:, -1], sampling_Nx3[:, 0], sampling_Nx3[:, 1],
                             sampling_Nx3[:, 2].astype(jnp.int32), keys, sampling=sampling)
        out = {'token': tok_N}
        if logprobs:
          next_NxW = jnp.concatenate([ints_NxWx4[:, 1:, _TOK], tok_N[:, None]], axis=1)
          out.update(jax.vmap(lambda l, t: _logprob_outputs(l, t, self.top))(logits_NxWxV,
                                                                             next_NxW))
        return out, cache
      self._prefill[key] = self.gen.jit(fn, donate_argnums=(1,), cache_out=1)
    return self._prefill[key]

  def _put_rows(self, big, new, slots_N):
    """Cache rows `new` written over rows `slots_N` of `big`; out-of-range slots dropped."""
    at = (slice(None),) * self._batch_axis + (slots_N,)
    return big.at[at].set(new.astype(big.dtype), mode='drop')

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
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: Optional[dict] = None   # {token id: bias}, at most engine.MAX_LOGIT_BIAS (300)
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
               tokens_per_dispatch: int = DEFAULT_TOKENS_PER_DISPATCH,
               batch_prefill: bool = True):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch} must be at least 1.')
    self.gen = gen
    self.max_batch = int(max_batch)
    self.static = bool(static)
    self.batch_prefill = bool(batch_prefill)
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
    # shared_steps: steps that decoded two or more requests together; prefills: requests
    # prefilled, in prefill_calls compiled calls of prefill_rows rows in all (padding
    # included), prefill_tokens prompt tokens (with BOS).
    self.stats = {'steps': 0, 'shared_steps': 0, 'tokens': 0, 'requests': 0, 'prefills': 0,
                  'prefill_calls': 0, 'prefill_rows': 0, 'prefill_tokens': 0, 'errors': 0}
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

  def warmup(self, widths=(_PREFILL_BUCKET,)):
    """Compiles the common programs before the first request: greedy prefill of every row
    count at each prompt width of `widths` (before start() only) and a short greedy
    request's prefill and decode."""
    if self._thread is None:
      for width in widths:
        self._warm_prefill(_bucket(width, _PREFILL_BUCKET))
    done = threading.Event()
    self.submit(Request(np.zeros(1, np.int64), 2, lambda *e: e[0] in ('done', 'error') and
                        done.set()))
    if self._thread is None:
      while self._pending or any(s is not None for s in self._slots):
        self._iterate()
    else:
      done.wait()
    self.stats = dict.fromkeys(self.stats, 0)

  def _warm_prefill(self, width: int):
    """Runs the greedy prefill of every row count once at `width`, writing no slot."""
    for n in sorted({self._prefill_rows(k) for k in range(1, self.max_batch + 1)}):
      ints = np.zeros((n, width, 4), np.int32)
      ints[..., _FID], ints[..., _VALID] = -1, 1
      # pylint: disable-next=protected-access
      rows = self.gen._rows_for(ints[..., _FID]) if self.gen.use_table else None
      _, self._cache = self.fns.prefill(width, n, False, False)(
          self.gen.params, self._cache, np.full(n, self.max_batch, np.int32), rows, ints,
          np.zeros((n, 3), np.float32), np.zeros(n, np.int32))

  def _prefill_rows(self, requests: int) -> int:
    """Rows of the prefill call for this many requests: the next power of two (few
    compiled shapes), at most max_batch."""
    return min(1 << (requests - 1).bit_length(), self.max_batch)

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
    """Moves waiting requests into free slots. Those that join together are prefilled in
    one call per prompt width (one call each with batch_prefill=False)."""
    if self.static and any(self._slots):
      return
    while True:
      joining = self._take_pending()
      if not joining:
        return
      free = [b for b, s in enumerate(self._slots) if s is None]
      for group in self._by_width(joining):
        slots, free = free[:len(group)], free[len(group):]
        try:
          self._prefill(slots, group)
        except Exception as e:  # pylint: disable=broad-except
          self._prefill_failed(group, e)

  def _take_pending(self) -> list:
    """Up to one request per free slot (one in all without batch_prefill), cancelled ones
    dropped."""
    with self._cv:
      room = sum(s is None for s in self._slots)
      room = room if self.batch_prefill else min(room, 1)
      taken = []
      while self._pending and len(taken) < room:
        request = self._pending.popleft()
        if not request.cancelled:
          taken.append(request)
    self.stats['requests'] += len(taken)
    return taken

  @staticmethod
  def _by_width(requests: list) -> list:
    """Groups of requests of one prefill width (prompt + BOS rounded up to the bucket)."""
    groups = {}
    for r in requests:
      length = np.asarray(r.prompt_ids).size + int(r.add_bos)
      groups.setdefault(_bucket(length, _PREFILL_BUCKET), []).append(r)
    return list(groups.values())

  def _prefill_failed(self, group: list, e: Exception):
    logging.exception('prefill failed')
    self.stats['errors'] += 1
    for request in group:
      request.on_event('error', f'{type(e).__name__}: {e}')
    self._cache = self.fns.new_cache()
    self._carry = self._empty_carry()
    for b, slot in enumerate(self._slots):  # their rows were in the donated cache
      if slot is not None:
        slot.request.on_event('error', 'the batch was reset after another request failed')
        self._slots[b] = None

  def _prefill(self, slots: list, requests: list):
    """Prefills requests of one width into `slots` in one call, padded to a power of two
    rows (few compiled shapes), then hands out each one's first token."""
    prompts = [np.asarray(r.prompt_ids, np.int64).reshape(-1) for r in requests]
    lens = [p.size + int(r.add_bos) for p, r in zip(prompts, requests)]
    width = _bucket(max(lens), _PREFILL_BUCKET)
    n = self._prefill_rows(len(requests))
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], n - len(x), 0)])  # dropped rows
    # pylint: disable=protected-access
    ints = pad(np.concatenate([self.gen._prefill_inputs([p], np.array([k]), width, r.add_bos)
                               for p, k, r in zip(prompts, lens, requests)]))
    rows = self.gen._rows_for(ints[..., _FID]) if self.gen.use_table else None
    # pylint: enable=protected-access
    sampling = pad(np.array([[r.temperature, r.top_p, r.top_k] for r in requests], np.float32))
    seeds = pad(np.array([r.seed for r in requests], np.int32))
    slot_ids = np.array(list(slots) + [self.max_batch] * (n - len(slots)), np.int32)
    want_lp = any(r.logprobs is not None for r in requests)
    fn = self.fns.prefill(width, n, any(r.temperature > 0 for r in requests), want_lp)
    out, self._cache = fn(self.gen.params, self._cache, slot_ids, rows, ints, sampling, seeds)
    out = jax.device_get(out)
    self.stats['prefills'] += len(requests)
    self.stats['prefill_calls'] += 1
    self.stats['prefill_rows'] += n
    self.stats['prefill_tokens'] += sum(lens)
    for i, (b, request) in enumerate(zip(slots, requests)):
      self._first_token(b, request, prompts[i], lens[i], {k: v[i] for k, v in out.items()})

  def _first_token(self, b: int, request: Request, prompt: np.ndarray, length: int,
                   out: dict):
    """A prefilled request's prompt logprobs (echo) and first token; slot b decodes the
    rest."""
    width = out['logprob'].shape[0] if 'logprob' in out else 0
    want_lp = request.logprobs is not None
    if want_lp and request.echo:
      prompt_part = slice(width - length, width - 1)  # the positions that score prompt tokens
      request.on_event('prompt', {k: v[prompt_part] for k, v in out.items() if k != 'token'})
    if request.max_tokens == 0:
      request.on_event('done', 'length')
      return
    tok = int(out['token'])
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
