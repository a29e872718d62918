"""The f-gram matcher inside the compiled decode step: the longest f-gram ending at each row's
newest token. Its arrays live on the accelerator or in host memory: every read of them goes
through a `take` hook (`export_reader.host_take` gathers host-memory arrays on the host), the
hashing and compares run on the device over a few values per row.

Every f-gram of length n is keyed by a 64-bit hash of (its tokens, n), kept as two uint32
words (JAX runs without 64-bit integers by default) in one array sorted by (hi, lo). A decode
step hashes the row's last n tokens for every n = 2..K at once and finds each key in the
sorted array through a directory of its top bits: the keys sharing a prefix (about two)
are read in one gather, a `searchsorted` whose answer was tabulated at build time. Then it
compares the found f-gram's stored tokens and length with the row's, so a hash collision
can never select a wrong row. Keys are distinct by construction (`build` re-seeds the hash
until no two f-grams share a key), so a found key names at most one candidate. The result
equals `fgrams.advance_matches` (tests/test_device_match.py).

Nothing here knows a neural network: arrays in, f-gram ids out. Per-row match state is a
right-aligned window `ctx_BxK` of the document's last K tokens and `doc_len_B`, the number
of document tokens so far (0 = a document starts; the window's tokens are then unused).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import fgrams as fgrams_lib

_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B1
_MAX_SEEDS = 16


def _fmix(h):
  """murmur3's 32-bit finaliser; the same bits under numpy and jax.numpy (uint32 wraps)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(_FMIX1)
  h = h ^ (h >> 13)
  h = h * np.uint32(_FMIX2)
  return h ^ (h >> 16)


def _hash_suffixes(tokens_BxM, seed: int, lengths):
  """{n: (hi_B, lo_B)} for n in `lengths`: the keys of each row's last n tokens.

  Hashed from the newest token backwards, so the key of the (n+1)-suffix extends that of
  the n-suffix by one step (one pass for all lengths). Works on numpy and jax arrays alike.
  """
  xp = jnp if isinstance(tokens_BxM, jax.Array) else np
  cols = tokens_BxM.shape[1]
  h1 = xp.full(tokens_BxM.shape[:1], seed * 2 + 1, np.uint32)
  h2 = xp.full(tokens_BxM.shape[:1], seed * 2 + 2, np.uint32)
  out = {}
  for n in range(1, max(lengths) + 1):
    t = tokens_BxM[:, cols - n].astype(xp.uint32)
    h1 = _fmix(h1 ^ _fmix(t ^ np.uint32(0x27D4EB2F)))
    h2 = _fmix((h2 + _fmix(t + np.uint32(_GOLDEN))) * np.uint32(5) + np.uint32(0xE6546B64))
    if n in lengths:
      out[n] = (_fmix(h1 ^ np.uint32(n * _GOLDEN & 0xFFFFFFFF)),
                _fmix(h2 + np.uint32(n)))
  return out


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class MatcherArrays:
  """The matcher as arrays (a pytree: pass it to a jitted function as an argument).

  key_hi_M, key_lo_M: uint32, the keys sorted by (hi, lo), then `width` padding entries;
  id_M: int32, the f-gram id of each key; bucket_start: int32 [2^bits + 1], where the keys
  whose hi word starts with each `bits`-bit prefix begin (a directory over the sorted keys,
  so a lookup reads one bucket of at most `width` keys instead of a log2(S)-step binary
  search: two gathers per query, on a GPU as on a CPU); tokens_SxK: int32, the f-grams
  left-aligned (padding 0); lengths_S: int32. seed, max_len, bits and width are static.
  """
  key_hi_M: object
  key_lo_M: object
  id_M: object
  bucket_start: object
  tokens_SxK: object
  lengths_S: object
  seed: int
  max_len: int
  bits: int
  width: int

  def tree_flatten(self):
    return ((self.key_hi_M, self.key_lo_M, self.id_M, self.bucket_start, self.tokens_SxK,
             self.lengths_S), (self.seed, self.max_len, self.bits, self.width))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self.tree_flatten()[0])


def from_sorted(keys_M, ids_M, tokens, lengths, seed: int, max_len: int) -> MatcherArrays:
  """MatcherArrays of distinct uint64 keys sorted ascending and their f-gram ids."""
  m = keys_M.size
  bits = int(min(24, max(1, (max(m, 2) // 2).bit_length())))  # ~2 keys per bucket
  hi = (keys_M >> np.uint64(32)).astype(np.uint32)
  lo = (keys_M & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  prefix = (hi >> np.uint32(32 - bits)).astype(np.int64)
  start = np.searchsorted(prefix, np.arange((1 << bits) + 1)).astype(np.int32)
  width = int(max(1, np.diff(start).max(initial=1)))
  pad = np.full(width, 0xFFFFFFFF, np.uint32)
  return MatcherArrays(np.concatenate([hi, pad]), np.concatenate([lo, pad]),
                       np.concatenate([ids_M.astype(np.int32), np.zeros(width, np.int32)]),
                       start, tokens, lengths, seed, max_len, bits, width)


def build(fgram_set: fgrams_lib.FGramSet, seed: int = 0) -> MatcherArrays:
  """The matcher's numpy arrays for an f-gram set (device_put them where the step runs)."""
  tokens = np.asarray(fgram_set.tokens_padded, np.int32)
  lengths = np.asarray(fgram_set.lengths, np.int32)
  for s in range(seed, seed + _MAX_SEEDS):
    keys = np.zeros(len(lengths), np.uint64)
    for n in np.unique(lengths):
      rows = np.flatnonzero(lengths == n)
      hi, lo = _hash_suffixes(tokens[rows, :n], s, (int(n),))[int(n)]
      keys[rows] = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    order = np.argsort(keys, kind='stable')
    sorted_keys = keys[order]
    if not (sorted_keys[1:] == sorted_keys[:-1]).any():
      return from_sorted(sorted_keys, order, tokens, lengths, s, fgram_set.max_len)
  raise ValueError(f'{len(lengths)} f-grams: {_MAX_SEEDS} hash seeds all gave two f-grams the '
                   'same 64-bit key; this does not happen by chance below ~10^9 f-grams.')


def _take_here(pairs):
  return tuple(a[i] for a, i in pairs)


def _find(m: MatcherArrays, q_hi, q_lo, take):
  """(found, index into the key arrays, f-gram id) of each query key: its bucket, read
  whole."""
  bucket = (q_hi >> np.uint32(32 - m.bits)).astype(jnp.int32)
  start, end = take(((m.bucket_start, bucket), (m.bucket_start, bucket + 1)))
  idx = start[..., None] + jnp.arange(m.width, dtype=jnp.int32)
  key_hi, key_lo, ids = take(((m.key_hi_M, idx), (m.key_lo_M, idx), (m.id_M, idx)))
  hit = (idx < end[..., None]) & (key_hi == q_hi[..., None]) & (key_lo == q_lo[..., None])
  at = jnp.argmax(hit, axis=-1)[..., None]
  return jnp.any(hit, axis=-1), jnp.take_along_axis(ids, at, axis=-1)[..., 0]


def match_last(m: MatcherArrays, ctx_BxK, doc_len_B, *, take=None, keys_hook=None):
  """F-gram id (-1 = none) of the longest f-gram ending at each row's newest token
  (ctx_BxK[:, -1]), using only the row's last min(doc_len, K) document tokens.

  take(((array, index), ...)) -> the gathered arrays: every read of the matcher's arrays
  goes through it (default: on the device; `export_reader.match_in_step` reads arrays kept
  in host memory there, in three batches per step). keys_hook(q_hi, q_lo) -> (q_hi, q_lo),
  [B, K-1] each (lengths 2..K): a test hook that forces key collisions.
  """
  take = take or _take_here
  k = ctx_BxK.shape[1]
  if k < m.max_len:
    raise ValueError(f'the match window holds {k} tokens; the f-gram set needs {m.max_len}.')
  batch = ctx_BxK.shape[0]
  if m.tokens_SxK.shape[0] == 0 or m.max_len < 2:
    return jnp.full((batch,), -1, jnp.int32)
  q_hi, q_lo = _query_keys(m, ctx_BxK, keys_hook)                    # [B, K-1]
  found, fid = _find(m, q_hi, q_lo, take)                           # [B, K-1]
  stored, stored_len = take(((m.tokens_SxK, fid), (m.lengths_S, fid)))
  return _longest_confirmed(m, ctx_BxK, doc_len_B, found, fid, stored, stored_len, jnp)


def _query_keys(m: MatcherArrays, ctx_BxK, keys_hook=None):
  """(q_hi, q_lo), [B, K-1] each: the keys of each row's last n tokens for n = 2..K, numpy
  or jax like ctx_BxK; keys_hook(q_hi, q_lo) -> (q_hi, q_lo) forces collisions in tests."""
  xp = jnp if isinstance(ctx_BxK, jax.Array) else np
  lengths = tuple(range(2, m.max_len + 1))
  keys = _hash_suffixes(ctx_BxK, m.seed, lengths)
  q_hi = xp.stack([keys[n][0] for n in lengths], axis=1)
  q_lo = xp.stack([keys[n][1] for n in lengths], axis=1)
  if keys_hook is not None:
    q_hi, q_lo = keys_hook(q_hi, q_lo)
  return q_hi, q_lo


def _longest_confirmed(m: MatcherArrays, ctx_BxK, doc_len_B, found, fid, stored, stored_len,
                       xp):
  """The id of the longest candidate (fid [B, K-1], lengths 2..K) whose stored tokens
  (stored [B, K-1, >= K]) and length equal the row's last n tokens and fit in its document
  (-1: none), so a hash collision never selects a wrong row; xp: numpy or jax.numpy."""
  k = ctx_BxK.shape[1]
  n_N = xp.asarray(tuple(range(2, m.max_len + 1)), xp.int32)
  col = xp.arange(m.max_len)
  src = xp.minimum((k - n_N)[:, None] + col[None, :], k - 1)         # [K-1, K]
  inside = col[None, :] < n_N[:, None]
  same = xp.all((stored[..., :m.max_len] == ctx_BxK[:, src]) | ~inside[None], axis=2)
  ok = (found & same & (stored_len == n_N[None])
        & (n_N[None] <= xp.minimum(doc_len_B, m.max_len)[:, None]))
  best = xp.where(ok, n_N[None], 0)
  pick = xp.argmax(best, axis=1)                                     # the longest confirmed
  chosen = xp.take_along_axis(fid, pick[:, None], axis=1)[:, 0]
  return xp.where(xp.max(best, axis=1) > 0, chosen, -1).astype(xp.int32)


def push(ctx_BxK, doc_len_B, new_B, valid_B: Optional[object] = None):
  """Appends each row's new token to its window (rows with valid_B False keep theirs)."""
  shifted = jnp.concatenate([ctx_BxK[:, 1:], new_B[:, None].astype(ctx_BxK.dtype)], axis=1)
  if valid_B is None:
    return shifted, doc_len_B + 1
  return (jnp.where(valid_B[:, None], shifted, ctx_BxK),
          jnp.where(valid_B, doc_len_B + 1, doc_len_B))


def window(docs, k: int):
  """Host-side initial state of rows: (ctx [B, K] int32 right-aligned, doc_len [B] int32)."""
  ctx = np.zeros((len(docs), k), np.int32)
  doc_len = np.zeros(len(docs), np.int32)
  for b, doc in enumerate(docs):
    tail = np.asarray(doc, np.int64)[-k:] if k else np.zeros(0, np.int64)
    ctx[b, k - tail.size:] = tail
    doc_len[b] = len(doc)
  return ctx, doc_len


# ----------------------------------------------------------------------------- on the host

_HOST_CHUNK = 4096  # positions per numpy pass: bounds the [N, K-1, width] gathers (~MBs)


def _match_windows_host(m: MatcherArrays, ctx_NxK: np.ndarray, doc_len_N: np.ndarray,
                        keys_hook=None) -> np.ndarray:
  """`match_last` in numpy on numpy arrays: the same keys, bucket reads and stored-token
  check (so the same ids), without a jax dispatch per operation. ctx_NxK has K = max_len
  columns; keys_hook as in match_last."""
  q_hi, q_lo = _query_keys(m, ctx_NxK, keys_hook)                    # [N, K-1]
  bucket = (q_hi >> np.uint32(32 - m.bits)).astype(np.int64)
  start, end = m.bucket_start[bucket], m.bucket_start[bucket + 1]
  idx = start[..., None] + np.arange(m.width, dtype=np.int32)       # [N, K-1, W]
  hit = ((idx < end[..., None]) & (m.key_hi_M[idx] == q_hi[..., None])
         & (m.key_lo_M[idx] == q_lo[..., None]))
  # Only the found key's id is read (the device reads the bucket's ids with its keys).
  at = np.take_along_axis(idx, hit.argmax(axis=-1)[..., None], axis=-1)[..., 0]
  fid = m.id_M[at]                                                  # [N, K-1]
  return _longest_confirmed(m, ctx_NxK, doc_len_N, hit.any(axis=-1), fid, m.tokens_SxK[fid],
                            m.lengths_S[fid], np)


def match_windows_host(m: MatcherArrays, ctx_NxK, doc_len_N, *, keys_hook=None) -> np.ndarray:
  """F-gram id (-1 = none) of the longest f-gram ending at each window's last token, using
  its last min(doc_len, K) tokens: `match_last` on the host, for numpy MatcherArrays
  (`build`'s, before they are placed). Windows wider than K keep their last K columns."""
  ctx = np.asarray(ctx_NxK)
  doc_len = np.asarray(doc_len_N, np.int64)
  if ctx.ndim != 2 or doc_len.shape != ctx.shape[:1]:
    raise ValueError(f'ctx_NxK {ctx.shape} / doc_len_N {doc_len.shape}: pass [N, K] and [N].')
  k = m.max_len
  out = np.full(ctx.shape[0], -1, np.int32)
  if m.tokens_SxK.shape[0] == 0 or k < 2 or not ctx.size:
    return out
  if ctx.shape[1] < k:  # the missing columns are before the document: never compared
    ctx = np.concatenate([np.zeros((ctx.shape[0], k - ctx.shape[1]), ctx.dtype), ctx], axis=1)
  ctx = ctx[:, ctx.shape[1] - k:]
  for lo in range(0, ctx.shape[0], _HOST_CHUNK):
    out[lo:lo + _HOST_CHUNK] = _match_windows_host(m, ctx[lo:lo + _HOST_CHUNK],
                                                   doc_len[lo:lo + _HOST_CHUNK], keys_hook)
  return out


def match_flat_host(m: MatcherArrays, tokens, offsets) -> np.ndarray:
  """F-gram id (-1 = none) of the longest f-gram ending at each position of concatenated
  documents (offsets = [0, end_0, ..., len(tokens)]), never crossing a document start:
  `FGramSet.match_flat`'s ids from the matcher arrays, no hash table built."""
  tokens = np.asarray(tokens).reshape(-1)
  offsets = np.asarray(offsets, np.int64)
  if offsets[0] != 0 or offsets[-1] != tokens.size or (np.diff(offsets) < 0).any():
    raise ValueError(f'offsets must start at 0, end at len(tokens)={tokens.size} and not '
                     f'decrease; got {offsets[:3].tolist()}…{offsets[-1]}.')
  if not tokens.size:
    return np.zeros(0, np.int32)
  k = max(m.max_len, 1)
  # Window i ends at token i: a strided view, nothing copied but the K-1 leading zeros.
  padded = np.concatenate([np.zeros(k - 1, np.int32), tokens.astype(np.int32, copy=False)])
  windows_PxK = np.lib.stride_tricks.sliding_window_view(padded, k)
  doc_len_P = np.arange(tokens.size) - np.repeat(offsets[:-1], np.diff(offsets)) + 1
  return match_windows_host(m, windows_PxK, doc_len_P)


class HostMatcher:
  """The f-gram set's matching calls (`match`, `match_flat`, `match_last_batch`, with its
  `fingerprint` and `max_len`) answered from the decode step's matcher arrays in numpy.

  Serving matches prompts and eval documents with it: the arrays (~39 B per f-gram) are the
  ones the step already holds (on a CPU backend `device_put` aliases them), while the set's
  own hash table (`FGramSet.table`) would add ~170 B per f-gram: 17 GB at 100M. Same ids and
  lengths as the set's (tests/test_device_match.py).
  """

  def __init__(self, arrays: MatcherArrays, fgram_set: fgrams_lib.FGramSet):
    self.arrays = arrays
    self.fgram_set = fgram_set
    self.max_len = arrays.max_len

  def __len__(self) -> int:
    return int(self.arrays.lengths_S.shape[0])

  @property
  def fingerprint(self) -> str:
    return self.fgram_set.fingerprint

  def _lengths(self, ids):
    return np.where(ids >= 0, self.arrays.lengths_S[np.maximum(ids, 0)], 1).astype(np.int32)

  def match_ids(self, tokens) -> np.ndarray:
    """`match(tokens)[0]`: the ids alone (what a prompt needs)."""
    tokens = np.asarray(tokens).reshape(-1)
    return match_flat_host(self.arrays, tokens, np.array([0, tokens.size]))

  def match(self, tokens):
    ids = self.match_ids(tokens)
    return ids, self._lengths(ids)

  def match_flat(self, tokens, offsets):
    ids = match_flat_host(self.arrays, tokens, offsets)
    return ids, self._lengths(ids)

  def match_last_batch(self, context_BxK, valid_B):
    ids = match_windows_host(self.arrays, context_BxK, valid_B)
    return ids, self._lengths(ids)
