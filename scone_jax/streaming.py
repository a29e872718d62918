"""From engine events to OpenAI responses: text as it streams (multi-byte characters and
stop strings held back until safe), token strings and offsets for logprobs, and the
completion and chat response shapes, whole or as server-sent events.

A token's string is its bytes (a SentencePiece byte piece `<0xF0>` is one byte, not
U+FFFD); bytes that are not valid UTF-8 on their own are shown as OpenAI shows them,
"bytes:\\xf0\\x9f". `text_offset` is where a token starts in the returned text: the
characters completed by the tokens before it, so it never goes backwards.
"""
import asyncio
import codecs
import json
import os
import re
import time
import uuid
from typing import Callable, Optional

import numpy as np

from scone_jax import engine as engine_lib
from scone_jax import protocol

_BYTE_PIECE = re.compile(r'<0x([0-9A-Fa-f]{2})>')


class TokenTexts:
  """Each token's bytes (cached) and its string as logprobs show it."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self._bytes = {}
    # SentencePiece pieces carry their spaces as '▁'; its decode drops the space the first
    # piece of a text starts with, and so does text_at(at_start=True).
    self._pieces = getattr(tokenizer, 'kind', '') == 'sentencepiece'

  def bytes(self, token: int) -> bytes:
    token = int(token)
    got = self._bytes.get(token)
    if got is None:
      plain = self.tok.decode([token])
      piece = self.tok.id_to_piece(token) if self._pieces else ''
      m = _BYTE_PIECE.fullmatch(piece)
      if m:
        got = bytes([int(m.group(1), 16)])
      elif not plain and '\u2581' not in piece:  # control tokens (BOS, EOS, padding)
        got = b''
      elif self._pieces:
        got = piece.replace('\u2581', ' ').encode()
      else:
        got = plain.encode('utf-8', 'surrogatepass')
      self._bytes[token] = got
    return got

  def at(self, token: int, at_start: bool) -> bytes:
    """The token's bytes where it starts the text (at_start: a leading space dropped)."""
    b = self.bytes(token)
    return b[1:] if at_start and self._pieces and b.startswith(b' ') else b

  def text(self, token: int, at_start: bool = False) -> str:
    return as_text(self.at(token, at_start))


def as_text(b: bytes) -> str:
  try:
    return b.decode('utf-8')
  except UnicodeDecodeError:
    return 'bytes:' + ''.join(f'\\x{c:02x}' for c in b)


class Detokenizer:
  """Text of new tokens as they come: decodes a short window so that a token's leading space
  and multi-byte characters split over tokens come out right (held back until whole)."""

  def __init__(self, tokenizer, prompt_ids):
    self._tok = tokenizer
    self._ids = [int(t) for t in prompt_ids]
    self._read = len(self._ids)
    self._prefix = max(0, self._read - 6)

  def push(self, token: Optional[int], final: bool = False) -> str:
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


class Offsets:
  """Characters completed by the bytes so far: a token's text_offset, never decreasing (a
  character split over byte tokens counts once it is whole)."""

  def __init__(self):
    self._decoder = codecs.getincrementaldecoder('utf-8')('replace')
    self.chars = 0

  def add(self, b: bytes):
    self.chars += len(self._decoder.decode(b))


class Choice:
  """One completion as it streams in: text (stop strings applied), per-token logprob
  entries, the finish reason and its timings (for the metrics)."""

  def __init__(self, index: int, prompt: protocol.Prompt, params: protocol.CompletionParams,
               tokenizer, eos_id: Optional[int], texts: Optional[TokenTexts] = None):
    self.index = index
    self.params = params
    self.tokenizer = tokenizer
    self.texts = texts or TokenTexts(tokenizer)
    self.eos_id = eos_id
    self.prompt = prompt
    self.prompt_ids = prompt.fed   # BOS included when the server adds it (echo shows it)
    self.request: Optional[engine_lib.Request] = None
    self.detok = Detokenizer(tokenizer, self.prompt_ids)
    self.prefix = prompt.text if params.echo else ''
    self.raw = ''          # completion text decoded so far (may run past a stop string)
    self.sent = 0          # characters of raw already handed out
    self.token_ids = []
    self.ids_sent = 0      # of token_ids, in streamed chunks
    self.completion_tokens = 0
    self.finish_reason = None
    self.error = None
    # Timings (time.perf_counter of the decode thread's events): admitted (prefill starts;
    # None until the engine reports it), each token.
    self.admitted_at = None
    self.token_times = []
    # entries: (token string, bytes, logprob | None, [(string, bytes, logprob)] | None, offset)
    self.entries = []
    self.echo_pending = params.echo  # the prompt text still to hand out
    self.started = any(self.texts.bytes(t) for t in self.prompt_ids)  # any text before?

  @property
  def done(self):
    return self.finish_reason is not None or self.error is not None

  @property
  def first_token_at(self):
    return self.token_times[0] if self.token_times else None

  def _entry(self, token, outputs, offset, at_start):
    """One token's logprobs entry; outputs None: the first prompt token, which nothing
    scores (null, as in the OpenAI format)."""
    b = self.texts.at(token, at_start)
    if outputs is None:
      return (as_text(b), b, None, None, offset)
    top = []
    for i, v in zip(outputs['top_id'][:self.params.logprobs], outputs['top_logprob']):
      tb = self.texts.at(i, at_start)
      top.append((as_text(tb), tb, float(v)))
    return (as_text(b), b, float(outputs['logprob']), top, offset)

  def _prompt_entries(self, outputs):
    """The prompt's tokens (echo with logprobs): the engine scores every fed token after
    the first (BOS included when there is one)."""
    offsets, at_start = Offsets(), True
    for j, token in enumerate(self.prompt_ids):
      out = None if j == 0 else {k: v[j - 1] for k, v in outputs.items()}
      entry = self._entry(token, out, min(offsets.chars, len(self.prefix)), at_start)
      self.entries.append(entry)
      offsets.add(entry[1])
      at_start = at_start and not entry[1]

  def on_event(self, kind, *args, at: Optional[float] = None):
    """Folds one engine event in; returns (text, new logprob entries) to hand out now."""
    if self.done:
      return '', []
    mark = len(self.entries)
    text = ''
    if self.echo_pending:
      text, self.echo_pending = self.prefix, False
    if kind == 'admitted':
      self.admitted_at = at if at is not None else time.perf_counter()
    elif kind == 'prompt':
      self._prompt_entries(args[0])
    elif kind == 'token':
      token, outputs = int(args[0]), args[1]
      self.completion_tokens += 1
      self.token_times.append(at if at is not None else time.perf_counter())
      if token != self.eos_id:
        if outputs is not None:
          self.entries.append(self._entry(token, outputs, len(self.prefix) + len(self.raw),
                                          not self.started))
        self.started = self.started or bool(self.texts.bytes(token))
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
    return text, self.entries[mark:]

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

  def new_ids(self, whole: bool) -> list:
    if whole:
      return self.token_ids
    ids, self.ids_sent = self.token_ids[self.ids_sent:], len(self.token_ids)
    return ids


# ----------------------------------------------------------------------------- shapes


def completion_logprobs(entries) -> dict:
  return {'tokens': [e[0] for e in entries], 'token_logprobs': [e[2] for e in entries],
          'top_logprobs': [None if e[3] is None else _top_dict(e) for e in entries],
          'text_offset': [e[4] for e in entries]}


def _top_dict(entry) -> dict:
  top = {}
  for s, _, v in entry[3]:
    top.setdefault(s, v)
  top.setdefault(entry[0], entry[2])
  return top


def chat_logprobs(entries) -> dict:
  return {'content': [
      {'token': e[0], 'logprob': e[2], 'bytes': list(e[1]),
       'top_logprobs': [{'token': s, 'logprob': v, 'bytes': list(b)} for s, b, v in e[3]]}
      for e in entries if e[2] is not None]}


def completion_choice(c: Choice, text=None, entries=None, final=True) -> dict:
  """The whole choice (text=None) or a streamed chunk of it. Both carry `token_ids`, not
  in OpenAI's schema: the exact new tokens (EOS excluded)."""
  out = {'text': c.text() if text is None else text, 'index': c.index, 'logprobs': None,
         'finish_reason': c.finish_reason if final else None,
         'token_ids': c.new_ids(whole=text is None)}
  if c.params.logprobs is not None:
    out['logprobs'] = completion_logprobs(c.entries if entries is None else entries)
  return out


def chat_choice(c: Choice, text=None, entries=None, final=True) -> dict:
  if text is None:
    out = {'index': c.index, 'message': {'role': 'assistant', 'content': c.text()},
           'logprobs': None, 'finish_reason': c.finish_reason}
  else:
    out = {'index': c.index, 'delta': {'content': text} if text else {}, 'logprobs': None,
           'finish_reason': c.finish_reason if final else None}
  if c.params.logprobs is not None:
    out['logprobs'] = chat_logprobs(c.entries if entries is None else entries)
  return out


def sse(obj) -> bytes:
  return b'data: ' + json.dumps(obj).encode() + b'\n\n'


# ----------------------------------------------------------------------------- one request


class Completion:
  """One HTTP request's completions: its engine requests, their events on an asyncio queue
  (a slow client never holds the decode thread), and the response, whole or streamed."""

  def __init__(self, params: protocol.CompletionParams, engine, tokenizer, *,
               arrived: float, on_finish: Callable, texts: Optional[TokenTexts] = None):
    self.params, self.engine, self.arrived = params, engine, arrived
    self.on_finish = on_finish
    self.deadline = arrived + params.timeout if params.timeout else None
    self.queue: asyncio.Queue = asyncio.Queue()
    eos_id = None if params.ignore_eos else engine.eos_id  # else EOS is a token like any
    texts = texts or TokenTexts(tokenizer)
    n = params.n
    self.choices = [Choice(i * n + j, p, params, tokenizer, eos_id, texts)
                    for i, p in enumerate(params.prompts) for j in range(n)]
    self.head = {'id': f'{"chatcmpl" if params.chat else "cmpl"}-{uuid.uuid4().hex}',
                 'object': 'chat.completion' if params.chat else 'text_completion',
                 'created': int(time.time()), 'model': params.model}
    self.shape = chat_choice if params.chat else completion_choice
    self.todo = []
    self._finished = False

  def submit(self, max_pending: int):
    """Hands every prompt to the engine (503 when the queue is over max_pending)."""
    p, loop = self.params, asyncio.get_running_loop()
    seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), 'little')
    for c in self.choices:
      if p.max_tokens == 0 and not (p.echo and p.logprobs is not None):
        c.on_event('done', 'length')  # nothing to compute
        continue
      c.request = engine_lib.Request(
          np.asarray(c.prompt.ids, np.int64), p.max_tokens,
          on_event=lambda *ev, i=c.index: loop.call_soon_threadsafe(
              self.queue.put_nowait, (i, time.perf_counter(), ev)),
          temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
          presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
          logit_bias=p.logit_bias, seed=(seed + c.index) % (1 << 31), logprobs=p.logprobs,
          echo=p.echo, ignore_eos=p.ignore_eos, add_bos=c.prompt.add_bos)
      self.todo.append(c.request)
    pending = self.engine.load()['pending']
    if max_pending and self.todo and pending and pending + len(self.todo) > max_pending:
      raise protocol.ApiError(
          503, f'{pending} prompts are waiting for a decode slot and this request adds '
          f'{len(self.todo)}: over --max_pending={max_pending}; retry later.',
          kind='server_error', headers={'Retry-After': '1'})
    try:
      for r in self.todo:
        self.engine.submit(r)
    except RuntimeError as e:
      for r in self.todo:
        r.cancel()
      raise protocol.ApiError(503, str(e), kind='server_error') from e

  def timed_out(self) -> protocol.ApiError:
    return protocol.ApiError(
        408, f'the request did not finish within its timeout of {self.params.timeout:g}s (the '
        'request\'s "timeout", at most the server\'s --request_timeout).', 'timeout',
        'timeout_error')

  def usage(self) -> dict:
    prompt_tokens = sum(len(c.prompt_ids) for c in self.choices[::self.params.n])
    completion_tokens = sum(c.completion_tokens for c in self.choices)
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}

  def cancel(self):
    """Frees the slots (a client that went away, a timeout) and reports the metrics once."""
    for r in self.todo:
      r.cancel()
    if not self._finished:
      self._finished = True
      self.on_finish(self)

  async def next_event(self, timeout: Optional[float] = None):
    """The next (choice, text, entries), or asyncio.TimeoutError past the deadline/timeout."""
    limits = [t for t in (timeout, self.deadline and self.deadline - time.perf_counter())
              if t is not None]
    if limits:
      i, at, ev = await asyncio.wait_for(self.queue.get(), max(min(limits), 0))
    else:
      i, at, ev = await self.queue.get()
    c = self.choices[i]
    was_done = c.done
    text, entries = c.on_event(*ev, at=at)
    return c, text, entries, c.done and not was_done

  def response(self) -> dict:
    errors = [c.error for c in self.choices if c.error is not None]
    if errors:
      raise protocol.ApiError(500, errors[0], kind='server_error')
    return dict(self.head, choices=[self.shape(c) for c in self.choices], usage=self.usage())

  def chunk(self, c: Choice, text='', entries=None, final=False) -> bytes:
    head = dict(self.head, object='chat.completion.chunk') if self.params.chat else self.head
    return sse(dict(head, choices=[self.shape(c, text, entries or [], final)]))

  async def events(self):
    """The server-sent events of a streamed response (cancels on exit: a client that went
    away frees its slots at the next step)."""
    try:
      for c in self.choices:
        if self.params.chat:  # the role first, as OpenAI streams it
          yield sse(dict(self.head, object='chat.completion.chunk', choices=[
              {'index': c.index, 'delta': {'role': 'assistant', 'content': ''},
               'logprobs': None, 'finish_reason': None}]))
        if c.done:  # finished before it started (max_tokens=0)
          yield self.chunk(c, c.text(), None, final=True)
      while not all(c.done for c in self.choices):
        try:
          c, text, entries, finished = await self.next_event()
        except asyncio.TimeoutError:
          yield sse(self.timed_out().body())
          break
        if finished and c.error is not None:
          yield sse({'error': {'message': c.error, 'type': 'server_error', 'param': None,
                               'code': None}})
          break
        if text or entries or finished:
          yield self.chunk(c, text, entries, final=c.done)
      if self.params.include_usage:
        yield sse(dict(self.head, choices=[], usage=self.usage(),
                       **({'object': 'chat.completion.chunk'} if self.params.chat else {})))
      yield b'data: [DONE]\n\n'
    finally:
      self.cancel()
