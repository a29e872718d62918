"""Tests of scone_jax.fgrams against the brute-force references of tests/reference.py."""
import os
import pickle

import numpy as np
import pytest
from reference import reference_extract
from reference import reference_match

from scone_jax import fgrams
from scone_jax.fgrams import extraction


def as_list(s):
  return [(s.ngram(i), int(s.counts[i])) for i in range(len(s))]


def random_corpus(rng, num_docs, max_doc_len, vocab, repetitive=False, big_ids=False):
  docs = []
  motifs = [rng.integers(0, vocab, rng.integers(2, 7)) for _ in range(5)]
  # An order-preserving spread of ids up to 2**31 - 1, shared by all documents.
  spread = np.sort(rng.choice(2**31 - 1, size=vocab, replace=False))
  spread[-1] = 2**31 - 1
  for _ in range(num_docs):
    n = int(rng.integers(0, max_doc_len + 1))
    if repetitive and n:
      parts, total = [], 0
      while total < n:
        p = motifs[rng.integers(len(motifs))] if rng.random() < 0.6 else rng.integers(
            0, vocab, rng.integers(1, 4))
        parts.append(p)
        total += len(p)
      doc = np.concatenate(parts)[:n]
    else:
      doc = rng.integers(0, vocab, n)
    if big_ids:
      doc = spread[doc]
    docs.append(doc.astype(np.int64 if big_ids else np.int32))
  return docs


CASES = [
    # seed, num_docs, max_doc_len, vocab, max_len, min_count, num_fgrams, repetitive, big
    (0, 20, 60, 3, 2, 1, 10_000, False, False),
    (1, 20, 60, 4, 5, 2, 50, False, False),
    (2, 30, 80, 5, 8, 2, 10_000, True, False),
    (3, 10, 200, 2, 8, 1, 300, False, False),
    (4, 40, 40, 6, 5, 3, 25, True, True),
    (5, 15, 100, 3, 3, 2, 7, False, True),
    (6, 50, 30, 8, 5, 1, 1, True, False),
    (7, 5, 3, 2, 5, 1, 100, False, False),  # tiny / empty documents
    (8, 60, 50, 10, 4, 2, 40, True, False),
    (9, 25, 120, 4, 6, 4, 10_000, True, True),
]


@pytest.mark.parametrize('case', CASES)
def test_extract_matches_bruteforce(case):
  seed, num_docs, max_doc_len, vocab, max_len, min_count, num_fgrams, rep, big = case
  rng = np.random.default_rng(seed)
  docs = random_corpus(rng, num_docs, max_doc_len, vocab, rep, big)
  got = fgrams.extract(docs, max_len=max_len, min_count=min_count, num_fgrams=num_fgrams,
                       progress=False)
  want = reference_extract(docs, max_len, min_count, num_fgrams)
  assert as_list(got) == want
  assert got.max_len == max_len
  assert got.tokens_padded.dtype == np.int32 and got.lengths.dtype == np.int32
  assert got.counts.dtype == np.int64


def test_extract_many_random_corpora():
  rng = np.random.default_rng(123)
  for trial in range(40):
    vocab = int(rng.integers(2, 12))
    max_len = int(rng.integers(2, 9))
    min_count = int(rng.integers(1, 4))
    num_fgrams = int(rng.integers(1, 200))
    docs = random_corpus(rng, int(rng.integers(0, 12)), int(rng.integers(0, 60)), vocab,
                         repetitive=bool(trial % 2), big_ids=trial % 5 == 0)
    got = fgrams.extract(docs, max_len=max_len, min_count=min_count, num_fgrams=num_fgrams,
                         progress=False)
    assert as_list(got) == reference_extract(docs, max_len, min_count, num_fgrams), trial


def test_extract_wide_key_fallback(monkeypatch):
  monkeypatch.setattr(extraction, '_WIDE_KEY_LIMIT', 10)
  rng = np.random.default_rng(7)
  docs = random_corpus(rng, 30, 80, 5, repetitive=True)
  got = fgrams.extract(docs, max_len=6, min_count=2, num_fgrams=500, progress=False)
  assert as_list(got) == reference_extract(docs, 6, 2, 500)


def test_extract_small_chunks_and_generator(monkeypatch):
  monkeypatch.setattr(extraction, '_CHUNK_TOKENS', 7)
  rng = np.random.default_rng(8)
  docs = random_corpus(rng, 40, 30, 4, repetitive=True)
  got = fgrams.extract((d for d in docs), max_len=4, min_count=2, num_fgrams=100,
                       progress=False)
  assert as_list(got) == reference_extract(docs, 4, 2, 100)


def test_extract_never_crosses_documents():
  docs = [np.array([1, 2]), np.array([3, 4]), np.array([2, 3])]
  got = fgrams.extract(docs, max_len=3, min_count=1, num_fgrams=100, progress=False)
  assert sorted(g for g, _ in as_list(got)) == [(1, 2), (2, 3), (3, 4)]


def test_extract_empty_inputs():
  for docs in ([], [np.array([], np.int32)], [np.array([5])], [np.array([1, 2])]):
    got = fgrams.extract(docs, max_len=5, min_count=2, num_fgrams=10, progress=False)
    assert len(got) == 0
    ids, lens = got.match(np.array([1, 2, 1, 2]))
    assert (ids == -1).all() and (lens == 1).all()


@pytest.mark.parametrize('kwargs,needle', [
    (dict(max_len=1, min_count=1, num_fgrams=1), 'max_len'),
    (dict(max_len=5, min_count=0, num_fgrams=1), 'min_count'),
    (dict(max_len=5, min_count=1, num_fgrams=0), 'num_fgrams'),
])
def test_extract_rejects_bad_settings(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    fgrams.extract([np.array([1, 2, 3])], **kwargs)


@pytest.mark.parametrize('docs,needle', [
    ([np.array([1, -2, 3])], 'negative'),
    ([np.array([1, 2**31])], r'\[0, 2147483647\]'),
    ([np.array([1.0, 2.0])], 'integer'),
    ([np.array([[1, 2]])], '1-D'),
    (np.array([1, 2, 3]), 'iterable of documents'),
])
def test_extract_rejects_bad_documents(docs, needle):
  with pytest.raises(ValueError, match=needle):
    fgrams.extract(docs, max_len=3, min_count=1, num_fgrams=5, progress=False)


# ---------------------------------------------------------------------------
# select_top


def test_select_top_matches_sorting_all():
  rng = np.random.default_rng(11)
  for _ in range(30):
    k = int(rng.integers(2, 7))
    grams = set()
    while len(grams) < int(rng.integers(1, 300)):
      n = int(rng.integers(2, k + 1))
      grams.add(tuple(int(t) for t in rng.integers(0, 4, n)))
    grams = sorted(grams)
    counts = rng.integers(1, 4, len(grams))  # many ties
    rows = np.full((len(grams), k), -1, np.int64)
    for i, g in enumerate(grams):
      rows[i, :len(g)] = g
    perm = rng.permutation(len(grams))
    s = int(rng.integers(1, len(grams) + 5))
    got = fgrams.select_top(rows[perm], counts[perm], max_len=k, num_fgrams=s)
    want = sorted(zip(grams, counts.tolist()), key=lambda gc: (-gc[1], gc[0]))[:s]
    assert as_list(got) == want


def test_select_top_rejects_bad_rows():
  with pytest.raises(ValueError, match='padding -1'):
    fgrams.select_top(np.array([[1, -1, 2]]), np.array([3]), max_len=3, num_fgrams=1)
  with pytest.raises(ValueError, match='lengths'):
    fgrams.select_top(np.array([[1, -1, -1]]), np.array([3]), max_len=3, num_fgrams=1)
  with pytest.raises(ValueError, match='max_len=4'):
    fgrams.select_top(np.array([[1, 2, -1]]), np.array([3]), max_len=4, num_fgrams=1)


# ---------------------------------------------------------------------------
# Matching


def _set_and_corpus(seed, vocab=5, max_len=5, num_fgrams=60):
  rng = np.random.default_rng(seed)
  docs = random_corpus(rng, 30, 80, vocab, repetitive=True)
  s = fgrams.extract(docs, max_len=max_len, min_count=2, num_fgrams=num_fgrams,
                     progress=False)
  return rng, docs, s


@pytest.mark.parametrize('seed,max_len,num_fgrams', [(0, 5, 60), (1, 2, 10), (2, 8, 400),
                                                      (3, 5, 1), (4, 3, 10_000)])
def test_match_matches_bruteforce(seed, max_len, num_fgrams):
  rng, docs, s = _set_and_corpus(seed, max_len=max_len, num_fgrams=num_fgrams)
  lookup = {s.ngram(i): i for i in range(len(s))}
  tests = docs[:10] + [rng.integers(0, 6, 500), np.array([], np.int32), np.array([1])]
  for doc in tests:
    want = reference_match(doc, lookup, max_len)
    for dtype in (np.int32, np.int64, np.uint16):
      ids, lens = s.match(doc.astype(dtype))
      assert ids.dtype == np.int32 and lens.dtype == np.int32
      np.testing.assert_array_equal(ids, want[0])
      np.testing.assert_array_equal(lens, want[1])


def test_match_with_big_token_ids_and_hand_made_set():
  big = 2**31 - 1
  s = fgrams.FGramSet.from_ngrams([(big, 0), (7, big, 0), (0, big), (3, 4, 5, 6)],
                                  counts=[9, 8, 7, 6], max_len=4)
  lookup = {s.ngram(i): i for i in range(len(s))}
  doc = np.array([7, big, 0, big, 0, 3, 4, 5, 6, 4, 5, 6, big], np.int64)
  want = reference_match(doc, lookup, 4)
  np.testing.assert_array_equal(s.match(doc)[0], want[0])
  np.testing.assert_array_equal(s.match(doc)[1], want[1])
  # Ids that only agree modulo 2**32 must not match.
  ids, _ = s.match(np.array([7, big + 2**32, 0], np.int64))
  assert (ids == -1).all()
  assert s.index((3, 4, 5, 6)) == 3 and s.index((4, 5, 6)) == -1 and s.index((1,)) == -1


def test_match_flat_and_many_do_not_cross_documents():
  rng, docs, s = _set_and_corpus(5)
  lookup = {s.ngram(i): i for i in range(len(s))}
  docs = docs[:12] + [np.array([], np.int32)]
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  ids, lens = s.match_flat(np.concatenate(docs), offsets)
  many = s.match_many(docs)
  for d, doc in enumerate(docs):
    want = reference_match(doc, lookup, s.max_len)
    np.testing.assert_array_equal(ids[offsets[d]:offsets[d + 1]], want[0])
    np.testing.assert_array_equal(lens[offsets[d]:offsets[d + 1]], want[1])
    np.testing.assert_array_equal(many[d][0], want[0])
    np.testing.assert_array_equal(many[d][1], want[1])
  with pytest.raises(ValueError, match='offsets'):
    s.match_flat(np.arange(5), np.array([0, 3]))


def test_match_last_and_batch_agree_with_match():
  rng, docs, s = _set_and_corpus(6, max_len=5)
  k = s.max_len + 2  # wider than max_len: the extra columns must be ignored
  for doc in docs[:8]:
    ids, lens = s.match(doc)
    ctx = np.full((len(doc), k), 12345, np.int32)  # garbage before the document start
    valid = np.zeros(len(doc), np.int64)
    for i in range(len(doc)):
      window = doc[max(0, i - s.max_len + 1):i + 1]
      assert s.match_last(window) == (ids[i], lens[i])
      assert s.match_last(list(window)) == (ids[i], lens[i])
      w = doc[max(0, i - k + 1):i + 1]
      ctx[i, k - len(w):] = w
      valid[i] = rng.integers(len(w), len(w) + 3) if len(w) < k else len(w)
    got_ids, got_lens = s.match_last_batch(ctx, valid)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_lens, lens)
  # valid trims the context: garbage inside the row but outside the document is not used.
  g = s.ngram(0)
  ctx = np.array([list(g)], np.int32)
  assert s.match_last_batch(ctx, np.array([len(g)]))[0][0] == 0
  assert s.match_last_batch(ctx, np.array([1]))[0][0] == -1
  assert s.match_last_batch(ctx, np.array([0])) == (np.array([-1]), np.array([1]))
  assert s.match_last(np.array([], np.int32)) == (-1, 1)


def _decode_ids(s, docs, num_rows, max_len, seed):
  """The f-gram ids `fgrams.advance_matches` gives when rows decode `docs` one token per step.

  Row b decodes documents b, b + num_rows, ... one after the other; a document starts by
  setting the row's length and position to 0, leaving the previous document's tokens in the
  row (they must not be used). Also checks the token / position / valid columns and the
  gather: matched rows get their f-gram's row, the others keep what they held.
  """
  rng = np.random.default_rng(seed)
  k = s.max_len
  t = s.table
  rows_SxW = rng.integers(0, 2**32, (len(s), 3), dtype=np.uint32)
  queues = [[(d, i) for d in range(b, len(docs), num_rows) for i in range(len(docs[d]))]
            for b in range(num_rows)]
  state_BxC = np.zeros((num_rows, k + 2), np.int64)
  ints_Bx4 = np.zeros((num_rows, 4), np.int32)
  got = [np.full(len(doc), -2, np.int64) for doc in docs]
  for step in range(max([len(q) for q in queues] + [0])):
    new_B = rng.integers(0, 100, num_rows)  # idle rows decode noise, never read
    for b, q in enumerate(queues):
      if step < len(q):
        d, i = q[step]
        new_B[b] = docs[d][i]
        if i == 0:
          state_BxC[b, k:] = 0
    before_BxW = rng.integers(0, 2**32, (num_rows, 3), dtype=np.uint32)
    out_BxW = before_BxW.copy()
    fgrams.advance_matches(state_BxC, new_B, t.flat, t.width, t.shift, max_len, rows_SxW,
                           out_BxW, ints_Bx4)
    np.testing.assert_array_equal(ints_Bx4[:, 0], new_B)
    np.testing.assert_array_equal(ints_Bx4[:, 3], 1)
    fid_B = ints_Bx4[:, 2]
    np.testing.assert_array_equal(out_BxW[fid_B < 0], before_BxW[fid_B < 0])
    np.testing.assert_array_equal(out_BxW[fid_B >= 0], rows_SxW[fid_B[fid_B >= 0]])
    for b, q in enumerate(queues):
      if step < len(q):
        d, i = q[step]
        assert ints_Bx4[b, 1] == i
        got[d][i] = fid_B[b]
  return np.concatenate(got + [np.zeros(0, np.int64)])


@pytest.mark.parametrize('seed,max_len,num_rows', [(0, 2, 1), (1, 3, 3), (2, 5, 4),
                                                   (3, 8, 2), (4, 5, 7)])
def test_advance_matches_equals_batch_matching(seed, max_len, num_rows):
  rng = np.random.default_rng(seed)
  docs = random_corpus(rng, 25, 60, 4, repetitive=True, big_ids=seed % 2 == 1)
  big = fgrams.MAX_TOKEN
  docs += [np.array([big, big, 0, big, big, 0, big], np.int64)] * 2  # ids up to the max
  s = fgrams.extract(docs, max_len=max_len, min_count=2, num_fgrams=200, progress=False)
  assert any(big in s.ngram(i) for i in range(len(s)))
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  want, _ = s.match_flat(np.concatenate(docs), offsets)
  assert (want >= 0).any() and (want < 0).any()
  np.testing.assert_array_equal(_decode_ids(s, docs, num_rows, max_len, seed), want)
  # Streams with no match: tokens in no f-gram, and max_len 0 (no matching).
  stream = [rng.integers(big - 5, big, int(rng.integers(0, 30))) for _ in range(6)]
  assert not np.isin(s.tokens_padded, np.arange(big - 5, big)).any()
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in stream])])
  want, _ = s.match_flat(np.concatenate(stream), offsets)
  assert (want == -1).all()
  np.testing.assert_array_equal(_decode_ids(s, stream, num_rows, max_len, seed), want)
  np.testing.assert_array_equal(_decode_ids(s, docs, num_rows, 0, seed), -1)


# ---------------------------------------------------------------------------
# FGramSet: construction, persistence, fingerprint


def test_accessors_and_padding():
  s = fgrams.FGramSet.from_ngrams([(5, 6, 7), (1, 2)], counts=[4, 3], max_len=4)
  assert len(s) == 2 and s.ngram(0) == (5, 6, 7) and s.ngram(1) == (1, 2)
  np.testing.assert_array_equal(s.tokens_padded, [[5, 6, 7, 0], [1, 2, 0, 0]])
  np.testing.assert_array_equal(s.lengths, [3, 2])
  np.testing.assert_array_equal(s.counts, [4, 3])
  with pytest.raises(ValueError, match='twice'):
    fgrams.FGramSet.from_ngrams([(1, 2), (1, 2)], max_len=2).match([1, 2])


def test_save_load_round_trip_and_fingerprint(tmp_path):
  _, docs, s = _set_and_corpus(9)
  path = tmp_path / 'set.npz'
  s.save(path)
  t = fgrams.FGramSet.load(path)
  assert as_list(t) == as_list(s) and t.max_len == s.max_len
  assert t.fingerprint == s.fingerprint
  assert len(s.fingerprint) == 64 and int(s.fingerprint, 16) >= 0
  doc = np.concatenate(docs[:3])
  np.testing.assert_array_equal(t.match(doc)[0], s.match(doc)[0])
  # Same content elsewhere, other counts, a pickle round trip: same fingerprint.
  t.save(tmp_path / 'other_name')
  u = fgrams.FGramSet(s.tokens_padded, s.lengths, s.counts * 7 + 1, s.max_len)
  assert fgrams.FGramSet.load(tmp_path / 'other_name').fingerprint == s.fingerprint
  assert u.fingerprint == s.fingerprint
  assert pickle.loads(pickle.dumps(s)).fingerprint == s.fingerprint
  # Different order, max_len or content: different fingerprint.
  grams = [s.ngram(i) for i in range(len(s))]
  assert fgrams.FGramSet.from_ngrams(grams[::-1], max_len=s.max_len).fingerprint != (
      s.fingerprint)
  assert fgrams.FGramSet.from_ngrams(grams, max_len=s.max_len + 1).fingerprint != (
      s.fingerprint)
  assert fgrams.FGramSet.from_ngrams(grams[1:], max_len=s.max_len).fingerprint != (
      s.fingerprint)
  # Known value from an independent computation: stable across versions and machines.
  import hashlib  # pylint: disable=g-import-not-at-top
  v = fgrams.FGramSet.from_ngrams([(1, 2), (3, 4, 5)], max_len=3)
  h = hashlib.sha256(b'scone_jax.fgrams' + np.array([3, 2], '<i8').tobytes() +
                     np.array([2, 3], '<i4').tobytes() +
                     np.array([[1, 2, 0], [3, 4, 5]], '<i4').tobytes()).hexdigest()
  assert v.fingerprint == h


def _write_npz(path, **arrays):
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
  s = fgrams.FGramSet.from_ngrams([(1, 2), (3, 4, 5)], counts=[5, 4], max_len=3)
  good = tmp_path / 'good.npz'
  s.save(good)
  blob = good.read_bytes()

  bad = {}
  bad['text.npz'] = b'hello, this is text\n'
  bad['truncated.npz'] = blob[:len(blob) // 2]
  bad['empty.npz'] = b''
  for name, content in bad.items():
    (tmp_path / name).write_bytes(content)
  _write_npz(tmp_path / 'random.npz', a=np.arange(4), b=np.ones(3))
  np.save(tmp_path / 'single.npy', np.arange(3))
  arrays = dict(np.load(good))
  tokens = arrays['tokens_padded'].copy()
  tokens[1, 2] += 1  # still a well-formed set, but not the one the fingerprint names
  edited = dict(arrays, tokens_padded=tokens)
  _write_npz(tmp_path / 'edited.npz', **edited)
  newer = dict(arrays, format_version=np.array(fgrams.FORMAT_VERSION + 1))
  _write_npz(tmp_path / 'newer.npz', **newer)
  nolen = {k: v for k, v in arrays.items() if k != 'lengths'}
  _write_npz(tmp_path / 'nolen.npz', **nolen)
  badpad = dict(arrays, tokens_padded=np.array([[1, 2, 9], [3, 4, 5]], np.int32))
  _write_npz(tmp_path / 'badpad.npz', **badpad)

  expectations = {
      'text.npz': 'not a readable', 'truncated.npz': 'not a readable',
      'empty.npz': 'not a readable', 'random.npz': 'not an FGramSet',
      'single.npy': 'single array', 'edited.npz': 'fingerprint',
      'newer.npz': 'newer', 'nolen.npz': 'lacks', 'badpad.npz': 'damaged',
  }
  for name, needle in expectations.items():
    path = tmp_path / name
    with pytest.raises(ValueError, match=needle) as e:
      fgrams.FGramSet.load(path)
    assert os.fspath(path) in str(e.value), name
  with pytest.raises(FileNotFoundError):
    fgrams.FGramSet.load(tmp_path / 'missing.npz')
  assert as_list(fgrams.FGramSet.load(good)) == as_list(s)


def test_larger_zipf_corpus_extract_and_match():
  rng = np.random.default_rng(21)
  p = 1.0 / np.arange(1, 61) ** 1.2
  docs = [rng.choice(60, size=int(rng.integers(0, 400)), p=p / p.sum()) for _ in range(120)]
  got = fgrams.extract(docs, max_len=5, min_count=2, num_fgrams=3000, progress=False)
  want = reference_extract(docs, 5, 2, 3000)
  assert as_list(got) == want and len(got) == 3000
  lookup = {g: i for i, (g, _) in enumerate(want)}
  for doc in docs[:30]:
    ids, lens = got.match(doc)
    want_ids, want_lens = reference_match(doc, lookup, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(lens, want_lens)
