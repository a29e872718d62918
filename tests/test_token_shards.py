"""Token shards: the prepared training split, read back by row with f-grams matched on the fly.

Rows are checked against an independent token-by-token packer (test_data._reference_rows)
over the documents in the shards' order, and against packing.make_rows (the in-memory path).
"""
import os
import threading
import time

import numpy as np
import pytest
import test_data
from test_data import _index_of
from test_data import _reference_rows

from scone_jax import corpus
from scone_jax import packing
from scone_jax import token_shards


setup = test_data.setup   # the corpus, tokenizer and f-gram set of test_data.py


def _shard_order(docs, num_shards):
  key = lambda d: (token_shards.doc_key(d.id) % num_shards, token_shards.doc_key(d.id), d.id)
  return sorted(docs, key=key)


def _assert_rows_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == np.int32, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('num_shards', [1, 3, 16])
@pytest.mark.parametrize('with_fgrams', [False, True])
def test_rows_equal_reference_packing_of_the_shard_order(setup, tmp_path, num_shards,
                                                         with_fgrams):
  docs, tok, fgram_set, _, _ = setup
  fgram_set = fgram_set if with_fgrams else None
  index = token_shards.write_shards(docs, tok, str(tmp_path / 's'), num_shards=num_shards)
  assert index['num_docs'] == len(docs) and index['num_shards'] == num_shards
  # 16 shards for 14 documents: some are empty files, and rows span several shards.
  names = sorted(os.listdir(tmp_path / 's'))
  assert names == ['index.json'] + [token_shards.shard_name(s, num_shards)
                                    for s in range(num_shards)]
  ordered = _shard_order(docs, num_shards)
  shards = token_shards.TokenShards(str(tmp_path / 's'), fgram_set)
  split = packing.prepare_split(ordered, tok, fgram_set)
  assert shards.num_tokens == split.num_tokens == index['num_tokens']
  assert shards.num_bytes == split.num_bytes
  docs_tokens = [tok.encode(d.text) for d in ordered]
  for seq_len in (7, 32, 100):
    n = packing.num_rows(split, seq_len)
    ids = np.arange(-1, n + 2)   # and padding rows on both sides
    got = shards.rows(ids, seq_len)
    _assert_rows_equal(got, packing.make_rows(split, seq_len, ids))
    want = _reference_rows(docs_tokens, tok.eos_id,
                           _index_of(fgram_set) if with_fgrams else None, 4, seq_len)
    _assert_rows_equal({k: v[1:n + 1] for k, v in got.items()},
                       {k: np.stack([r[k] for r in want]) for k in want[0]})
  # Every document comes back whole, in the shards' order.
  got_docs = list(shards.documents())
  assert len(got_docs) == len(docs)
  for want_tokens, doc in zip(docs_tokens, got_docs):
    np.testing.assert_array_equal(doc, list(want_tokens) + [tok.eos_id])


def test_placement_depends_only_on_the_id(setup, tmp_path):
  docs, tok, _, _, _ = setup
  a = token_shards.write_shards(docs, tok, str(tmp_path / 'a'), num_shards=3)
  b = token_shards.write_shards(list(reversed(docs)), tok, str(tmp_path / 'b'), num_shards=3)
  assert a['shard_tokens'] == b['shard_tokens'] and a['docs'] == b['docs']
  for s in range(3):
    name = token_shards.shard_name(s, 3)
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
  assert np.dtype(a['dtype']) == np.dtype('<u2')   # 300 pieces fit in 16 bits


def test_bad_input_fails_in_one_clear_line(setup, tmp_path):
  docs, tok, _, _, _ = setup
  with pytest.raises(ValueError, match="document id 'd1' appears twice"):
    token_shards.write_shards(docs + [docs[1]], tok, str(tmp_path / 'dup'), num_shards=2)
  with pytest.raises(ValueError, match='EOS'):
    token_shards.document_tokens([5, tok.eos_id, 7], tok.eos_id, np.uint16, 'doc x')
  with pytest.raises(FileNotFoundError, match='no prepared token shards'):
    token_shards.TokenShards(str(tmp_path / 'nothing'))
  token_shards.write_shards(docs, tok, str(tmp_path / 'ok'), num_shards=2)
  victim = tmp_path / 'ok' / token_shards.shard_name(1, 2)
  victim.write_bytes(victim.read_bytes()[:-2])
  with pytest.raises(ValueError, match='damaged'):
    token_shards.TokenShards(str(tmp_path / 'ok'))


def test_prepare_reuses_shards_of_the_same_request_only(setup, tmp_path):
  docs, tok, _, _, _ = setup
  loads = []

  def load():
    loads.append(1)
    return docs

  d = str(tmp_path / 's')
  token_shards.prepare(load, tok, d, num_shards=2, request={'corpus': 'x'})
  mtime = os.path.getmtime(os.path.join(d, token_shards.INDEX))
  token_shards.prepare(load, tok, d, num_shards=2, request={'corpus': 'x'})
  assert len(loads) == 1   # reused: the documents were not even read
  assert os.path.getmtime(os.path.join(d, token_shards.INDEX)) == mtime
  token_shards.prepare(load, tok, d, num_shards=3, request={'corpus': 'x', 'n': 3})
  assert len(loads) == 2
  assert token_shards.read_index(d)['num_shards'] == 3


class _CountingShards(token_shards.TokenShards):
  """Counts the tokens read, to prove a process reads only its rows."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.tokens_read = 0

  def read(self, start, stop):
    out = super().read(start, stop)
    self.tokens_read += out.size
    return out


def test_loader_over_shards_prefetch_resume_and_processes(setup, tmp_path):
  docs, tok, fgram_set, _, _ = setup
  token_shards.write_shards(docs, tok, str(tmp_path / 's'), num_shards=3)
  shards = token_shards.TokenShards(str(tmp_path / 's'), fgram_set)
  kw = dict(seq_len=16, batch_size=4, seed=2)
  plain = packing.Loader(shards, **kw)
  ahead = packing.Loader(shards, prefetch=3, workers=2, **kw)
  it_plain, it_ahead = iter(plain), iter(ahead)
  for _ in range(25):   # past one epoch (the stream has ~40 rows of 16)
    _assert_rows_equal(next(it_plain), next(it_ahead))
  assert ahead.state() == {'step': 25}   # batches handed out, not those built ahead
  resumed = packing.Loader(shards, prefetch=2, **kw)
  resumed.restore(ahead.state())
  _assert_rows_equal(next(iter(resumed)), next(it_plain))
  # Two processes: each reads only its half of each global batch.
  counting = [_CountingShards(str(tmp_path / 's'), fgram_set) for _ in range(2)]
  parts = [packing.Loader(c, process_index=p, process_count=2, **kw)
           for p, c in enumerate(counting)]
  for step in range(10):
    whole = plain.batch_at(step)
    halves = [p.batch_at(step) for p in parts]
    _assert_rows_equal(whole, {k: np.concatenate([h[k] for h in halves]) for k in whole})
  for c in counting:   # 10 steps x 2 rows x (16 tokens + the one before)
    assert c.tokens_read <= 10 * 2 * 17


def test_ahead_keeps_order_bounds_the_queue_and_raises():
  started = []
  lock = threading.Lock()

  def slow(x):
    with lock:
      started.append(x)
    time.sleep(0.01 * (x % 3))   # finish out of order
    return x * x

  gen = packing.ahead(slow, range(50), prefetch=4, workers=3)
  for i in range(10):
    assert next(gen) == i * i
    assert len(started) <= i + 1 + 4   # never more than `prefetch` ahead of the consumer
  gen.close()
  assert len(started) <= 15

  def boom(x):
    if x == 5:
      raise OSError('shard unreadable')
    return x

  with pytest.raises(OSError, match='shard unreadable'):
    list(packing.ahead(boom, range(10), prefetch=2, workers=2))
  assert list(packing.ahead(boom, range(5), prefetch=0)) == list(range(5))


def test_large_vocab_uses_32_bit_tokens(tmp_path):

  class Big:
    vocab_size = 70_000
    eos_id = 1
    fingerprint = 'big'

    def encode_batch(self, texts):
      return [np.array([65_000, 69_999, 2 + len(t)]) for t in texts]

  docs = [corpus.Document(f'x{i}', 'a' * i) for i in range(5)]
  index = token_shards.write_shards(docs, Big(), str(tmp_path / 's'), num_shards=2)
  assert np.dtype(index['dtype']) == np.dtype('<u4')
  shards = token_shards.TokenShards(str(tmp_path / 's'))
  got = np.concatenate(list(shards.documents()))
  assert sorted(got.tolist()) == sorted([65_000, 69_999, 1] * 5 + list(range(2, 7)))
