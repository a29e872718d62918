"""Input pipelines: prepared splits, packing, the numpy Loader, the seqio path, dedupe.

References here are written independently of scone_jax/packing.py: a per-position dict
matcher (tests/reference.py) and a token-by-token Python packer that follows the rule in
packing.py's docstring.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import reference_extract
from reference import reference_match

from scone_jax import corpus
from scone_jax import packing
from scone_jax import seqio_tasks
from scone_jax import fgrams
from scone_jax import step_batch
from scone_jax import token_shards

SEQ_LEN = 32
MAX_LEN = 4


def _make_fgram_set(ngrams, max_len):
  return fgrams.FGramSet.from_ngrams(ngrams, np.arange(len(ngrams), 0, -1), max_len)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = ['the', 'nation', 'people', 'shall', 'congress', 'of', 'and', 'to', 'peace',
           'war', 'states', 'united', 'government', 'public', 'will', 'our', 'freedom']
  docs = []
  for i in range(14):
    # Lengths from a few tokens to several rows, plus an empty document.
    n = [2, 5, 40, 0, 120, 9, 300, 15, 60, 3, 90, 1, 25, 200][i]
    text = ' '.join(rng.choice(words, n)) if n else ''
    docs.append(corpus.Document(f'd{i}', text + ('.\n\nNext paragraph here.' if i % 3 else '')))
  root = tmp_path_factory.mktemp('data')
  path = str(root / 'tok.model')
  corpus.train_tokenizer([d.text for d in docs] * 3, vocab_size=300, model_type='bpe',
                         model_path=path)
  tok = corpus.Tokenizer(path)
  docs_tokens = [tok.encode(d.text) for d in docs]
  top = reference_extract(docs_tokens, MAX_LEN, min_count=2, num_fgrams=60)
  fgram_set = _make_fgram_set([g for g, _ in top], MAX_LEN)
  return docs, tok, fgram_set, docs_tokens, root


def _reference_rows(docs_tokens, eos, ngrams_index, max_len, seq_len):
  """Token-by-token packing, straight from the rule in packing.py's docstring."""
  stream = []
  for d, toks in enumerate(docs_tokens):
    x = [int(t) for t in toks] + [eos]
    ids, lens = (reference_match(x, ngrams_index, max_len) if ngrams_index is not None
                 else (np.full(len(x), -1), np.ones(len(x))))
    for j in range(len(x)):
      if j == 0:
        stream.append((0, x[0], -1, 1, d))
      else:
        stream.append((x[j - 1], x[j], int(ids[j - 1]), int(lens[j - 1]), d))
  rows = []
  for r in range(0, len(stream), seq_len):
    chunk = stream[r:r + seq_len]
    row = {k: [] for k in packing.BATCH_KEYS}
    seg, pos, prev_doc = 0, 0, None
    for inp, tgt, fid, flen, d in chunk:
      if d != prev_doc:
        seg, pos, prev_doc, seen = seg + 1, 0, d, []
      seen.append(inp)
      if flen > pos + 1:
        # Same visible context as the baseline: only this segment's inputs in this row.
        fid, flen = (int(v[-1]) for v in reference_match(seen, ngrams_index, max_len))
      for k, v in zip(packing.BATCH_KEYS, (inp, tgt, seg, pos, 1, fid, flen)):
        row[k].append(v)
      pos += 1
    for k, v in zip(packing.BATCH_KEYS, (0, 0, 0, 0, 0, -1, 1)):
      row[k] += [v] * (seq_len - len(chunk))
    rows.append({k: np.array(v, np.int32) for k, v in row.items()})
  return rows


def _index_of(fgram_set):
  return {tuple(int(t) for t in fgram_set.tokens_padded[i, :fgram_set.lengths[i]]): i
          for i in range(len(fgram_set))}


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in packing.BATCH_KEYS}


def _assert_batches_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == np.int32, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_prepare_split_tokens_matches_and_cache(setup):
  docs, tok, fgram_set, docs_tokens, root = setup
  cache = str(root / 'cache')
  split = packing.prepare_split(docs, tok, fgram_set, cache_dir=cache, name='t')
  assert split.num_docs == len(docs)
  assert split.num_bytes == sum(len(d.text.encode()) for d in docs)
  index = _index_of(fgram_set)
  for i, toks in enumerate(docs_tokens):
    np.testing.assert_array_equal(split.document(i), toks)
    assert split.document(i, with_eos=True)[-1] == tok.eos_id
    ids, lens = reference_match(split.document(i, with_eos=True), index, MAX_LEN)
    a, b = split.offsets[i], split.offsets[i + 1]
    np.testing.assert_array_equal(split.fgram_ids[a:b], ids)
    np.testing.assert_array_equal(split.fgram_lengths[a:b], lens)
  assert (split.fgram_ids >= 0).mean() > 0.2  # the test set really matches
  files = sorted(os.listdir(cache))
  assert any('tokens' in f for f in files) and any('matched' in f for f in files)
  again = packing.prepare_split(docs, tok, fgram_set, cache_dir=cache, name='t')
  np.testing.assert_array_equal(again.fgram_ids, split.fgram_ids)
  # A different f-gram set is matched afresh (tokens come from the cache).
  other = _make_fgram_set([tuple(docs_tokens[6][:2])], MAX_LEN)
  changed = packing.prepare_split(docs, tok, other, cache_dir=cache, name='t')
  np.testing.assert_array_equal(changed.tokens, split.tokens)
  assert set(np.unique(changed.fgram_ids)) <= {-1, 0}
  base = packing.prepare_split(docs, tok, None, cache_dir=cache, name='t')
  assert (base.fgram_ids == -1).all() and (base.fgram_lengths == 1).all()


@pytest.mark.parametrize('with_fgrams,seq_len', [(True, SEQ_LEN), (False, SEQ_LEN), (True, 5)])
def test_eval_batches_equal_reference_packing(setup, with_fgrams, seq_len):
  docs, tok, fgram_set, docs_tokens, _ = setup
  fs = fgram_set if with_fgrams else None
  split = packing.prepare_split(docs, tok, fs)
  ref = _reference_rows(docs_tokens, tok.eos_id, _index_of(fs) if fs else None, MAX_LEN,
                        seq_len)
  if seq_len == 5:
    # The case a packer gets wrong: a document ending exactly at a row's end.
    assert any(r['inputs'][0] == packing.BOS_ID and r['targets'][0] != 0 for r in ref[1:])
  loader = packing.Loader(split, seq_len=seq_len, batch_size=4, shuffle=False, eval_mode=True)
  assert loader.num_rows == len(ref) and loader.num_batches == -(-len(ref) // 4)
  batches = list(loader)
  assert len(batches) == len(loader)
  got = {k: np.concatenate([b[k] for b in batches]) for k in packing.BATCH_KEYS}
  want = _stack(ref)
  for k in packing.BATCH_KEYS:
    np.testing.assert_array_equal(got[k][:len(ref)], want[k], err_msg=k)
  # The tail of the last batch is padding with loss_mask 0.
  assert (got['loss_mask'][len(ref):] == 0).all() and (got['fgram_ids'][len(ref):] == -1).all()
  assert got['loss_mask'].sum() == loader.num_tokens == sum(len(t) + 1 for t in docs_tokens)
  assert loader.num_bytes == split.num_bytes
  # Iterating again is a fresh pass.
  _assert_batches_equal(next(iter(loader)), batches[0])


def test_loader_shuffle_determinism_and_resume(setup):
  docs, tok, fgram_set, _, _ = setup
  split = packing.prepare_split(docs, tok, fgram_set)
  make = lambda seed=3: packing.Loader(split, seq_len=SEQ_LEN, batch_size=4, seed=seed)
  a, b = make(), make()
  for step in (0, 5, 17):
    _assert_batches_equal(a.batch_at(step), b.batch_at(step))
  assert not np.array_equal(make(4).batch_at(0)['inputs'], a.batch_at(0)['inputs'])
  # Each epoch visits every row once; epochs differ in order.
  rows = a.num_rows
  g = np.concatenate([a.global_rows(s) for s in range(-(-3 * rows // 4))])
  for e in range(3):
    assert sorted(g[e * rows:(e + 1) * rows]) == list(range(rows))
  assert not np.array_equal(g[:rows], g[rows:2 * rows])
  # Uninterrupted vs checkpoint at step k, then restore into a new loader.
  it = iter(make())
  straight = [next(it) for _ in range(12)]
  first = make()
  it = iter(first)
  for _ in range(7):
    next(it)
  state = first.state()
  assert state == {'step': 7}
  resumed = make()
  resumed.restore(state)
  it = iter(resumed)
  for k in range(7, 12):
    _assert_batches_equal(next(it), straight[k])
  _assert_batches_equal(resumed.batch_at(3), straight[3])


@pytest.mark.parametrize('eval_mode', [False, True])
def test_process_slices_concatenate_to_global_batch(setup, eval_mode):
  docs, tok, fgram_set, _, _ = setup
  split = packing.prepare_split(docs, tok, fgram_set)
  kw = dict(seq_len=SEQ_LEN, batch_size=6, seed=1, shuffle=not eval_mode, eval_mode=eval_mode)
  one = packing.Loader(split, **kw)
  parts = [packing.Loader(split, process_index=p, process_count=2, **kw) for p in range(2)]
  steps = range(one.num_batches) if eval_mode else range(0, 40, 7)
  for step in steps:
    whole = one.batch_at(step)
    halves = [p.batch_at(step) for p in parts]
    assert halves[0]['inputs'].shape == (3, SEQ_LEN)
    _assert_batches_equal(whole, {k: np.concatenate([h[k] for h in halves]) for k in whole})
  with pytest.raises(ValueError, match='processes'):
    packing.Loader(split, seq_len=SEQ_LEN, batch_size=5, process_index=0, process_count=2)


@pytest.mark.parametrize('with_fgrams,seq_len', [(True, SEQ_LEN), (False, SEQ_LEN), (True, 5)])
def test_seqio_batches_equal_numpy_batches(setup, with_fgrams, seq_len):
  docs, tok, fgram_set, _, _ = setup
  fs = fgram_set if with_fgrams else None
  name = seqio_tasks.register_document_task(f'test_scone_{with_fgrams}', docs, tok, fs)
  split = packing.prepare_split(docs, tok, fs)
  # Training order (shuffle off) across more than two epochs: rows wrap like Loader's.
  loader = packing.Loader(split, seq_len=seq_len, batch_size=5, shuffle=False)
  steps = 2 * loader.num_rows // 5 + 3
  it = seqio_tasks.seqio_batches(name, seq_len=seq_len, batch_size=5, cache=seq_len == 5)
  for step in range(steps):
    _assert_batches_equal(next(it), loader.batch_at(step))
  # Eval: one pass, last batch padded; and a process's slice.
  ev = packing.Loader(split, seq_len=seq_len, batch_size=4, shuffle=False, eval_mode=True,
                   process_index=1, process_count=2)
  got = list(seqio_tasks.seqio_batches(name, seq_len=seq_len, batch_size=4, eval_mode=True,
                                process_index=1, process_count=2))
  assert len(got) == len(ev)
  for a, b in zip(got, ev):
    _assert_batches_equal(a, b)


@pytest.fixture(scope='module')
def shard_dirs(setup):
  """The fixture's documents as token shards, in 1 and in 3 files."""
  docs, tok, _, _, root = setup
  out = {}
  for n in (1, 3):
    out[n] = str(root / f'shards-{n}')
    token_shards.write_shards(docs, tok, out[n], num_shards=n)
  return out


@pytest.mark.parametrize('num_shards,with_fgrams', [(1, True), (1, False), (3, True),
                                                    (3, False)])
def test_seqio_shard_task_rows_equal_token_shards(setup, shard_dirs, num_shards, with_fgrams):
  """The file-based seqio Task and the TF-free TokenShards build the same rows."""
  import seqio  # pylint: disable=g-import-not-at-top
  _, tok, fgram_set, docs_tokens, _ = setup
  fs = fgram_set if with_fgrams else None
  directory = shard_dirs[num_shards]
  # Chunks shorter than most documents: documents are stitched across reads.
  name = seqio_tasks.register_shard_task(f'test_shards_{num_shards}_{with_fgrams}', directory,
                                         fs, tok, chunk_tokens=8)
  shards = token_shards.TokenShards(directory, fs)
  # One example per document, its single EOS included, in stream (shard) order.
  ds = seqio.get_mixture_or_task(name).get_dataset(sequence_length=None, shuffle=False,
                                                   trim_output_features=False)
  got_docs = [ex['targets'] for ex in ds.as_numpy_iterator()]
  want_docs = list(shards.documents())
  assert len(got_docs) == len(want_docs) == len(docs_tokens)
  for a, b in zip(got_docs, want_docs):
    np.testing.assert_array_equal(a, b)
  for seq_len in (SEQ_LEN, 5, 7):
    got = list(seqio_tasks.seqio_batches(name, seq_len=seq_len, batch_size=4, eval_mode=True))
    ev = packing.Loader(shards, seq_len=seq_len, batch_size=4, shuffle=False, eval_mode=True)
    assert len(got) == len(ev)
    for a, b in zip(got, ev):
      _assert_batches_equal(a, b)
    rows = {k: np.concatenate([b[k] for b in got])[:ev.num_rows] for k in packing.BATCH_KEYS}
    _assert_batches_equal(rows, shards.rows(np.arange(ev.num_rows), seq_len))
    # Every token is a target once: no second EOS was appended.
    assert rows['loss_mask'].sum() == shards.num_tokens == sum(len(t) + 1 for t in docs_tokens)
    assert (rows['fgram_ids'] >= 0).any() == with_fgrams
  # Training order (shuffle off), wrapping past the end like Loader's.
  loader = packing.Loader(shards, seq_len=5, batch_size=5, shuffle=False)
  it = seqio_tasks.seqio_batches(name, seq_len=5, batch_size=5)
  for step in range(loader.num_rows // 5 + 3):
    _assert_batches_equal(next(it), loader.batch_at(step))


def test_shard_task_from_a_fgram_set_path_and_a_wrong_tokenizer(setup, shard_dirs, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  _, tok, fgram_set, _, _ = setup
  path = str(tmp_path / 'fgrams.npz')
  fgram_set.save(path)
  name = seqio_tasks.register_shard_task('test_shards_path', shard_dirs[3], path, tok)
  task = seqio.get_mixture_or_task(name)
  assert seqio_tasks.task_fgram_set(task).fingerprint == fgram_set.fingerprint
  other_path = corpus.train_tokenizer(['something else entirely'] * 50, vocab_size=300,
                                      model_type='bpe', model_path=str(tmp_path / 'o.model'))
  with pytest.raises(ValueError, match='tokenized with tokenizer'):
    seqio_tasks.register_shard_task('test_shards_bad', shard_dirs[3], None,
                                    corpus.Tokenizer(other_path))


@pytest.mark.slow
def test_seqio_cache_tool_runs_on_the_shard_task(setup, shard_dirs, tmp_path):
  """seqio's cache_tasks_main, pointed at this module, caches the shard Task's documents;
  the cached Task packs them (in the tool's shuffled order) into the numpy Loader's rows."""
  import shutil  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  _, tok, fgram_set, _, _ = setup
  workdir = tmp_path / 'run'
  workdir.mkdir()
  shutil.copy(tok.path, workdir / artifacts.TOKENIZER_FILE)
  fgram_set.save(str(workdir / artifacts.FGRAMS_FILE))
  env = dict(os.environ, SCONE_SEQIO_WORKDIR=str(workdir), SCONE_SEQIO_SHARDS=shard_dirs[3],
             SCONE_SEQIO_TASK='test_cached_shards',
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cache = str(tmp_path / 'cache')
  subprocess.run([sys.executable, '-m', 'seqio.scripts.cache_tasks_main',
                  '--module_import=scone_jax.seqio_tasks', '--tasks=test_cached_shards',
                  f'--output_cache_dir={cache}', '--min_shards=0'], env=env, check=True,
                 timeout=600)
  name = seqio_tasks.register_from_env({k: env[k] for k in env if k.startswith('SCONE_')})
  assert name == 'test_cached_shards'
  before = seqio.utils.get_global_cache_dirs()
  seqio.add_global_cache_dirs([cache])
  try:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=None, shuffle=False, trim_output_features=False,
                          use_cached=True)
    cached = [ex['targets'].astype(np.int32) for ex in ds.as_numpy_iterator()]
    got = list(seqio_tasks.seqio_batches(name, seq_len=SEQ_LEN, batch_size=4, eval_mode=True,
                                         use_cached=True))
  finally:
    seqio.utils.set_global_cache_dirs(before)
  shards = token_shards.TokenShards(shard_dirs[3])
  assert sorted(map(tuple, cached)) == sorted(map(tuple, shards.documents()))
  # F-grams are matched after the cache: packing the cached order gives the same rows.
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in cached])]).astype(np.int64)
  tokens = np.concatenate(cached)
  ids, lens = packing.match_split(tokens, offsets, fgram_set)
  split = packing.PreparedSplit(tokens, offsets, ids, lens, 0, tok.fingerprint,
                                fgram_set.fingerprint, fgram_set)
  ev = packing.Loader(split, seq_len=SEQ_LEN, batch_size=4, shuffle=False, eval_mode=True)
  assert len(got) == len(ev)
  for a, b in zip(got, ev):
    _assert_batches_equal(a, b)


def test_register_tasks_for_a_config(setup, tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  docs, tok, fgram_set, _, _ = setup
  (tmp_path / 'train.txt').write_text('\n\n'.join(d.text for d in docs if d.text))
  from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({'corpus': config_lib.default_config().corpus.to_dict()})
  cfg.corpus.update({'name': 'text', 'train_files': str(tmp_path / 'train.txt'),
                     'eval_files': '', 'heldout_fraction': 0.2, 'max_docs': 0})
  train_task, held_task = seqio_tasks.register_tasks(cfg, tok, fgram_set)
  assert train_task != held_task
  held_docs = corpus.load_documents(cfg.corpus, 'heldout')
  ev = packing.Loader(packing.prepare_split(held_docs, tok, fgram_set), seq_len=SEQ_LEN,
                   batch_size=2, shuffle=False, eval_mode=True)
  got = list(seqio_tasks.seqio_batches(held_task, seq_len=SEQ_LEN, batch_size=2, eval_mode=True))
  assert len(got) == len(ev)
  for a, b in zip(got, ev):
    _assert_batches_equal(a, b)


@pytest.mark.parametrize('dedupe', [True, False])
def test_dedupe_fgrams(setup, dedupe):
  docs, tok, fgram_set, _, _ = setup
  split = packing.prepare_split(docs, tok, fgram_set)
  batch = packing.Loader(split, seq_len=SEQ_LEN, batch_size=8, seed=0).batch_at(2)
  ids = batch['fgram_ids']
  matched = ids >= 0
  assert matched.any()
  pack_len, bucket = 9, 4
  out = step_batch.dedupe_fgrams(batch, fgram_set, pack_len=pack_len, bucket=bucket,
                                 dedupe=dedupe)
  for k in packing.BATCH_KEYS:
    np.testing.assert_array_equal(out[k], batch[k])
  toks, pos, index = out['fgram_tokens'], out['fgram_positions'], out['fgram_index']
  assert toks.dtype == pos.dtype == index.dtype == np.int32
  assert toks.shape == pos.shape and toks.shape[1] == pack_len and index.shape == ids.shape
  assert toks.shape[0] % bucket == 0
  n_unique = len(set(ids[matched].tolist()))
  assert int(out['fgram_num_unique']) == n_unique
  windows = n_unique if dedupe else int(matched.sum())
  assert len(set(index[matched].tolist())) == windows
  assert ((index >= 0) == matched).all()
  # Each position's slot is the last token of its f-gram's window, whole in one row,
  # positions 0..n-1.
  lens = batch['fgram_lengths'][matched]
  last = index[matched]
  assert ((last - lens + 1) // pack_len == last // pack_len).all()
  for j in range(fgram_set.max_len):
    has = lens > j
    slot = (last - lens + 1 + j)[has]
    np.testing.assert_array_equal(toks.reshape(-1)[slot],
                                  fgram_set.tokens_padded[ids[matched][has], j])
    np.testing.assert_array_equal(pos.reshape(-1)[slot], j)
  # Windows do not overlap; every other slot is unused (token 0, position 0).
  used = np.zeros(toks.size, bool)
  firsts = np.unique(last - lens + 1)
  useful = int(out['fgram_useful'])
  assert (pos.reshape(-1)[firsts] == 0).all() and (pos > 0).sum() == useful - windows
  for f in firsts:
    n = int(lens[(last - lens + 1) == f][0])
    assert not used[f:f + n].any()
    used[f:f + n] = True
  assert used.sum() == useful
  assert (toks.reshape(-1)[~used] == 0).all() and (pos.reshape(-1)[~used] == 0).all()
  # Next-fit packing wastes fewer than max_len slots a row; then one bucket at most.
  rows_needed = -(-useful // (pack_len - fgram_set.max_len + 1))
  assert toks.shape[0] < rows_needed + bucket
  empty = dict(batch, fgram_ids=np.full_like(ids, -1))
  assert step_batch.dedupe_fgrams(empty, fgram_set, pack_len=pack_len,
                                  bucket=bucket)['fgram_tokens'].shape == (bucket, pack_len)


@pytest.mark.parametrize('pack_len', [5, 8, 16, 33])
def test_pack_windows_fills_rows_without_overlap(pack_len):
  rng = np.random.default_rng(pack_len)
  lengths = rng.integers(2, 6, size=500)
  row, start, num_rows = step_batch.pack_windows(lengths, pack_len)
  assert ((start >= 0) & (start + lengths <= pack_len) & (row < num_rows)).all()
  slots = np.concatenate([r * pack_len + s + np.arange(n) for r, s, n in zip(row, start, lengths)])
  assert len(np.unique(slots)) == lengths.sum()
  assert num_rows <= -(-lengths.sum() // (pack_len - lengths.max() + 1))
  assert step_batch.pack_windows(np.zeros(0, np.int32), pack_len)[2] == 0
  with pytest.raises(ValueError, match='pack_len'):
    step_batch.pack_windows([pack_len + 1], pack_len)


def test_sotu_smoke(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({'name': 'sotu', 'train_files': '', 'eval_files': '',
                                   'heldout_fraction': 0.05, 'max_docs': 2,
                                   'decode_errors': 'strict'})
  docs = corpus.load_documents(cfg, 'train')
  assert len(docs) == 2
  path = corpus.train_tokenizer([d.text for d in docs], vocab_size=400, model_type='bpe',
                                model_path=str(tmp_path / 'tok.model'))
  tok = corpus.Tokenizer(path)
  split = packing.prepare_split(docs, tok, None, cache_dir=str(tmp_path / 'cache'))
  loader = packing.Loader(split, seq_len=64, batch_size=4, seed=0)
  batch = loader.batch_at(0)
  assert batch['inputs'].shape == (4, 64) and batch['loss_mask'].all()
  # Targets are the next tokens of the inputs inside each segment.
  same = batch['segment_ids'][:, 1:] == batch['segment_ids'][:, :-1]
  np.testing.assert_array_equal(batch['inputs'][:, 1:][same], batch['targets'][:, :-1][same])


def test_rows_use_only_visible_tokens(setup):
  """Rule 4b: a row continuing a document gets no f-gram reaching back before the row."""
  docs, tok, fgram_set, docs_tokens, _ = setup
  split = packing.prepare_split(docs, tok, fgram_set)
  seq_len = 5
  loader = packing.Loader(split, seq_len=seq_len, batch_size=4, shuffle=False, eval_mode=True)
  got = {k: np.concatenate([b[k] for b in loader]) for k in packing.BATCH_KEYS}
  assert (got['fgram_lengths'] <= got['positions'] + 1).all()
  # The uncapped stream would have reached back at some row starts: the cap did something.
  stream_lens = np.concatenate([[1], split.fgram_lengths[:-1]])
  rows = -(-len(stream_lens) // seq_len)
  padded = np.ones(rows * seq_len, np.int32)
  padded[:len(stream_lens)] = stream_lens
  first_cols = padded.reshape(rows, seq_len)[:, 0]
  continuing = got['segment_ids'][:rows, 0] == 1
  assert ((first_cols > 1) & continuing).any()
  assert (got['fgram_ids'][:rows, 0][got['inputs'][:rows, 0] != packing.BOS_ID] == -1).all()
