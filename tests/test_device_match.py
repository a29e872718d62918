"""The on-device f-gram matcher equals the host's `fgrams.advance_matches`, token for token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scone_jax import device_match
from scone_jax import fgrams


def _random_set(rng, vocab, num, max_len):
  grams = set()
  while len(grams) < num:
    n = int(rng.integers(2, max_len + 1))
    grams.add(tuple(int(t) for t in rng.integers(0, vocab, n)))
  return fgrams.FGramSet.from_ngrams(sorted(grams), max_len=max_len)


def _host_ids(fs, state, new):
  ints = np.zeros((len(new), 4), np.int32)
  t = fs.table
  fgrams.advance_matches(state, np.asarray(new, np.int64), t.flat, t.width, t.shift,
                         fs.max_len, np.zeros((0, 1), np.uint16), np.zeros((len(new), 1),
                                                                           np.uint16), ints)
  return ints[:, 2]


@jax.jit
def _device_step(arrays, ctx, doc_len, new, restart):
  doc_len = jnp.where(restart, 0, doc_len)
  ctx, doc_len = device_match.push(ctx, doc_len, new)
  return ctx, doc_len, device_match.match_last(arrays, ctx, doc_len)


@pytest.mark.parametrize('max_len', [2, 3, 5])
def test_device_matcher_equals_advance_matches(max_len):
  """Random streams over a small vocabulary (most positions match), prompts of any length
  (0 .. 9 tokens, some shorter than K), rows that start new documents mid-stream, and an
  EOS token that is just a token to the matcher."""
  rng = np.random.default_rng(max_len)
  vocab = 5
  fs = _random_set(rng, vocab, 15 if max_len == 2 else 60, max_len)
  arrays = jax.device_put(device_match.build(fs))
  batch, steps = 7, 40
  prompts = [rng.integers(0, vocab, n) for n in (0, 1, 2, 3, 4, 6, 9)]
  ctx, doc_len = device_match.window(prompts, max_len)
  state = np.zeros((batch, max_len + 2), np.int64)
  state[:, :max_len] = ctx
  state[:, max_len] = doc_len
  matched = 0
  for t in range(steps):
    new = rng.integers(0, vocab, batch)
    restart = rng.random(batch) < 0.1  # a document starts at this token
    state[restart, max_len] = 0
    want = _host_ids(fs, state, new)
    ctx, doc_len, got = _device_step(arrays, ctx, doc_len, new.astype(np.int32), restart)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f'step {t}')
    matched += int((want >= 0).sum())
  assert matched > batch * steps // 3  # the test exercises matches, not only misses
  # And against the batch matcher on whole documents.
  doc = rng.integers(0, vocab, 30)
  ctx, doc_len = device_match.window([[]], max_len)
  ids = []
  for tok in doc:
    ctx, doc_len, got = _device_step(arrays, ctx, doc_len, np.array([tok], np.int32),
                                     np.array([False]))
    ids.append(int(got[0]))
  assert ids == fs.match(doc)[0].tolist()


def test_a_hash_collision_never_selects_a_wrong_row():
  """Plant a collision: give f-gram 1's key to an n-gram that is not an f-gram. The search
  then finds f-gram 1 for that n-gram, and the token check must reject it."""
  fs = fgrams.FGramSet.from_ngrams([(1, 2), (3, 4, 5), (2, 3)], max_len=3)
  m = device_match.build(fs)
  intruder = np.array([[4, 4, 4]], np.int32)  # its 2- and 3-suffixes are no f-grams
  hi, lo = device_match._hash_suffixes(intruder, m.seed, (3,))[3]  # pylint: disable=protected-access
  size = len(fs)
  at = int(np.flatnonzero(m.id_M[:size] == 1)[0])   # the key of f-gram 1 = (3, 4, 5)
  keys = ((m.key_hi_M[:size].astype(np.uint64) << np.uint64(32))
          | m.key_lo_M[:size].astype(np.uint64))
  keys[at] = (np.uint64(hi[0]) << np.uint64(32)) | np.uint64(lo[0])
  order = np.argsort(keys)
  planted = device_match.from_sorted(keys[order], m.id_M[:size][order], m.tokens_SxK,
                                     m.lengths_S, m.seed, m.max_len)
  found, pos = device_match._find(planted, jnp.asarray(hi), jnp.asarray(lo))  # pylint: disable=protected-access
  assert bool(found[0]) and int(planted.id_M[int(pos[0])]) == 1  # lands on the wrong f-gram
  got = device_match.match_last(planted, jnp.asarray(intruder), jnp.array([3]))
  assert int(got[0]) == -1
  # The real f-gram (3, 4, 5) now has another key: not found, never mistaken.
  assert int(device_match.match_last(planted, jnp.array([[3, 4, 5]]), jnp.array([3]))[0]) == -1
  assert int(device_match.match_last(m, jnp.array([[3, 4, 5]]), jnp.array([3]))[0]) == 1


def test_duplicate_keys_are_reseeded(monkeypatch):
  fs = fgrams.FGramSet.from_ngrams([(1, 2), (3, 4)], max_len=2)
  real = device_match._hash_suffixes  # pylint: disable=protected-access

  def weak(tokens, seed, lengths):
    if seed == 0:  # every key equal under seed 0
      return {n: (np.zeros(len(tokens), np.uint32),) * 2 for n in lengths}
    return real(tokens, seed, lengths)

  monkeypatch.setattr(device_match, '_hash_suffixes', weak)
  m = device_match.build(fs)
  assert m.seed == 1
