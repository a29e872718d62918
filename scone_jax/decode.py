"""The decode core: one typed state and pure functions that every entry point drives.

In the manner of MaxText's `MaxEngine` / JetStream's engine API:

  state, out = prefill(model, path, params, table, prompts, options, is_stop_V,
                       cache_len=..., flags=...)        # N prompts -> a DecodeState of N rows
  big = insert(big, state, slots_N)                     # those rows into free slots
  big, outs = decode_chunk(model, path, n, flags)(params, table, matcher, big, is_stop_V)

`DecodeState` (a `flax.struct.dataclass`) holds, per row: the KV cache, the token fed next, the
f-gram match window (`ctx`, `doc_len`), the position, the stop flag, the tokens left and
emitted, the per-token counts (for presence/frequency penalties) and the request's options
(`Options`: seed, temperature, top_k, top_p, penalties, logit bias, whether stop tokens end it).

One sampler (`next_tokens`): token i of a request is drawn with the key fold_in(PRNGKey(seed),
i) and nothing else, so a request samples the same tokens alone or batched, from
`serving.Generator` (CLI generate, eval) or from `engine.Engine` (the server). top_p always
keeps the most probable token. Penalties and logit bias are applied on the device (OpenAI
semantics) before temperature, filters and greedy argmax; logprobs report the model's own
distribution.

`FgramPath` says how the compiled step reads the f-gram path: `match(matcher, ctx, doc_len)`
(device_match, on the accelerator or in host memory) and `gather(table, fid_B)` (in the step,
or a host callback). None is the baseline: every position gets T[token].

Nothing here reads an export or holds Python state between calls; the drivers do.
"""
import dataclasses
from typing import Callable, Optional, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import device_match
from scone_jax import model as model_lib
from scone_jax import packing

# Columns of the int inputs a step takes: token id, position, f-gram id (-1 = none), valid.
TOK, POS, FID, VALID = range(4)
BOS_ID = packing.BOS_ID
PREFILL_BUCKET = 16         # prompts are left-padded to a multiple of this (few shapes)
CACHE_BUCKET = 64
# Decode steps per compiled call, for the CLI and the server alike: requests join and leave
# between chunks, so this bounds a joining request's extra wait; more amortise dispatch.
DEFAULT_TOKENS_PER_DISPATCH = 8
MAX_LOGIT_BIAS = 300        # entries of a request's logit_bias (OpenAI's limit)
MAX_LOGPROBS = 20           # top logprobs a request may ask for per token


def bucket(n: int, size: int) -> int:
  """n rounded up to a multiple of size (at least size)."""
  return max(size, -(-n // size) * size)


# ----------------------------------------------------------------------------- the model


def _token_embed(module, ids):
  return module.token_embed(ids)


def input_vectors(model, params, rows_BxLxD, ints_BxLx4):
  """where(matched, table row, T[token]): SCONE's input embedding, f-gram model-free."""
  x_BxLxD = model.apply({'params': params}, ints_BxLx4[..., TOK], method=_token_embed)
  if rows_BxLxD is None:  # the baseline: no table
    return x_BxLxD
  matched_BxL = ints_BxLx4[..., FID] >= 0
  return jnp.where(matched_BxL[..., None], rows_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)


def apply_cached(model, params, cache, rows_BxLxD, ints_BxLx4):
  """One KV-cached forward pass of L new positions per row -> (logits [B, L, V], cache)."""
  x_BxLxD = input_vectors(model, params, rows_BxLxD, ints_BxLx4)
  logits_BxLxV, state = model.apply(
      {'params': params, 'cache': cache}, x_BxLxD, positions_BxL=ints_BxLx4[..., POS],
      valid_BxL=ints_BxLx4[..., VALID] > 0, decode=True,
      method=model_lib.SconeLM.backbone, mutable=['cache'])
  return logits_BxLxV, state['cache']


def cache_shapes(model, batch: int, length: int):
  """ShapeDtypeStructs of an empty KV cache of `length` slots for `batch` rows."""
  def init():
    x = jnp.zeros((batch, length, model.config.d_model), jnp.float32)
    return model.init(jax.random.PRNGKey(0), x, decode=True,
                      method=model_lib.SconeLM.backbone)['cache']
  return jax.eval_shape(init)


# ----------------------------------------------------------------------------- the state


@struct.dataclass
class Options:
  """A request's decoding options, one entry per row ([B] unless noted)."""
  seed: jax.Array           # int32: token i is drawn with fold_in(PRNGKey(seed), i)
  temperature: jax.Array    # float32; 0 = greedy
  top_p: jax.Array          # float32 in (0, 1]
  top_k: jax.Array          # int32; 0 = all
  presence: jax.Array       # float32 presence penalty
  frequency: jax.Array      # float32 frequency penalty
  bias_BxV: jax.Array       # float32 logit bias, dense
  honor_stop: jax.Array     # bool: whether is_stop_V ends the row


@struct.dataclass
class DecodeState:
  """Everything a decode chunk reads and writes, per row ([B] unless noted)."""
  cache: object             # the KV cache (each row its own fill level)
  tok: jax.Array            # int32: the token fed at the next step (the latest emitted)
  ctx: jax.Array            # int32 [B, K]: the document's last K tokens, right-aligned
  doc_len: jax.Array        # int32: document tokens so far (BOS excluded)
  pos: jax.Array            # int32: position of the next input
  done: jax.Array           # bool: emits nothing more
  left: jax.Array           # int32: tokens the row may still emit
  count: jax.Array          # int32: tokens emitted (= index of the next token)
  counts_BxV: jax.Array     # int32: how often each token was emitted (penalties)
  options: Options

  @property
  def batch(self) -> int:
    return self.tok.shape[0]


@dataclasses.dataclass(frozen=True)
class Flags:
  """What a compiled prefill/decode includes (static: each combination is one program).
  sample: some row has temperature > 0; adjust: some row has penalties or logit bias;
  logprobs: how many top logprobs to return per token (0 = none)."""
  sample: bool = False
  adjust: bool = False
  logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class FgramPath:
  """How the compiled step reads the f-gram path: match(matcher, ctx_BxK, doc_len_B) ->
  fid_B and gather(table, fid_B) -> rows [B, d]."""
  match: Callable
  gather: Callable


def make_options(n: int, vocab: int, *, seed=0, temperature=0.0, top_p=1.0, top_k=0,
            presence=0.0, frequency=0.0, logit_bias: Optional[Sequence] = None,
            honor_stop=True) -> Options:
  """Host-side Options of n rows; each option a scalar (every row) or a sequence of n.
  logit_bias: None or n dicts {token id: bias} (None entries allowed)."""
  col = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (n,)).copy()
  bias = np.zeros((n, vocab), np.float32)
  for b, entries in enumerate(logit_bias or ()):
    for t, v in (entries or {}).items():
      bias[b, int(t)] += float(v)
  return Options(seed=col(seed, np.int64).astype(np.int32), temperature=col(temperature, np.float32),
                 top_p=col(top_p, np.float32), top_k=col(top_k, np.int32),
                 presence=col(presence, np.float32), frequency=col(frequency, np.float32),
                 bias_BxV=bias, honor_stop=col(honor_stop, bool))


def check_prompt(prompt_ids: np.ndarray, max_tokens: int, add_bos: bool, vocab: int,
                 max_len: int, why: str = '', hint: str = '') -> Optional[str]:
  """Why a prompt cannot be decoded (None if it can): ids outside the vocabulary, nothing to
  condition on, or more positions than the model allows. The one check of every driver."""
  prompt_ids = np.asarray(prompt_ids).reshape(-1)
  if prompt_ids.size and (prompt_ids.min() < 0 or prompt_ids.max() >= vocab):
    return f'the prompt has token ids outside [0, {vocab}).'
  if prompt_ids.size + int(add_bos) == 0:
    return 'the prompt is empty and has no BOS: there is nothing to condition on.'
  needed = prompt_ids.size + int(add_bos) + max(max_tokens, 1) - 1  # the last is not fed
  if needed > max_len:
    return (f'the prompt has {prompt_ids.size} tokens{" (+1 BOS)" * add_bos} and '
            f'max_tokens={max_tokens}: that needs {needed} positions but this model allows '
            f'{max_len}{why}; shorten the prompt or lower max_tokens{hint}.')
  return None


@struct.dataclass
class Prompts:
  """A batch of prompts as a prefill reads them: ints [N, W, 4] left-padded so that every
  row's next token takes the same cache slot, the match windows and lengths with BOS."""
  ints_NxWx4: jax.Array
  ctx_NxK: jax.Array
  doc_len_N: jax.Array
  len_N: jax.Array
  max_new_N: jax.Array


def make_prompts(ids: Sequence[np.ndarray], add_bos: Sequence[bool], max_new: Sequence[int],
            width: int, k: int, match: Optional[Callable] = None) -> Prompts:
  """Host-side Prompts; match(ids) -> f-gram id per position (serving passes its
  `device_match.HostMatcher`; None: the baseline)."""
  n = len(ids)
  ints = np.zeros((n, width, 4), np.int32)
  ints[..., FID] = -1
  lens = np.zeros(n, np.int32)
  for b, (p, bos) in enumerate(zip(ids, add_bos)):
    p = np.asarray(p, np.int64).reshape(-1)
    lens[b] = p.size + int(bos)
    off = width - lens[b]
    ints[b, off:, TOK] = np.concatenate([[BOS_ID], p]) if bos else p
    ints[b, off:, POS] = np.arange(lens[b])
    ints[b, off:, VALID] = 1
    if match is not None and p.size:
      ints[b, width - p.size:, FID] = match(p)
  ctx, doc_len = device_match.window([np.asarray(p).reshape(-1) for p in ids], k)
  return Prompts(ints, ctx, doc_len, lens, np.asarray(max_new, np.int32))


# ----------------------------------------------------------------------------- the sampler


def row_keys(seeds_B, counters_B):
  """One key per row and token: a request's samples depend on its seed alone, never on which
  other requests share the batch nor on how the decode is chunked."""
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds_B,
                                                                            counters_B)


def sample_rows(logits_BxV, temperature_B, top_p_B, top_k_B, keys_B, *, sampling: bool):
  """Per row: greedy where temperature == 0, else the top_k (0 = all) tokens within the
  top_p mass at that temperature. The most probable token is always kept (top_p = 1e-38,
  which float32 flushes to 0, is greedy)."""
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  if not sampling:
    return greedy_B
  vocab = logits_BxV.shape[-1]
  neg = jnp.finfo(jnp.float32).min
  scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, neg, sorted_BxV)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  # The smallest prefix whose mass reaches top_p, and never less than the top token.
  kept_BxV = (before_BxV < top_p_B[:, None]) | (jnp.arange(vocab) == 0)[None]
  threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  filtered_BxV = jnp.where((scaled_BxV < kth_Bx1) | (scaled_BxV < threshold_Bx1), neg,
                           scaled_BxV)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def adjust_logits(logits_BxV, opts: Options, counts_BxV):
  """OpenAI's penalties and bias: logits - presence * (count > 0) - frequency * count + bias,
  counts over the tokens the request generated so far."""
  counts = counts_BxV.astype(jnp.float32)
  return (logits_BxV.astype(jnp.float32) + opts.bias_BxV
          - opts.presence[:, None] * (counts > 0) - opts.frequency[:, None] * counts)


def next_tokens(logits_BxV, opts: Options, count_B, counts_BxV, flags: Flags):
  """The one sampler: each row's next token (its `count_B`-th) under its options."""
  if flags.adjust:
    logits_BxV = adjust_logits(logits_BxV, opts, counts_BxV)
  keys = row_keys(opts.seed, count_B) if flags.sample else None
  return sample_rows(logits_BxV, opts.temperature, opts.top_p, opts.top_k, keys,
                     sampling=flags.sample)


def logprob_outputs(logits_NxV, chosen_N, top: int):
  """Log-probabilities (the model's, before penalties, temperature and filters) of the chosen
  tokens and the `top` most likely ones."""
  logp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp_NxV, chosen_N[:, None], axis=-1)[:, 0]
  top_lp, top_id = jax.lax.top_k(logp_NxV, top)
  return {'logprob': chosen, 'top_logprob': top_lp, 'top_id': top_id.astype(jnp.int32)}


# ----------------------------------------------------------------------------- prefill / insert


def _gather_rows(path: Optional[FgramPath], table, fid_NxL, dim: int):
  if path is None:
    return None
  return path.gather(table, fid_NxL.reshape(-1)).reshape(fid_NxL.shape + (dim,))


def prefill(model, path: Optional[FgramPath], params, table, batch: Prompts, opts: Options,
            is_stop_V, *, cache_len: int, flags: Flags):
  """N prompts through the model into a fresh cache of `cache_len` -> (DecodeState of N rows
  holding each row's first new token, outs {'token' [N]} and, with flags.logprobs, the
  logprobs of every position [N, W, ...] (position j scores input j + 1)). Not jitted.

  Only flags.logprobs matters here: a prefill always runs the per-row sampler with penalties
  and bias (one sample per row, against a whole prompt's forward pass), so one program per
  width and row count serves every request."""
  flags = Flags(sample=True, adjust=True, logprobs=flags.logprobs)
  ints = batch.ints_NxWx4
  n = ints.shape[0]
  shapes = cache_shapes(model, n, cache_len)
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  rows = _gather_rows(path, table, ints[..., FID], model.config.d_model)
  logits_NxWxV, cache = apply_cached(model, params, fresh, rows, ints)
  vocab = logits_NxWxV.shape[-1]
  counts = jnp.zeros((n, vocab), jnp.int32)
  tok_N = next_tokens(logits_NxWxV[:, -1], opts, jnp.zeros((n,), jnp.int32), counts, flags)
  out = {'token': tok_N}
  if flags.logprobs:
    next_NxW = jnp.concatenate([ints[:, 1:, TOK], tok_N[:, None]], axis=1)
    out.update(jax.vmap(lambda l, t: logprob_outputs(l, t, flags.logprobs))(logits_NxWxV,
                                                                            next_NxW))
  state = DecodeState(
      cache=cache, tok=tok_N, ctx=jnp.asarray(batch.ctx_NxK, jnp.int32),
      doc_len=jnp.asarray(batch.doc_len_N, jnp.int32), pos=jnp.asarray(batch.len_N, jnp.int32),
      done=(is_stop_V[tok_N] & opts.honor_stop) | (batch.max_new_N <= 1),
      left=batch.max_new_N - 1, count=jnp.ones((n,), jnp.int32),
      counts_BxV=counts.at[jnp.arange(n), tok_N].add(1), options=opts)
  return state, out


def _cache_batch_axis(model) -> int:
  # Scanned layers stack their cache on a leading layer axis: the batch axis is next.
  return 1 if model.config.scan_layers else 0


def insert(model, state: DecodeState, rows: DecodeState, slots_N) -> DecodeState:
  """`rows` (a prefill's N rows, same cache length) written into `state` at slots_N; a slot
  >= state.batch is a padding row, dropped. Not jitted."""
  axis = _cache_batch_axis(model)

  def put(big, new, ax=0):
    at = (slice(None),) * ax + (slots_N,)
    return big.at[at].set(new.astype(big.dtype), mode='drop')
  cache = jax.tree.map(lambda b, r: put(b, r, axis), state.cache, rows.cache)
  rest = jax.tree.map(put, state.replace(cache=None), rows.replace(cache=None))
  return rest.replace(cache=cache)


def retire(state: DecodeState, free_B) -> DecodeState:
  """Rows where free_B is True stop (a finished or cancelled request's slot). Not jitted."""
  return state.replace(done=state.done | free_B)


def empty_state(model, batch: int, cache_len: int, k: int) -> DecodeState:
  """A DecodeState of `batch` free rows (every row done). Not jitted."""
  shapes = cache_shapes(model, batch, cache_len)
  vocab = model.config.vocab_size
  zeros = lambda *shape, dt=jnp.int32: jnp.zeros((batch,) + shape, dt)
  opts = Options(seed=zeros(), temperature=zeros(dt=jnp.float32), top_p=zeros(dt=jnp.float32),
                 top_k=zeros(), presence=zeros(dt=jnp.float32), frequency=zeros(dt=jnp.float32),
                 bias_BxV=zeros(vocab, dt=jnp.float32), honor_stop=zeros(dt=bool))
  return DecodeState(cache=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                     tok=zeros(), ctx=zeros(k), doc_len=zeros(), pos=zeros(),
                     done=jnp.ones((batch,), bool), left=zeros(), count=zeros(),
                     counts_BxV=zeros(vocab), options=opts)


# ----------------------------------------------------------------------------- decode


def decode_chunk(model, path: Optional[FgramPath], num_steps: int, flags: Flags):
  """fn(params, table, matcher, state, is_stop_V) -> (state, outs): up to `num_steps` decode
  steps in one compiled call (a `lax.while_loop`; not jitted). Per step and row, on the
  device: push the row's last token into its match window, match the longest f-gram ending
  there, gather its table row, run the KV-cached step, sample (`next_tokens`), stop on a stop
  token or when no tokens are left. Done rows compute but emit nothing; the loop ends early
  when every row is done. outs: tokens [B, num_steps] (-1 = not emitted), with
  flags.logprobs the logprobs of each token [B, num_steps, ...], and steps (steps run)."""
  def step(params, table, matcher, s: DecodeState, is_stop_V):
    live_B = ~s.done
    ctx, doc_len = device_match.push(s.ctx, s.doc_len, s.tok, live_B)
    fid_B = jnp.full_like(s.tok, -1)
    rows_Bx1xD = None
    if path is not None:
      fid_B = path.match(matcher, ctx, doc_len)
      rows_Bx1xD = path.gather(table, fid_B)[:, None]
    ints_Bx1x4 = jnp.stack([s.tok, s.pos, fid_B, live_B.astype(jnp.int32)], -1)[:, None]
    logits_Bx1xV, cache = apply_cached(model, params, s.cache, rows_Bx1xD, ints_Bx1x4)
    logits_BxV = logits_Bx1xV[:, 0]
    tok_B = next_tokens(logits_BxV, s.options, s.count, s.counts_BxV, flags)
    left = s.left - live_B
    stop_B = live_B & ((is_stop_V[tok_B] & s.options.honor_stop) | (left <= 0))
    s = s.replace(cache=cache, ctx=ctx, doc_len=doc_len, tok=jnp.where(live_B, tok_B, s.tok),
                  pos=s.pos + live_B, left=left, count=s.count + live_B, done=s.done | stop_B,
                  counts_BxV=s.counts_BxV.at[jnp.arange(s.batch), tok_B].add(live_B))
    extra = logprob_outputs(logits_BxV, tok_B, flags.logprobs) if flags.logprobs else {}
    return s, dict(extra, tokens=jnp.where(live_B, tok_B, -1))

  def run(params, table, matcher, state: DecodeState, is_stop_V):
    batch = state.batch
    shapes = jax.eval_shape(lambda s: step(params, table, matcher, s, is_stop_V)[1], state)
    outs = {k: jnp.full((batch, num_steps) + v.shape[1:], -1 if k == 'tokens' else 0, v.dtype)
            for k, v in shapes.items()}

    def body(carry):
      i, s, outs = carry
      s, got = step(params, table, matcher, s, is_stop_V)
      return i + 1, s, {k: outs[k].at[:, i].set(v) for k, v in got.items()}

    steps, state, outs = jax.lax.while_loop(
        lambda c: (c[0] < num_steps) & ~jnp.all(c[1].done), body, (jnp.int32(0), state, outs))
    return state, dict(outs, steps=steps)
  return run
