"""fgrams.MatchSampling (training's remedies, issue 29) against brute-force references."""
import itertools

import numpy as np
import pytest

from scone_jax import fgrams

K = 4


def _competing_set():
  """Every 2-gram over 4 tokens, every 3-gram over 3 and every 4-gram over 2, in a shuffled
  id order: most positions of a stream over those tokens end 2 or 3 f-grams of different
  lengths, and the id says nothing about the length."""
  grams = [g for n, v in ((2, 4), (3, 3), (4, 2)) for g in itertools.product(range(v), repeat=n)]
  order = np.random.default_rng(7).permutation(len(grams))
  return fgrams.FGramSet.from_ngrams([grams[i] for i in order], max_len=K)


def _stream(rng, num_segments, seg_len, vocab=4):
  """Tokens (mostly 0..2, so long f-grams end often) and segment offsets of random lengths."""
  tokens = np.minimum(rng.integers(0, vocab + 2, num_segments * seg_len), vocab - 1)
  tokens = np.where(rng.random(tokens.size) < 0.5, tokens % 2, tokens).astype(np.int32)
  cuts = np.sort(rng.choice(np.arange(1, tokens.size), num_segments - 1, replace=False))
  return tokens, np.concatenate([[0], cuts, [tokens.size]]).astype(np.int64)


def _candidates(fs, tokens, offsets):
  """Per position, the f-grams ending there within its segment, shortest first (brute force)."""
  ids = {fs.ngram(i): i for i in range(len(fs))}
  out = []
  for d in range(offsets.size - 1):
    seg = tokens[offsets[d]:offsets[d + 1]].tolist()
    for i in range(len(seg)):
      out.append([ids[g] for n in range(2, min(K, i + 1) + 1)
                  if (g := tuple(seg[i - n + 1:i + 1])) in ids])
  return out


def _segment_of(offsets):
  return np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


@pytest.mark.parametrize('seed', [0, 3])
def test_whole_set_and_no_drops_match_exactly_as_today(seed):
  rng = np.random.default_rng(seed)
  fs = _competing_set()
  tokens, offsets = _stream(rng, 40, 300)
  keys = rng.integers(-1, 1 << 40, offsets.size - 1)
  want_ids, want_lens = fs.match_flat(tokens, offsets)
  got_ids, got_lens = fgrams.MatchSampling(seed=seed).match_flat(fs, tokens, offsets, keys)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got_lens, want_lens)
  assert (want_lens >= 3).mean() > 0.3  # the set competes: many positions end a long f-gram


def test_subset_takes_the_longest_active_fgram():
  rng = np.random.default_rng(1)
  fs = _competing_set()
  tokens, offsets = _stream(rng, 60, 200)
  keys = rng.integers(0, 1 << 40, offsets.size - 1)
  sampling = fgrams.MatchSampling(seed=5, keep_fraction=0.4)
  ids, lens = sampling.match_flat(fs, tokens, offsets, keys)
  active_DxS = sampling.active(keys, len(fs))
  assert abs(active_DxS.mean() - 0.4) < 0.03
  seg = _segment_of(offsets)
  chosen_by_segment = [set(ids[seg == d].tolist()) - {-1} for d in range(offsets.size - 1)]
  for i, cands in enumerate(_candidates(fs, tokens, offsets)):
    d = seg[i]
    on = [c for c in cands if active_DxS[d, c]]
    want = on[-1] if on else -1
    assert ids[i] == want, (i, cands, on)
    assert lens[i] == (len(fs.ngram(want)) if want >= 0 else 1)
    # Without the mask: an f-gram used anywhere in the segment is active there, so none
    # longer than the chosen one at this position may be used in the segment.
    longer = cands[cands.index(want) + 1:] if want >= 0 else cands
    assert not set(longer) & chosen_by_segment[d], (i, cands, want)
  # The subset differs between segments (rows) and between seeds.
  assert (active_DxS[0] != active_DxS[1]).any()
  other = fgrams.MatchSampling(seed=6, keep_fraction=0.4).active(keys, len(fs))
  assert (other != active_DxS).mean() > 0.3


def test_shortening_drops_to_shorter_suffixes_at_the_rate_asked():
  rng = np.random.default_rng(2)
  fs = _competing_set()
  tokens, offsets = _stream(rng, 200, 1000)
  keys = np.arange(offsets.size - 1)
  p = 0.3
  ids, lens = fgrams.MatchSampling(seed=0, drop_prob=p).match_flat(fs, tokens, offsets, keys)
  full_ids, full_lens = fs.match_flat(tokens, offsets)
  cands = _candidates(fs, tokens, offsets)
  assert all(ids[i] in c + [-1] for i, c in enumerate(cands))  # a suffix f-gram, or none
  assert (lens <= full_lens).all()
  matched = full_ids >= 0
  num = np.array([len(c) for c in cands])
  # First drop at p; each further one independent at p, so a position ending n f-grams is
  # left unmatched with probability p^n.
  assert abs((ids[matched] != full_ids[matched]).mean() - p) < 0.01
  assert abs((ids[num == 1] == -1).mean() - p) < 0.015
  assert abs((ids[num == 2] == -1).mean() - p * p) < 0.01
  assert min((num == 1).sum(), (num == 2).sum()) > 20_000
  # Deterministic: the same seed and keys give the same ids; another seed or keys differ.
  again, _ = fgrams.MatchSampling(seed=0, drop_prob=p).match_flat(fs, tokens, offsets, keys)
  np.testing.assert_array_equal(again, ids)
  for seed, k in ((1, keys), (0, keys + 1)):
    other, _ = fgrams.MatchSampling(seed=seed, drop_prob=p).match_flat(fs, tokens, offsets, k)
    assert (other != ids).mean() > 0.1


@pytest.mark.parametrize('kwargs, message', [
    ({'keep_fraction': 0.0}, 'keep_fraction=0.0 must be in'),
    ({'keep_fraction': 1.5}, 'keep_fraction=1.5 must be in'),
    ({'drop_prob': 1.0}, 'drop_prob=1.0 must be in'),
    ({'drop_prob': -0.1}, 'drop_prob=-0.1 must be in'),
])
def test_out_of_range_sampling_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fgrams.MatchSampling(seed=0, **kwargs)
