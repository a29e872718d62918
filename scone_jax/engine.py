"""Continuous batching over an export: decode slots of one DecodeState, decode in chunks.

The `Engine` is a thin driver of the decode core (`decode`) through a `serving.Generator`'s
jitted pieces. It holds `max_batch` slots, the rows of one `decode.DecodeState` (KV cache,
match windows, options, counters) that stays on the device. Requests that join together are
prefilled in one call per prompt width bucket (padded to a power of two rows) and inserted
into free slots in the same compiled call (`Generator.prefill_insert_fn`); then every chunk
runs up to `tokens_per_dispatch` decode steps on the device (`Generator.decode_fn`), each
matching the f-gram ending at every slot's newest token, gathering its table row, running
the model and sampling per row with the one sampler (token i of a request drawn with the
key (seed, i)), with no Python between tokens. Each token of a chunk is handed out as its
own event. The loop runs in its own thread and hands events to each request's callback, so
the caller (the HTTP server in `server.py`, a benchmark) never holds the device.

  engine = engine_lib.Engine(serving.load('runs/scone/export'), max_batch=8)
  engine.start()
  engine.submit(engine_lib.Request(prompt_ids, max_tokens=16, on_event=callback))
"""
import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np

from scone_jax import corpus
from scone_jax import decode
from scone_jax import serving

MAX_LOGPROBS = decode.MAX_LOGPROBS
MAX_LOGIT_BIAS = decode.MAX_LOGIT_BIAS
DEFAULT_TOKENS_PER_DISPATCH = decode.DEFAULT_TOKENS_PER_DISPATCH


@dataclasses.dataclass
class Request:
  """One prompt to continue. `on_event` is called from the decode thread with ('admitted',)
  once when its prefill starts, ('prompt', logprob_outputs) once (echo with logprobs),
  ('token', id, logprob_outputs or None) per new token, then ('done', 'stop' | 'length') or
  ('error', message)."""
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

  @property
  def adjusts(self) -> bool:
    return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclasses.dataclass
class _Slot:
  request: Request
  last: int          # the latest token, fed in at the next step
  generated: int     # tokens emitted so far


def flags_for(requests, top: int) -> decode.Flags:
  """The compiled variant a group of requests needs (sampling, penalties/bias, logprobs)."""
  return decode.Flags(sample=any(r.temperature > 0 for r in requests),
                      adjust=any(r.adjusts for r in requests),
                      logprobs=top if any(r.logprobs is not None for r in requests) else 0)


class StepFunctions:
  """The jitted prefill-and-insert and decode chunk of a Generator for a number of slots and
  a per-slot cache length. Engines over the same Generator and sizes may share one, and with
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
    # (width, rows, logprobs) of every prefill program run: the compiled shapes.
    self.prefill_shapes = set()

  def new_state(self) -> decode.DecodeState:
    return self.gen.new_state(self.batch, self.cache_len)

  def prefill(self, width: int, rows: int, flags: decode.Flags):
    """The jitted prefill-and-insert (Generator.prefill_insert_fn) for prompts of one
    width bucket and a row count (recorded in prefill_shapes)."""
    self.prefill_shapes.add((int(width), int(rows), int(flags.logprobs)))
    return self.gen.prefill_insert_fn(self.cache_len, flags)

  def decode(self, flags: decode.Flags):
    return self.gen.decode_fn(self.tokens_per_dispatch, flags)


class Engine:
  """Continuous batching over a Generator: `max_batch` slots of one DecodeState, one thread.

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
    cache_len = decode.bucket(gen.max_len + decode.PREFILL_BUCKET - 1, decode.CACHE_BUCKET)
    if functions is None:
      functions = StepFunctions(gen, self.max_batch, cache_len,
                                tokens_per_dispatch=tokens_per_dispatch)
    elif (functions.gen is not gen or functions.batch != self.max_batch):
      raise ValueError('shared StepFunctions were made for another Generator or max_batch.')
    self.fns = functions
    self.eos_id = gen.tokenizer.eos_id if gen.tokenizer is not None else corpus.EOS_ID
    self._is_stop = gen.stop_mask((self.eos_id,))
    self._state = self.fns.new_state()
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
    """Why this request cannot run here (None if it can): the one prompt check
    (decode.check_prompt), as Generator.generate applies it."""
    return self.gen.check(np.asarray(prompt_ids), max_tokens, add_bos)

  def submit(self, request: Request):
    problem = self.check(request.prompt_ids, request.max_tokens, request.add_bos)
    if problem:
      raise ValueError(problem)
    with self._cv:
      if self._stopping:
        raise RuntimeError('the server is shutting down.')
      self._pending.append(request)
      self._cv.notify()

  @property
  def state(self) -> decode.DecodeState:
    """The slots' DecodeState as of the latest chunk (read it from the decode thread only)."""
    return self._state

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

  def prefill_widths(self) -> list:
    """Every prompt width bucket a request can have here (up to max_len)."""
    return list(range(decode.PREFILL_BUCKET, self.gen.max_len + decode.PREFILL_BUCKET,
                      decode.PREFILL_BUCKET))

  def warmup(self, widths=(decode.PREFILL_BUCKET,)):
    """Compiles the programs the server runs, before start(): for each prompt width of
    `widths` and every row count, the prefill with and without logprobs (its one program
    serves greedy, sampled and penalised requests); and the decode chunk greedy and
    sampled, with and without logprobs, penalties/bias on and off. No slot is written.
    widths=self.prefill_widths() leaves no request to compile, at one compile per width,
    row count and logprobs setting (the default compiles the shortest prompts' only)."""
    if self._thread is not None:
      raise RuntimeError('warmup() runs before start().')
    widths = sorted({decode.bucket(w, decode.PREFILL_BUCKET) for w in widths})
    every = [decode.Flags(s, a, lp) for s in (False, True) for a in (False, True)
             for lp in (0, self.fns.top)]
    active = np.zeros(self.max_batch, bool)
    # A chunk's output state carries the sharding that every later call sees, which the
    # fresh state lacks: one chunk first, so that every program below compiles for the
    # state requests will meet (else the first request pays a compile of its own).
    for flags in every[:1] + every:
      _, self._state = self.fns.decode(flags)(self.gen.params, self.gen.table_operand,
                                              self.gen.matcher, self._state, self._is_stop,
                                              active)
    for flags in every:
      # A prefill program depends on logprobs alone (decode.prefill): compile each once.
      for width in widths if not (flags.sample or flags.adjust) else ():
        for n in sorted({self._prefill_rows(k) for k in range(1, self.max_batch + 1)}):
          batch = self.gen.prompt_batch([np.zeros(width - 1, np.int64)] * n, [True] * n,
                                        [2] * n, width)
          opts = decode.make_options(n, self.gen.config.vocab_size)
          _, self._state = self.fns.prefill(width, n, flags)(
              self.gen.params, self.gen.table_operand, self.gen.matcher, self._state, batch,
              opts, self._is_stop, np.full(n, self.max_batch, np.int32))
    jax.block_until_ready(self._state)

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
      self.iterate()

  def iterate(self):
    """Admits waiting requests and runs one decode chunk (the decode thread's one round;
    tests and benchmarks call it without the thread)."""
    try:
      self._admit()
      self._free_cancelled()
      if any(self._slots):
        self._step()
    except Exception as e:  # pylint: disable=broad-except
      # One bad step fails the requests in it, never the server.
      logging.exception('decode step failed')
      self._reset(f'{type(e).__name__}: {e}')

  _iterate = iterate   # the older name

  def _reset(self, message: str):
    """Fails every admitted request and starts from an empty state (its rows were in the
    donated state)."""
    self.stats['errors'] += 1
    for b, slot in enumerate(self._slots):
      if slot is not None:
        slot.request.on_event('error', message)
        self._slots[b] = None
    self._state = self.fns.new_state()

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
          logging.exception('prefill failed')
          for request in group:
            request.on_event('error', f'{type(e).__name__}: {e}')
          self._reset('the batch was reset after another request failed')

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
      groups.setdefault(decode.bucket(length, decode.PREFILL_BUCKET), []).append(r)
    return list(groups.values())

  def _prefill(self, slots: list, requests: list):
    """Prefills requests of one width into `slots` in one call, padded to a power of two
    rows (few compiled shapes; padding rows go to no slot), then hands out each one's first
    token."""
    for r in requests:
      r.on_event('admitted')
    gen, n = self.gen, self._prefill_rows(len(requests))
    padded = requests + [requests[0]] * (n - len(requests))
    prompts = [np.asarray(r.prompt_ids, np.int64).reshape(-1) for r in padded]
    lens = [p.size + int(r.add_bos) for p, r in zip(prompts, padded)]
    width = decode.bucket(max(lens), decode.PREFILL_BUCKET)
    batch = gen.prompt_batch(prompts, [r.add_bos for r in padded],
                             [r.max_tokens for r in padded], width)
    opts = decode.make_options(
        n, gen.config.vocab_size, seed=[r.seed for r in padded],
        temperature=[r.temperature for r in padded], top_p=[r.top_p for r in padded],
        top_k=[r.top_k for r in padded], presence=[r.presence_penalty for r in padded],
        frequency=[r.frequency_penalty for r in padded],
        logit_bias=[r.logit_bias for r in padded], honor_stop=[not r.ignore_eos for r in padded])
    slot_ids = np.array(list(slots) + [self.max_batch] * (n - len(slots)), np.int32)
    fn = self.fns.prefill(width, n, flags_for(requests, self.fns.top))
    out, self._state = fn(gen.params, gen.table_operand, gen.matcher, self._state, batch, opts,
                          self._is_stop, slot_ids)
    out = jax.device_get(out)
    self.stats['prefills'] += len(requests)
    self.stats['prefill_calls'] += 1
    self.stats['prefill_rows'] += n
    self.stats['prefill_tokens'] += sum(lens[:len(requests)])
    for i, (b, request) in enumerate(zip(slots, requests)):
      self._first_token(b, request, lens[i], {k: v[i] for k, v in out.items()})

  def _first_token(self, b: int, request: Request, length: int, out: dict):
    """A prefilled request's prompt logprobs (echo) and first token; slot b decodes the
    rest (the state's row b already holds it)."""
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
    """One decode chunk for every slot (free slots retire on the device first), then each
    slot's tokens handed out in order."""
    gen = self.gen
    active = np.array([s is not None for s in self._slots])
    live = [s.request for s in self._slots if s is not None]
    fn = self.fns.decode(flags_for(live, self.fns.top))
    table = gen.table if gen.use_table else None
    t0, lookup0 = time.perf_counter(), table.host_lookup_seconds if table else 0.0
    outs, self._state = fn(gen.params, gen.table_operand, gen.matcher, self._state,
                           self._is_stop, active)
    outs = jax.device_get(outs)
    steps = int(outs.pop('steps'))
    self._report_timing(steps, time.perf_counter() - t0,
                        (table.host_lookup_seconds - lookup0) if table else 0.0)
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
        return
