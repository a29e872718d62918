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


@pytest.mark.parametrize('host', [False, True])
def test_a_colliding_intruder_is_rejected_at_every_position(host):
  """For every stored f-gram g (every length n = 2..K) and every position p < n: an
  intruder equal to g except at p (a token no f-gram has), whose length-n key is forced to
  be g's (the keys_hook test hook), finds g's entry, and the stored-token check rejects it:
  the match is what the host matcher gives for the intruder. With host=True the matcher's
  arrays sit in host memory, read by export_reader.match_in_step's host gathers."""
  k = 4
  rng = np.random.default_rng(1)
  fs = _random_set(rng, 4, 40, k)
  m = device_match.build(fs)
  key_at = {int(i): j for j, i in enumerate(m.id_M[:len(fs)])}
  rows, target_hi, target_lo, length, want = [], [], [], [], []
  for gid, (tokens, n) in enumerate(zip(np.asarray(fs.tokens_padded), fs.lengths)):
    for p in range(n):
      intruder = np.array(tokens[:n], np.int64)
      intruder[p] = 9   # outside the alphabet: the intruder is no f-gram
      rows.append(intruder)
      target_hi.append(m.key_hi_M[key_at[gid]])
      target_lo.append(m.key_lo_M[key_at[gid]])
      length.append(n)
      want.append(int(fs.match(intruder)[0][-1]))
  assert sorted(set(length)) == list(range(2, k + 1))
  ctx, doc_len = device_match.window(rows, k)
  length_B = np.array(length)
  target_hi, target_lo = np.array(target_hi, np.uint32), np.array(target_lo, np.uint32)

  def hook(q_hi, q_lo):
    forced = (jnp.arange(2, k + 1)[None, :] == length_B[:, None])
    return (jnp.where(forced, target_hi[:, None], q_hi),
            jnp.where(forced, target_lo[:, None], q_lo))

  from scone_jax import export_reader  # pylint: disable=g-import-not-at-top
  storage = 'host' if host else 'device'
  arrays = export_reader.place_matcher(m, storage)
  take = export_reader.host_take if host else None
  got = jax.jit(lambda a, c, d: device_match.match_last(a, c, d, take=take, keys_hook=hook))(
      arrays, ctx, doc_len)
  np.testing.assert_array_equal(np.asarray(got), want)
  # The hook did force collisions: without the token check each row would pick g itself.
  assert (np.asarray(want) != np.repeat(np.arange(len(fs)), fs.lengths)).all()


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
