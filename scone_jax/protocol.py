"""The OpenAI protocol the server speaks: typed request and response bodies, body decoding
that no JSON can fault, and the translation of a request into prompts for the engine.

Every request body is decoded here, in a worker thread: its content type must be JSON
(415 otherwise: a page in a browser cannot post a `text/plain` "simple request"), its
nesting is bounded before it is parsed (400), and it is parsed and validated by pydantic
(integers bounded to int32 where they are token ids, lone surrogates refused by the JSON
parser, booleans strict), so that every hostile body is a 4xx with an OpenAI error object
({"error": {"message", "type", "param", "code"}}) and never a 5xx.
"""
import dataclasses
import math
import re
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import pydantic
from pydantic import BaseModel, Field, StrictBool

from scone_jax import engine as engine_lib
from scone_jax import serving

BOS_ID = serving.BOS_ID
MAX_LOGPROBS = engine_lib.MAX_LOGPROBS   # top logprobs a request may ask for per token
# The decode core's bound on logit_bias entries (engine.MAX_LOGIT_BIAS once it defines it).
MAX_LOGIT_BIAS = getattr(engine_lib, 'MAX_LOGIT_BIAS', 300)
MAX_STOP_STRINGS = 16
MAX_N = 16                 # completions per prompt (n)
DEFAULT_MAX_TOKENS = 16    # OpenAI's default
# Deepest JSON nesting any valid request has is 4 (chat content parts); bodies nested deeper
# than this are refused by a byte scan before the parser sees them.
MAX_JSON_DEPTH = 32
INT32_MAX = 2**31 - 1
# Prompts longer than this are counted piece by piece (encode_within).
_COUNT_CHARS = 4096
JSON_TYPES = ('application/json',)


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


# ----------------------------------------------------------------------------- types


def _integral(v):
  """JSON numbers with no fraction are integers (JSON Schema's rule: max_tokens: 1.0 is 1);
  strings and booleans are not."""
  if isinstance(v, (bool, str)):
    raise ValueError('must be an integer')
  if isinstance(v, float):
    if not (math.isfinite(v) and v.is_integer()):
      raise ValueError('must be an integer')
    return int(v)
  return v


def _number(v):
  if isinstance(v, (bool, str)):
    raise ValueError('must be a number')
  return v


def _utf8(s: str) -> str:
  try:
    s.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ValueError('is not valid Unicode (a lone surrogate?)') from e
  return s


Integer = Annotated[int, pydantic.BeforeValidator(_integral)]
Number = Annotated[float, pydantic.BeforeValidator(_number), Field(allow_inf_nan=False)]
Text = Annotated[str, pydantic.AfterValidator(_utf8)]
# Token ids are checked against the vocabulary later (engine.check); int32 bounds them here
# so that no id reaches numpy as an overflow.
TokenId = Annotated[int, pydantic.Strict(), Field(ge=0, le=INT32_MAX)]
Penalty = Annotated[Number, Field(ge=-2, le=2)]

_PROMPT_SHAPES = [(str, pydantic.TypeAdapter(Text)), (int, pydantic.TypeAdapter(list[TokenId])),
                  (list, pydantic.TypeAdapter(list[list[TokenId]]))]
_TEXTS = pydantic.TypeAdapter(list[Text])


def _prompt(v):
  """One of the four prompt shapes, picked by the first element: a mistyped list fails on
  one shape (one error), not on all four."""
  if v is None or isinstance(v, str):
    return _PROMPT_SHAPES[0][1].validate_python(v) if v is not None else None
  if not isinstance(v, list) or not v:
    raise ValueError('must be a string, a non-empty list of strings, a list of token ids or '
                     'a list of such lists')
  first = v[0]
  adapter = _TEXTS if isinstance(first, str) else next(
      (a for t, a in _PROMPT_SHAPES[1:] if isinstance(first, t) and not isinstance(first, bool)),
      None)
  if adapter is None:
    raise ValueError('must be a string, a list of strings, a list of token ids or a list of '
                     'such lists')
  try:
    return adapter.validate_python(v)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    where = ''.join(f'[{i}]' for i in err['loc'])
    raise ValueError(f'{where}: {err["msg"]}') from None


PromptField = Annotated[
    Any, pydantic.PlainValidator(_prompt),
    pydantic.WithJsonSchema({'anyOf': [
        {'type': 'string'}, {'type': 'array', 'items': {'type': 'string'}, 'minItems': 1},
        {'type': 'array', 'minItems': 1,
         'items': {'type': 'integer', 'minimum': 0, 'maximum': INT32_MAX}},
        {'type': 'array', 'minItems': 1, 'items': {'type': 'array', 'items': {
            'type': 'integer', 'minimum': 0, 'maximum': INT32_MAX}}},
        {'type': 'null'}]})]


class _Body(BaseModel):
  # Unknown fields are ignored, as OpenAI's clients send fields a server may not know.
  model_config = pydantic.ConfigDict(extra='ignore')


class StreamOptions(_Body):
  include_usage: Optional[StrictBool] = False


class _Sampling(_Body):
  """The fields completions and chat share (OpenAI's names, types and defaults; top_k,
  ignore_eos, timeout and add_special_tokens are extensions, as in vLLM)."""
  model: Text
  max_tokens: Optional[Annotated[Integer, Field(ge=0)]] = DEFAULT_MAX_TOKENS
  temperature: Optional[Annotated[Number, Field(ge=0)]] = 1.0
  top_p: Optional[Annotated[Number, Field(gt=0, le=1)]] = 1.0
  top_k: Optional[Annotated[Integer, Field(ge=-1, le=INT32_MAX)]] = 0
  n: Optional[Annotated[Integer, Field(ge=1, le=MAX_N)]] = 1
  stop: Optional[Union[Annotated[Text, Field(min_length=1)],
                       Annotated[list[Annotated[Text, Field(min_length=1)]],
                                 Field(max_length=MAX_STOP_STRINGS)]]] = None
  seed: Optional[Annotated[Integer, Field(ge=-2**63, lt=2**64)]] = None
  stream: Optional[StrictBool] = False
  stream_options: Optional[StreamOptions] = None
  presence_penalty: Optional[Penalty] = 0.0
  frequency_penalty: Optional[Penalty] = 0.0
  logit_bias: Optional[Annotated[dict[str, Annotated[Number, Field(ge=-100, le=100)]],
                                 Field(max_length=MAX_LOGIT_BIAS)]] = None
  user: Optional[Text] = None
  ignore_eos: Optional[StrictBool] = False
  timeout: Optional[Annotated[Number, Field(gt=0)]] = None


class CompletionRequest(_Sampling):
  """POST /v1/completions. prompt null is the start of a document (the BOS alone)."""
  prompt: PromptField = None
  echo: Optional[StrictBool] = False
  logprobs: Optional[Annotated[Integer, Field(ge=0, le=MAX_LOGPROBS)]] = None
  best_of: Optional[Annotated[Integer, Field(ge=1, le=MAX_N)]] = None
  suffix: Optional[Text] = None
  add_special_tokens: Optional[StrictBool] = True


class TextPart(_Body):
  type: Literal['text']
  text: Text


class ChatMessage(_Body):
  role: Literal['system', 'developer', 'user', 'assistant', 'tool']
  content: Optional[Union[Text, list[TextPart]]] = None
  name: Optional[Text] = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return ''.join(p.text for p in self.content)
    return self.content or ''


class ChatCompletionRequest(_Sampling):
  """POST /v1/chat/completions: the messages, rendered by the chat template into one prompt."""
  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_completion_tokens: Optional[Annotated[Integer, Field(ge=0)]] = None
  logprobs: Optional[StrictBool] = False
  top_logprobs: Optional[Annotated[Integer, Field(ge=0, le=MAX_LOGPROBS)]] = None
  add_generation_prompt: Optional[StrictBool] = True


class TokenizeRequest(_Body):
  prompt: Text
  model: Optional[Text] = None
  add_special_tokens: Optional[StrictBool] = True
  return_token_strs: Optional[StrictBool] = False


class DetokenizeRequest(_Body):
  tokens: list[TokenId]
  model: Optional[Text] = None


# -- responses (documentation: the routes write these shapes directly) ---------------------


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class CompletionLogprobs(BaseModel):
  tokens: list[str]
  token_logprobs: list[Optional[float]]
  top_logprobs: list[Optional[dict[str, float]]]
  text_offset: list[int]


class CompletionChoice(BaseModel):
  text: str
  index: int
  logprobs: Optional[CompletionLogprobs] = None
  finish_reason: Optional[Literal['stop', 'length']] = None
  token_ids: list[int] = Field(description='The new tokens (EOS excluded); an extension.')


class CompletionResponse(BaseModel):
  id: str
  object: Literal['text_completion']
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Optional[Usage] = None


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
  content: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
  role: Literal['assistant'] = 'assistant'
  content: Optional[str] = None


class ChatChoice(BaseModel):
  index: int
  message: AssistantMessage
  logprobs: Optional[ChatLogprobs] = None
  finish_reason: Optional[Literal['stop', 'length']] = None


class ChatCompletionResponse(BaseModel):
  id: str
  object: Literal['chat.completion']
  created: int
  model: str
  choices: list[ChatChoice]
  usage: Usage


class ModelCard(BaseModel):
  id: str
  object: Literal['model'] = 'model'
  created: int
  owned_by: str
  max_model_len: int


class ModelList(BaseModel):
  object: Literal['list'] = 'list'
  data: list[ModelCard]


class TokenizeResponse(BaseModel):
  count: int
  max_model_len: int
  tokens: list[int]
  token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
  prompt: str


class ErrorBody(BaseModel):
  message: str
  type: str
  param: Optional[str] = None
  code: Optional[str] = None


class ErrorResponse(BaseModel):
  error: ErrorBody


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


# ----------------------------------------------------------------------------- decoding


def check_content_type(content_type: Optional[str]):
  """415 unless the body is declared JSON (a browser's cross-site "simple request" cannot
  declare it without a CORS preflight)."""
  kind = (content_type or '').split(';')[0].strip().lower()
  if kind not in JSON_TYPES:
    raise ApiError(415, f'the request body must be JSON sent as "Content-Type: '
                   f'application/json", not {content_type or "no content type"!r}.')


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes(range(256)).translate(None, b'[]{}')


def json_depth(raw: bytes) -> int:
  """How deep raw's arrays and objects nest (brackets inside strings not counted); linear
  and recursion-free, so it runs before any parser."""
  skeleton = _STRING.sub(b'', raw).translate(None, _BRACKETS)
  if not skeleton:
    return 0
  codes = np.frombuffer(skeleton, np.uint8)
  steps = np.where((codes == ord('[')) | (codes == ord('{')), 1, -1).astype(np.int32)
  return int(np.cumsum(steps).max())


def decode(raw: bytes, model: type[BaseModel]):
  """raw as a `model`, or the ApiError (400) that says which field is wrong and why."""
  if json_depth(raw) > MAX_JSON_DEPTH:
    raise ApiError(400, f'the request body nests deeper than {MAX_JSON_DEPTH} levels; no '
                   'valid request does.')
  try:
    return model.model_validate_json(raw)
  except pydantic.ValidationError as e:
    raise validation_error(e) from None


def validation_error(e: pydantic.ValidationError) -> ApiError:
  err = e.errors(include_url=False)[0]
  if err['type'] == 'json_invalid':
    return ApiError(400, f'the request body is not valid JSON: {err["msg"]}.')
  if err['type'] == 'model_type' or not err['loc']:
    return ApiError(400, 'the request body must be a JSON object.')
  param = '.'.join(str(p) for p in err['loc'])
  err['msg'] = err['msg'].removeprefix('Value error, ')
  shown = repr(err.get('input'))
  shown = shown if len(shown) <= 60 else shown[:57] + '...'
  return ApiError(400, f'"{param}": {err["msg"]} (got {shown}).', param)


def validate(body, model: type[BaseModel]):
  """A Python object (a test's dict) as a `model`, errors as in decode()."""
  try:
    return model.model_validate(body)
  except pydantic.ValidationError as e:
    raise validation_error(e) from None


# ----------------------------------------------------------------------------- prompts


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
  n: int = 1
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: Optional[dict] = None   # {token id: bias}
  chat: bool = False


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


class Specials:
  """The BOS and EOS strings read as those tokens wherever they appear in a text (as HF
  tokenizers, and so vLLM's /tokenize and chat templates, read special tokens)."""

  def __init__(self, tokenizer, eos_id: int):
    self.tokenizer = tokenizer
    self.ids = {tokenizer.id_to_piece(i): i for i in (BOS_ID, eos_id)}
    self.pattern = re.compile('|'.join(re.escape(s) for s in self.ids))

  def pieces(self, text: str):
    """(plain text, special id or None) in order."""
    start = 0
    for m in self.pattern.finditer(text):
      yield text[start:m.start()], self.ids[m.group()]
      start = m.end()
    yield text[start:], None

  def encode_within(self, text: str, limit: int) -> Optional[np.ndarray]:
    ids = []
    for plain, special in self.pieces(text):
      got = encode_within(self.tokenizer, plain, limit - len(ids))
      if got is None:
        return None
      ids += got.tolist() + ([special] if special is not None else [])
    return np.asarray(ids, np.int64) if len(ids) <= limit else None


@dataclasses.dataclass
class Served:
  """What parsing needs to know of the served models."""
  models: Sequence[str]
  tokenizer: Any
  max_len: int
  check: Callable          # engine.check(prompt_ids, max_tokens, add_bos) -> Optional[str]
  eos_id: int
  max_prompts: int = 256
  max_timeout: float = 0.0
  chat_template: Any = None   # a chat_template.ChatTemplate
  specials: Optional[Specials] = None


def _not_found(model: str, models) -> ApiError:
  return ApiError(404, f'model {model!r} does not exist; this server serves '
                  f'{", ".join(map(repr, models))}.', 'model', 'not_found_error')


def _sampling(req: _Sampling, served: Served, max_tokens: int, n_prompts: int) -> dict:
  """The fields completions and chat share, checked against this server's limits."""
  if req.model not in served.models:
    raise _not_found(req.model, served.models)
  if max_tokens > served.max_len:
    raise ApiError(400, f'max_tokens={max_tokens} is beyond this model\'s length: prompt '
                   f'(with BOS) + max_tokens - 1 must fit in {served.max_len} positions.',
                   'max_tokens')
  n = req.n or 1
  if n_prompts * n > served.max_prompts:
    raise ApiError(400, f'this request asks for {n_prompts} prompts x n={n} completions; this '
                   f'server takes at most {served.max_prompts} per request '
                   '(--max_prompts_per_request): split it.', 'prompt' if n == 1 else 'n')
  bias = None
  if req.logit_bias:
    bias = {}
    for key, value in req.logit_bias.items():
      if not re.fullmatch(r'-?[0-9]{1,10}', key) or not 0 <= int(key) < served.tokenizer.vocab_size:
        raise ApiError(400, f'"logit_bias" keys must be token ids in [0, '
                       f'{served.tokenizer.vocab_size}), got {key[:20]!r}.', 'logit_bias')
      bias[int(key)] = float(value)
  stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
  timeout = req.timeout
  if served.max_timeout > 0:
    timeout = served.max_timeout if timeout is None else min(timeout, served.max_timeout)
  options = req.stream_options or StreamOptions()
  return dict(
      model=req.model, max_tokens=max_tokens,
      temperature=float(1.0 if req.temperature is None else req.temperature),
      top_p=float(1.0 if req.top_p is None else req.top_p), top_k=max(req.top_k or 0, 0),
      stop=stop, seed=req.seed, stream=bool(req.stream),
      include_usage=bool(options.include_usage), ignore_eos=bool(req.ignore_eos),
      timeout=float(timeout or 0.0), n=n, presence_penalty=float(req.presence_penalty or 0),
      frequency_penalty=float(req.frequency_penalty or 0), logit_bias=bias)


def _too_long(i, n_tokens, add_bos, max_tokens, max_len, at_least=False):
  bos = ' (+1 BOS)' if add_bos else ''
  n = f'more than {n_tokens}' if at_least else f'{n_tokens}'
  return ApiError(400, f'prompt {i} has {n} tokens{bos} and max_tokens={max_tokens}: that '
                  f'needs more than the {max_len} positions this model allows; shorten the '
                  'prompt or lower max_tokens.', 'prompt')


def _text_prompt(i, text, add_bos, max_tokens, served: Served, specials=False) -> Prompt:
  """A text prompt, tokenized only as far as the model's length allows."""
  limit = max(served.max_len - int(add_bos) - max(max_tokens, 1) + 1, 0)
  if specials:
    ids = served.specials.encode_within(text, limit)
  else:
    ids = encode_within(served.tokenizer, text, limit)
  if ids is None:
    raise _too_long(i, limit, add_bos, max_tokens, served.max_len, at_least=True)
  if specials and ids.size and ids[0] == BOS_ID:   # the template wrote the BOS: not doubled
    ids, add_bos = ids[1:], True
  problem = served.check(ids, max_tokens, add_bos)
  if problem:
    raise ApiError(400, f'prompt {i}: {problem}', 'prompt')
  return Prompt(text, ids, add_bos)


def _id_prompt(i, tokens, add_special, max_tokens, served: Served) -> Prompt:
  ids = np.asarray(tokens, np.int64)
  # A leading BOS is the server's own: never doubled. With add_special_tokens a leading EOS
  # starts a document too (lm-eval's prefix token when the BOS id is 0), as the model saw
  # documents start: after BOS, never after EOS.
  starts = (BOS_ID, served.eos_id) if add_special else (BOS_ID,)
  lead = ids.size and int(ids[0]) in starts
  shown_bos = int(ids[0]) if lead else BOS_ID
  add_bos = bool(add_special or lead)
  ids = ids[1:] if lead else ids
  problem = served.check(ids, max_tokens, add_bos)
  if problem:
    raise ApiError(400, f'prompt {i}: {problem}', 'prompt')
  return Prompt(served.tokenizer.decode(ids), ids, add_bos, shown_bos)


def parse_completion(req: CompletionRequest, served: Served) -> CompletionParams:
  """A validated completion request's prompts and parameters, or the ApiError that says
  which one is wrong. Runs in a worker thread (it tokenizes, bounded per prompt)."""
  if req.suffix:
    raise ApiError(400, '"suffix" is not supported by this server.', 'suffix')
  if req.best_of is not None and req.best_of != (req.n or 1):
    raise ApiError(400, f'"best_of" must equal n ({req.n or 1}): this server returns every '
                   'completion it samples.', 'best_of')
  prompt = '' if req.prompt is None else req.prompt
  if isinstance(prompt, str) or isinstance(prompt[0], int):
    prompts = [prompt]
  else:
    prompts = prompt
  max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
  shared = _sampling(req, served, max_tokens, len(prompts))
  add_special = req.add_special_tokens is not False
  parsed = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      parsed.append(_text_prompt(i, p, add_special, max_tokens, served))
    else:
      parsed.append(_id_prompt(i, p, add_special, max_tokens, served))
  return CompletionParams(prompts=parsed, logprobs=req.logprobs, echo=bool(req.echo),
                          **shared)


def parse_chat(req: ChatCompletionRequest, served: Served) -> CompletionParams:
  """A chat request as one prompt: its messages rendered by the chat template."""
  max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else (
      DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens)
  shared = _sampling(req, served, max_tokens, 1)
  text = served.chat_template.render(req.messages, req.add_generation_prompt is not False)
  prompt = _text_prompt(0, text, True, max_tokens, served, specials=True)
  logprobs = (req.top_logprobs or 0) if req.logprobs else None
  return CompletionParams(prompts=[prompt], logprobs=logprobs, echo=False, chat=True, **shared)
