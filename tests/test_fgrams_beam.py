"""The Beam f-gram pipeline gives exactly the in-process FGramSet (and a brute-force count)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import reference_extract
import sentencepiece as spm

from scone_jax import corpus
from scone_jax import fgrams
from scone_jax import fgrams_beam
from scone_jax import tokenizer as tokenizer_lib
from scone_jax.fgrams_beam import filters as beam_filters
from scone_jax.fgrams_beam import readers as beam_readers

# FnApiRunner is the in-process DirectRunner engine; naming it skips the default
# DirectRunner's attempt to fetch the Prism binary (no network here, and it would be
# slow where there is one).
BEAM_ARGS = ['--runner=FnApiRunner', '--direct_num_workers=1',
             '--direct_running_mode=in_memory']


def _as_list(fgram_set):
  return [(tuple(int(t) for t in fgram_set.ngram(i)), int(fgram_set.counts[i]))
          for i in range(len(fgram_set))]


def _assert_same_set(got, want):
  assert _as_list(got) == _as_list(want)
  assert got.max_len == want.max_len
  assert got.fingerprint == want.fingerprint


def _random_corpus(seed=0):
  """Zipf-ish tokens, duplicated documents and planted phrases, so long n-grams repeat."""
  rng = np.random.default_rng(seed)
  phrases = [rng.integers(0, 40, rng.integers(3, 8)) for _ in range(6)]
  docs = []
  for _ in range(60):
    parts = []
    for _ in range(rng.integers(0, 6)):
      if rng.random() < 0.4:
        parts.append(phrases[rng.integers(len(phrases))])
      else:
        parts.append(np.minimum(rng.zipf(1.6, rng.integers(1, 10)), 60) - 1)
    docs.append(np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32))
  docs += [docs[i] for i in rng.integers(0, len(docs), 25)]
  docs += [np.array([7], np.int32), np.zeros(0, np.int32)]  # too short for any f-gram
  return docs


@pytest.fixture(scope='module')
def token_corpus(tmp_path_factory):
  docs = _random_corpus()
  prefix = str(tmp_path_factory.mktemp('tokens') / 'train')
  fgrams_beam.write_token_shards(docs, prefix, num_shards=4)
  return docs, prefix + '-*.npz'


def test_write_token_shards_round_trip(tmp_path):
  docs = [[1, 2, 3], [], [4], [5, 6], [], [7, 8, 9, 10]]
  paths = fgrams_beam.write_token_shards(docs, str(tmp_path / 'x'), num_shards=8)
  assert len(paths) == 8 and all(os.path.exists(p) for p in paths)
  back = []
  for p in paths:
    with np.load(p) as z:
      assert z['tokens'].dtype == np.int32 and z['offsets'].dtype == np.int64
      tokens, offsets = z['tokens'], z['offsets']
    back += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
  assert back == docs


@pytest.mark.parametrize('max_len,min_count', [(2, 1), (2, 3), (5, 1), (5, 3)])
def test_tokens_matches_extract_and_brute_force(token_corpus, tmp_path, max_len, min_count):
  docs, pattern = token_corpus
  ranked = reference_extract(docs, max_len, min_count)
  assert len(ranked) > 20
  for num_fgrams in (len(ranked) + 50, len(ranked) // 3):
    out = str(tmp_path / f'beam_{num_fgrams}.npz')
    got = fgrams_beam.run(input_patterns=[pattern], input_format='tokens', output_path=out,
                          max_len=max_len, min_count=min_count, num_fgrams=num_fgrams,
                          pipeline_args=BEAM_ARGS, num_key_shards=3)
    want = fgrams.extract(docs, max_len=max_len, min_count=min_count,
                          num_fgrams=num_fgrams, progress=False)
    _assert_same_set(got, want)
    assert _as_list(got) == reference_extract(docs, max_len, min_count, num_fgrams)
    _assert_same_set(fgrams.FGramSet.load(out), want)


@pytest.mark.parametrize('bloom_bits_log2', [6, 12])
def test_bloom_filter_is_exact(token_corpus, tmp_path, bloom_bits_log2):
  # 2**6 bits for hundreds of frequent keys: nearly everything slips through the filter,
  # which must only cost counting work; 2**12 bits: a working filter.
  docs, pattern = token_corpus
  got = fgrams_beam.run(input_patterns=pattern, input_format='tokens',
                        output_path=str(tmp_path / 'b.npz'), max_len=4, min_count=2,
                        num_fgrams=300, pipeline_args=BEAM_ARGS, prune_filter='bloom',
                        bloom_bits_log2=bloom_bits_log2, num_key_shards=5,
                        max_buffered_rows=7)
  want = fgrams.extract(docs, max_len=4, min_count=2, num_fgrams=300, progress=False)
  _assert_same_set(got, want)


def test_filters_have_no_false_negatives():
  rng = np.random.default_rng(3)
  rows = np.unique(rng.integers(0, 50, (3000, 3)).astype(np.int32), axis=0)
  inside, outside = rows[::2], rows[1::2]
  keys = np.ascontiguousarray(inside.astype('<i4')).view('V12').ravel()
  for kind in fgrams_beam.PRUNE_FILTERS:
    fn = beam_filters.BuildFilterFn(3, kind, bloom_bits_log2=14, bloom_num_hashes=4)
    # Two accumulators merged, as a runner would after combiner lifting.
    accs = [fn.add_input(fn.create_accumulator(), (part, np.ones(part.size, np.int64)))
            for part in (keys[:400], keys[400:])]
    filt = fn.extract_output(fn.merge_accumulators(accs))
    assert filt.contains(beam_filters.hash_rows(inside)).all(), kind
    false_positive_rate = filt.contains(beam_filters.hash_rows(outside)).mean()
    assert false_positive_rate < (0.001 if kind == 'hashes' else 0.05), kind


def test_candidate_rows_prune_exactly_prefix_and_suffix():
  tokens = np.array([1, 2, 3, 1, 2, 4], '<i4')
  frequent = {(1, 2), (2, 3), (3, 1)}
  hashes = np.unique(beam_filters.hash_rows(np.array(sorted(frequent), np.int32)))
  rows = fgrams_beam.candidate_rows(tokens, 3, beam_filters.HashSetFilter(hashes))
  got = [tuple(r) for r in rows.tolist()]
  want = [tuple(tokens[i:i + 3].tolist()) for i in range(len(tokens) - 2)
          if tuple(tokens[i:i + 2].tolist()) in frequent
          and tuple(tokens[i + 1:i + 3].tolist()) in frequent]
  assert got == want == [(1, 2, 3), (2, 3, 1), (3, 1, 2)]


# ------------------------------------------------------------------------ text input

_WORDS = ('the of and to in a is that for it as was with be by on not he this are or his '
          'from at which but have an they you were her she there been one all we their '
          'state union nation congress people government year war peace law').split()


def _text_documents(seed=1):
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(40):
    lines = [' '.join(rng.choice(_WORDS, rng.integers(3, 12))) for _ in range(
        rng.integers(1, 4))]
    docs.append('\n'.join(lines))
  docs += [docs[3], docs[3], docs[10]]
  return docs


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('sp') / 'tok')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_text_documents(seed=2) * 3), model_prefix=prefix,
      vocab_size=200, model_type='bpe', character_coverage=1.0, minloglevel=2)
  return prefix + '.model'


@pytest.mark.parametrize('text,want', [
    ('\n\n  \none\ntwo  \r\n\r\n\nthree\n \t \nfour\n\n', ['one\ntwo  ', 'three', 'four']),
    # Whitespace-only first/last lines are not separators; non-ASCII space is not blank.
    ('  \nfive\n\u00a0\nsix\n  ', ['  \nfive\n\u00a0\nsix\n  ']),
    ('\nseven\n\x0c\neight\r\nnine\n', ['seven', 'eight\nnine']),
    (' \n\n \n', []),
    ('old\rmac\r\rstyle\r', ['old\nmac', 'style']),  # lone '\r' is a newline, as in open()
])
def test_text_split_rule_matches_corpus_reader(tmp_path, text, want):
  path = tmp_path / 'a.txt'
  path.write_bytes(text.encode('utf-8'))
  assert fgrams_beam.read_text_documents(str(path)) == want
  # The in-process reader must agree, or in-process and Beam f-grams would differ.
  assert [d.text for d in corpus.read_text_documents([str(path)])] == want


def test_text_and_jsonl_match_extract(sp_model, tmp_path):
  docs = _text_documents()
  # Two files; documents separated by one, two, or whitespace-only blank lines.
  seps = ['\n\n', '\n\n\n', '\n  \n']
  for f, part in enumerate((docs[:20], docs[20:])):
    body = ''.join(d + seps[i % 3] for i, d in enumerate(part))
    (tmp_path / f'part{f}.txt').write_text(body, encoding='utf-8')
    with open(tmp_path / f'part{f}.jsonl', 'w', encoding='utf-8') as fh:
      for d in part:
        fh.write(json.dumps({'text': d, 'id': 1}) + '\n')
  read_back = [d for f in (0, 1)
               for d in fgrams_beam.read_text_documents(str(tmp_path / f'part{f}.txt'))]
  assert read_back == docs

  # A stock SentencePiece model (unk 0, bos 1, eos 2, no byte fallback): the pipeline
  # tokenizes as the in-process tokenizer does, in the model's numbering (ids + 1 here).
  tok = tokenizer_lib.load(sp_model)
  assert tok.id_offset == 1 and tok.eos_id == 3
  token_docs = [tok.encode(d) for d in docs]
  want = fgrams.extract(token_docs, max_len=4, min_count=2, num_fgrams=60, progress=False)
  assert len(want) == 60
  for fmt in ('text', 'jsonl'):
    got = fgrams_beam.run(input_patterns=[str(tmp_path / f'part*.{fmt.replace("text", "txt")}')],
                          input_format=fmt, output_path=str(tmp_path / f'{fmt}.npz'),
                          max_len=4, min_count=2, num_fgrams=60, tokenizer_path=sp_model,
                          pipeline_args=BEAM_ARGS)
    _assert_same_set(got, want)


def test_main_passes_unknown_args_to_beam(token_corpus, tmp_path, capsys):
  docs, pattern = token_corpus
  out = str(tmp_path / 'cli.npz')
  fgrams_beam.main([f'--input={pattern}', '--input_format=tokens', f'--output={out}',
                    '--max_len=3', '--min_count=2', '--num_fgrams=40'] + BEAM_ARGS)
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  want = fgrams.extract(docs, max_len=3, min_count=2, num_fgrams=40, progress=False)
  assert summary['num_fgrams'] == 40 and summary['fingerprint'] == want.fingerprint
  _assert_same_set(fgrams.FGramSet.load(out), want)


def test_cli_module_with_worker_processes(token_corpus, tmp_path):
  # `python -m` makes the module __main__; worker processes must still unpickle its DoFns
  # (as remote workers would), which in_memory mode never checks.
  docs, pattern = token_corpus
  out = str(tmp_path / 'cli_mp.npz')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  proc = subprocess.run(
      [sys.executable, '-m', 'scone_jax.fgrams_beam', f'--input={pattern}',
       '--input_format=tokens', f'--output={out}', '--max_len=3', '--min_count=2',
       '--num_fgrams=40', '--num_key_shards=4', '--runner=FnApiRunner',
       '--direct_running_mode=multi_processing', '--direct_num_workers=2'],
      cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = fgrams.extract(docs, max_len=3, min_count=2, num_fgrams=40, progress=False)
  _assert_same_set(fgrams.FGramSet.load(out), want)


# --------------------------------------------------------------- a distributed engine


@pytest.fixture
def dask_cluster():
  """A dask scheduler and two worker processes on 127.0.0.1, closed whatever the test does."""
  import distributed  # pylint: disable=g-import-not-at-top
  cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                     host='127.0.0.1', dashboard_address=None)
  try:
    with distributed.Client(cluster) as client:
      yield cluster, client
  finally:
    cluster.close()


@pytest.mark.slow
def test_dask_runner_on_worker_processes(token_corpus, tmp_path, dask_cluster):
  # Beam's DaskRunner on a real cluster (scheduler + 2 worker processes). Beam's own
  # translation returns an empty set for this pipeline without an error; fgrams_beam
  # runs it through scone_jax.beam_dask instead.
  import distributed  # pylint: disable=g-import-not-at-top
  cluster, client = dask_cluster
  docs, pattern = token_corpus
  with distributed.get_task_stream(client) as task_stream:
    got = fgrams_beam.run(
        input_patterns=[pattern], input_format='tokens', output_path=str(tmp_path / 'd.npz'),
        max_len=4, min_count=2, num_fgrams=150, num_key_shards=3,
        pipeline_args=['--runner=DaskRunner',
                       f'--dask_client_address={cluster.scheduler_address}',
                       '--dask_npartitions=4'])
  want = fgrams.extract(docs, max_len=4, min_count=2, num_fgrams=150, progress=False)
  _assert_same_set(got, want)
  _assert_same_set(fgrams.FGramSet.load(str(tmp_path / 'd.npz')), want)

  # The bundles ran in the worker processes, not here: the scheduler saw them on
  # workers, whose pids differ from ours and which imported fgrams_beam (to unpickle its
  # DoFns) from this checkout (spawned workers get this process's sys.path).
  bundles = [t for t in task_stream.data if '_run_bundle' in str(t['key'])]
  assert bundles and {t['worker'] for t in bundles} <= set(cluster.scheduler_info['workers'])

  def probe():
    module = sys.modules.get('scone_jax.fgrams_beam')
    return os.getpid(), getattr(module, '__file__', None)

  seen = client.run(probe)
  assert len(seen) == 2 and os.getpid() not in {pid for pid, _ in seen.values()}
  assert {f for _, f in seen.values() if f} == {fgrams_beam.__file__}


def test_dask_runner_needs_shared_temp_dir_for_a_remote_scheduler(token_corpus, tmp_path):
  # A scheduler on another host means workers that do not see this machine's disk.
  _, pattern = token_corpus
  with pytest.raises(ValueError, match='needs a temp_dir'):
    fgrams_beam.run(**_run_kwargs(tmp_path, pattern, pipeline_args=[
        '--runner=DaskRunner', '--dask_client_address=tcp://10.1.2.3:8786']))


# ----------------------------------------------------------------------- bad options


def _run_kwargs(tmp_path, pattern, **overrides):
  kwargs = dict(input_patterns=[pattern], input_format='tokens',
                output_path=str(tmp_path / 'o.npz'), max_len=3, min_count=1,
                num_fgrams=10, pipeline_args=BEAM_ARGS)
  kwargs.update(overrides)
  return kwargs


@pytest.mark.parametrize('overrides,message', [
    (dict(input_patterns=[]), 'no input'),
    (dict(input_patterns=['/nonexistent/dir/*.npz']), 'matches no file'),
    (dict(max_len=1), 'max_len=1'),
    (dict(min_count=0), 'min_count=0'),
    (dict(num_fgrams=0), 'num_fgrams=0'),
    (dict(input_format='parquet'), "input_format='parquet'"),
    (dict(input_format='text'), 'needs tokenizer_path'),
    (dict(input_format='text', tokenizer_path='/nonexistent.model'), 'does not exist'),
    (dict(prune_filter='exact'), "prune_filter='exact'"),
    (dict(output_path=''), 'no output'),
])
def test_bad_options_fail_clearly(token_corpus, tmp_path, overrides, message):
  _, pattern = token_corpus
  with pytest.raises(ValueError, match=message):
    fgrams_beam.run(**_run_kwargs(tmp_path, pattern, **overrides))


def test_remote_runner_without_temp_dir_fails_clearly(token_corpus, tmp_path):
  _, pattern = token_corpus
  with pytest.raises(ValueError, match='needs a temp_dir'):
    fgrams_beam.run(**_run_kwargs(tmp_path, pattern,
                                  pipeline_args=['--runner=FlinkRunner']))


def test_bad_token_shard_fails_clearly(tmp_path):
  np.savez(tmp_path / 'bad.npz', tokens=np.arange(5, dtype=np.int32),
           offsets=np.array([0, 3], np.int64))
  with pytest.raises(Exception, match='offsets must'):
    fgrams_beam.run(**_run_kwargs(tmp_path, str(tmp_path / 'bad.npz')))


# ------------------------------------------------------------------- token shards


def _shard_corpus(root):
  """Two blank-line text files and a .jsonl file (ids given, missing, blank and
  whitespace-only records) with the same documents, plus a lossless tokenizer."""
  docs = _text_documents(seed=4)[:36]
  (root / 'a.txt').write_text('\n\n'.join(docs[:20]) + '\n', encoding='utf-8')
  (root / 'b.txt').write_text('\n \n'.join(docs[20:]), encoding='utf-8')
  with open(root / 'c.jsonl', 'w', encoding='utf-8') as fh:
    for i, d in enumerate(docs):
      record = {'text': d, 'id': f'doc-{i}'} if i % 3 else {'text': d}
      fh.write(json.dumps(record) + '\n' + ('\n' if i == 5 else ''))
    fh.write(json.dumps({'text': ' \n '}) + '\n')
  model = str(root / 'tok.model')
  corpus.train_tokenizer(docs, vocab_size=300, model_type='bpe', model_path=model)
  return model


@pytest.fixture(scope='module')
def shard_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('shard_corpus')
  return root, _shard_corpus(root)


def _beam_read(reader, path):
  from apache_beam.io import fileio  # pylint: disable=g-import-not-at-top
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  return list(reader(fileio.ReadableFile(FileSystems.match([path])[0].metadata_list[0])))


def test_beam_readers_give_corpus_ids(shard_corpus):
  root, _ = shard_corpus
  for name, reader in (('a.txt', lambda f: beam_readers._read_file(f, 'text')),
                       ('c.jsonl', lambda f: beam_readers._read_file(f, 'jsonl'))):
    path = str(root / name)
    want = [(d.id, d.text) for d in corpus.read_text_documents([path])]
    assert _beam_read(reader, path) == want
  ids = [i for i, _ in _beam_read(lambda f: beam_readers._read_file(f, 'jsonl'),
                                  str(root / 'c.jsonl'))]
  assert ids[:3] == ['c.jsonl#1', 'doc-1', 'doc-2'] and 'c.jsonl#8' in ids  # after a blank line


@pytest.mark.parametrize('input_format,pattern', [('text', '*.txt'), ('jsonl', '*.jsonl')])
def test_shards_output_matches_write_shards(shard_corpus, tmp_path, input_format, pattern):
  from scone_jax import token_shards  # pylint: disable=g-import-not-at-top
  root, model = shard_corpus
  fraction, num_shards = 0.3, 5
  files = sorted(str(p) for p in root.glob(pattern))
  all_docs = corpus.read_text_documents(files)
  train = [d for d in all_docs if corpus.heldout_score(d.id) >= fraction]
  heldout = [d for d in all_docs if corpus.heldout_score(d.id) < fraction]
  assert heldout and train
  # With some but not all documents below the fraction, the per-document rule is
  # corpus.split_documents' rule.
  assert corpus.split_documents(all_docs, fraction) == (train, heldout)

  got_dir, want_dir = str(tmp_path / 'beam'), str(tmp_path / 'in_process')
  got = fgrams_beam.run(input_patterns=[str(root / pattern)], input_format=input_format,
                        output_path=str(tmp_path / 'f.npz'), max_len=3, min_count=2,
                        num_fgrams=50, tokenizer_path=model, pipeline_args=BEAM_ARGS,
                        shards_output=got_dir, num_token_shards=num_shards,
                        heldout_fraction=fraction)
  tokenizer = corpus.Tokenizer(model)
  want_index = token_shards.write_shards(train, tokenizer, want_dir, num_shards=num_shards)

  for s in range(num_shards):  # every shard, byte for byte (empty ones exist too)
    name = token_shards.shard_name(s, num_shards)
    with open(os.path.join(got_dir, name), 'rb') as a, open(os.path.join(want_dir, name),
                                                             'rb') as b:
      assert a.read() == b.read(), name
  index = token_shards.read_index(got_dir)
  for key in ('version', 'dtype', 'eos_id', 'num_shards', 'shard_tokens', 'num_tokens',
              'num_docs', 'num_bytes', 'tokenizer', 'docs'):
    assert index[key] == want_index[key], key
  assert index['writer'] == 'beam' and index['num_docs'] == len(train)
  assert index['docs'] == token_shards.shards_digest(train, num_shards)
  assert index['request']['heldout_fraction'] == fraction

  # F-grams counted over the training documents only.
  token_docs = tokenizer.encode_batch([d.text for d in train])
  want = fgrams.extract(token_docs, max_len=3, min_count=2, num_fgrams=50, progress=False)
  _assert_same_set(got, want)

  # Readable for training, and held-out documents are in no shard.
  shards = token_shards.TokenShards(got_dir, got)
  rows = shards.rows(np.arange(4), 16)
  want_rows = token_shards.TokenShards(want_dir, got).rows(np.arange(4), 16)
  assert all((rows[k] == want_rows[k]).all() for k in rows)
  in_shards = sorted(tuple(d[:-1].tolist()) for d in shards.documents())
  assert in_shards == sorted(tuple(t.tolist()) for t in token_docs)
  for d in heldout:
    assert tuple(tokenizer.encode(d.text).tolist()) not in set(in_shards), d.id


def test_shards_only_cli_and_duplicate_ids(shard_corpus, tmp_path, capsys):
  from scone_jax import token_shards  # pylint: disable=g-import-not-at-top
  root, model = shard_corpus
  out = str(tmp_path / 'shards')
  fgrams_beam.main([f'--input={root}/*.txt', f'--tokenizer={model}', f'--shards_output={out}',
                    '--num_token_shards=64'] + BEAM_ARGS)
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # No held-out fraction: every document; more shards than documents: empty files too.
  docs = corpus.read_text_documents(sorted(str(p) for p in root.glob('*.txt')))
  assert summary['num_docs'] == len(docs) == token_shards.TokenShards(out).num_docs
  want = str(tmp_path / 'want')
  token_shards.write_shards(docs, corpus.Tokenizer(model), want, num_shards=64)
  names = [token_shards.shard_name(s, 64) for s in range(64)]
  assert [open(os.path.join(out, n), 'rb').read() for n in names] == [
      open(os.path.join(want, n), 'rb').read() for n in names]
  assert min(os.path.getsize(os.path.join(out, n)) for n in names) == 0

  dup = tmp_path / 'dup.jsonl'
  dup.write_text('{"text": "one", "id": "x"}\n{"text": "two", "id": "x"}\n', encoding='utf-8')
  with pytest.raises(Exception, match="document id 'x' appears twice"):
    fgrams_beam.run(input_patterns=[str(dup)], input_format='jsonl', tokenizer_path=model,
                    shards_output=str(tmp_path / 'dup'), pipeline_args=BEAM_ARGS)


@pytest.mark.parametrize('overrides,message', [
    (dict(shards_output='x'), 'has no document ids'),
    (dict(heldout_fraction=0.1), 'has no document ids'),
    (dict(output_path='', shards_output=None), 'no output'),
])
def test_bad_shard_options_fail_clearly(token_corpus, tmp_path, overrides, message):
  _, pattern = token_corpus
  with pytest.raises(ValueError, match=message):
    fgrams_beam.run(**_run_kwargs(tmp_path, pattern, **overrides))
