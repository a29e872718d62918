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


@pytest.mark.parametrize('where', ['device', 'host', 'numpy'])
def test_a_colliding_intruder_is_rejected_at_every_position(where):
  """For every stored f-gram g (every length n = 2..K) and every position p < n: an
  intruder equal to g except at p (a token no f-gram has), whose length-n key is forced to
  be g's (the keys_hook test hook), finds g's entry, and the stored-token check rejects it:
  the match is what the host matcher gives for the intruder. 'host': the matcher's arrays
  sit in host memory, read by export_reader.match_in_step's host gathers; 'numpy': the
  prompt matcher serving runs on the host (match_windows_host), windows shorter than K
  included (an intruder of n < K tokens is a document of n tokens)."""
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
    xp = np if isinstance(q_hi, np.ndarray) else jnp
    forced = (xp.arange(2, k + 1)[None, :] == length_B[:, None])
    return (xp.where(forced, target_hi[:, None], q_hi),
            xp.where(forced, target_lo[:, None], q_lo))

  from scone_jax import export_reader  # pylint: disable=g-import-not-at-top
  if where == 'numpy':
    got = device_match.match_windows_host(m, ctx, doc_len, keys_hook=hook)
  else:
    arrays = export_reader.place_matcher(m, where)
    take = export_reader.host_take if where == 'host' else None
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


@pytest.mark.parametrize('max_len', [2, 3, 5])
def test_host_matcher_equals_fgram_set_match(max_len):
  """HostMatcher (serving's prompt and eval matcher over the step's arrays, no hash table)
  gives FGramSet's ids and lengths: prompts of 0..300 tokens over an alphabet that holds
  token 0, the windows' padding, so a position with less context than K would match on
  padding if the document-length check slipped; most positions of the long prompts have
  competing matches of several lengths. Also many documents at once (no match crosses a
  document start) and right-aligned windows with 0..K+1 valid tokens (packing's
  limit_to_row)."""
  rng = np.random.default_rng(10 + max_len)
  vocab = 4
  fs = _random_set(rng, vocab, {2: 12, 3: 60, 5: 120}[max_len], max_len)
  hm = device_match.HostMatcher(device_match.build(fs), fs)
  assert hm.max_len == fs.max_len and len(hm) == len(fs) and hm.fingerprint == fs.fingerprint
  docs = [rng.integers(0, vocab, n) for n in (0, 1, 2, 3, 4, 5, 7, 40, 300)]
  docs.append(np.zeros(9, np.int64))  # the padding token itself, from the first position
  for doc in docs:
    want_ids, want_lens = fs.match(doc)
    got_ids, got_lens = hm.match(doc)
    np.testing.assert_array_equal(got_ids, want_ids, err_msg=f'{len(doc)} tokens')
    np.testing.assert_array_equal(got_lens, want_lens)
    np.testing.assert_array_equal(hm.match_ids(doc.astype(np.int32)), want_ids)
  if max_len > 2:
    grams = {tuple(g[:n]) for g, n in zip(np.asarray(fs.tokens_padded).tolist(), fs.lengths)}
    doc = docs[-2].tolist()
    several = sum(sum(tuple(doc[i + 1 - n:i + 1]) in grams
                      for n in range(2, min(i + 1, max_len) + 1)) >= 2 for i in range(len(doc)))
    assert several >= 0.3 * len(doc), several
  flat = np.concatenate(docs)
  offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])])
  for got, want in zip(hm.match_flat(flat, offsets), fs.match_flat(flat, offsets)):
    np.testing.assert_array_equal(got, want)
  ctx = rng.integers(0, vocab, (200, max_len))
  valid = rng.integers(0, max_len + 2, 200)
  for got, want in zip(hm.match_last_batch(ctx, valid), fs.match_last_batch(ctx, valid)):
    np.testing.assert_array_equal(got, want)
