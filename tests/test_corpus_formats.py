"""One corpus written in every format: the same documents and ids, the same held-out split,
the same FGramSet and byte-identical token shards, in process and in the Beam pipeline."""
import gzip
import hashlib
import json
import os
import random

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from scone_jax import corpus
from scone_jax import fgrams
from scone_jax import token_shards
import test_gcs
from test_gcs import gcs  # pylint: disable=unused-import  (the emulator fixture)
import tiny

HELDOUT = 0.15
NUM_SHARDS = 3
FORMATS = ('jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet', 'array_record', 'hf_dir')


def _documents(root):
  paths = tiny.write_corpus(root, num_train=80, num_eval=0)
  texts = [d.text for d in corpus.read_text_documents(paths[:1])]
  texts[3] = 'ünïcödé — “quotes” 日本語 😀\n  indented line\twith a tab  '
  texts[5] = 'a literal <|endoftext|> stays text'
  return [corpus.Document(f'doc-{i}', t) for i, t in enumerate(texts)]


def write_corpus(root, docs):
  """The documents in every format; returns {format: path for corpus.train_files}."""
  os.makedirs(root, exist_ok=True)
  lines = ''.join(json.dumps({'id': d.id, 'text': d.text}) + '\n' for d in docs).encode()
  out = {}
  out['jsonl'] = os.path.join(root, 'c.jsonl')
  with open(out['jsonl'], 'wb') as f:
    f.write(lines)
  out['jsonl.gz'] = os.path.join(root, 'c.jsonl.gz')
  with gzip.open(out['jsonl.gz'], 'wb') as f:
    f.write(lines)
  out['jsonl.zst'] = os.path.join(root, 'c.jsonl.zst')
  with open(out['jsonl.zst'], 'wb') as f:
    f.write(zstandard.ZstdCompressor().compress(lines))
  table = pa.table({'id': [d.id for d in docs], 'text': [d.text for d in docs],
                    'meta': list(range(len(docs)))})
  out['parquet'] = os.path.join(root, 'c.parquet')
  pq.write_table(table, out['parquet'], row_group_size=17)   # several row groups
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  out['array_record'] = os.path.join(root, 'c.array_record')
  writer = array_record_module.ArrayRecordWriter(out['array_record'], 'group_size:8')
  for d in docs:
    writer.write(json.dumps({'id': d.id, 'text': d.text}).encode())
  writer.close()
  # What datasets.save_to_disk writes: Arrow IPC stream files listed in state.json.
  hf = os.path.join(root, 'hf_dir')
  os.makedirs(hf)
  half = len(docs) // 2
  files = []
  for i, part in enumerate((table.slice(0, half), table.slice(half))):
    name = f'data-{i:05d}-of-00002.arrow'
    with pa.OSFile(os.path.join(hf, name), 'wb') as sink:
      with pa.ipc.new_stream(sink, part.schema) as w:
        for batch in part.to_batches(max_chunksize=10):
          w.write_batch(batch)
    files.append({'filename': name})
  with open(os.path.join(hf, 'state.json'), 'w') as f:
    json.dump({'_data_files': files, '_fingerprint': 'x', '_format_type': None}, f)
  with open(os.path.join(hf, 'dataset_info.json'), 'w') as f:
    json.dump({'features': {'id': {'dtype': 'string'}, 'text': {'dtype': 'string'}}}, f)
  out['hf_dir'] = hf
  return out


@pytest.fixture(scope='module')
def corpus_files(tmp_path_factory):
  docs = _documents(str(tmp_path_factory.mktemp('tiny')))
  return docs, write_corpus(str(tmp_path_factory.mktemp('formats')), docs)


@pytest.fixture(scope='module')
def tok(tmp_path_factory, corpus_files):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  corpus.train_tokenizer([d.text for d in corpus_files[0]], vocab_size=300, model_type='bpe',
                         model_path=path)
  return corpus.Tokenizer(path)


def _cfg(path, **kw):
  c = ml_collections.ConfigDict({'name': 'text', 'train_files': path, 'eval_files': '',
                                 'heldout_fraction': HELDOUT, 'max_docs': 0,
                                 'decode_errors': 'strict', 'text_field': 'text'})
  c.update(kw)
  return c


def _shard_bytes(directory):
  return {n: open(os.path.join(directory, n), 'rb').read()
          for n in sorted(os.listdir(directory)) if n.endswith('.bin')}


def test_every_format_gives_the_same_split_fgrams_and_shards(corpus_files, tok, tmp_path):
  docs, files = corpus_files
  want_train, want_held = corpus.split_documents(docs, HELDOUT)
  assert want_held and want_train
  results = {}
  for fmt, path in files.items():
    train = corpus.load_documents(_cfg(path), 'train')
    held = corpus.load_documents(_cfg(path), 'heldout')
    assert train == want_train, fmt
    assert held == want_held, fmt
    fgram_set = fgrams.extract([tok.encode(d.text) for d in train], max_len=3, min_count=2,
                               num_fgrams=50, progress=False)
    out = str(tmp_path / fmt)
    index = token_shards.write_shards(iter(train), tok, out, num_shards=NUM_SHARDS)
    results[fmt] = (fgram_set.fingerprint, _shard_bytes(out), index['docs'])
  first = results['jsonl']
  assert len(first[1]) == NUM_SHARDS and all(first[1].values())
  for fmt, got in results.items():
    assert got == first, fmt


def test_parquet_text_field_id_column_and_errors(tmp_path):
  path = str(tmp_path / 'p.parquet')
  pq.write_table(pa.table({'body': ['one', '  ', None, 'two'], 'n': [1, 2, 3, 4]}), path)
  docs = list(corpus.iter_file_documents(path, text_field='body'))
  assert docs == [corpus.Document('p.parquet#0', 'one'), corpus.Document('p.parquet#3', 'two')]
  with pytest.raises(ValueError, match="no column 'text'.*text_field"):
    list(corpus.iter_file_documents(path))
  pq.write_table(pa.table({'id': [7, 8], 'text': ['a', 'b']}), path)
  assert [d.id for d in corpus.iter_file_documents(path)] == ['7', '8']


def test_streamed_text_documents_equal_the_whole_file_rule(tmp_path):
  # The line-by-line reader against split_text_documents over the whole text.
  rng = random.Random(0)
  atoms = ['a', 'bc', ' ', '\t', '\n', '\n', '\r\n', '\r', '\n \n', '\n\n', 'é', '\x0b', '\f']
  for trial in range(300):
    text = ''.join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
    path = tmp_path / f't{trial}.txt'
    path.write_bytes(text.encode('utf-8'))
    got = [d.text for d in corpus.iter_file_documents(str(path))]
    assert got == corpus.split_text_documents(text), repr(text)


def test_invalid_utf8_names_the_byte(tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_bytes(b'good line\n\nsecond \xff doc\n')
  with pytest.raises(ValueError, match=r'byte 18 \(0xff\)'):
    list(corpus.iter_file_documents(str(path)))
  docs = list(corpus.iter_file_documents(str(path), decode_errors='replace'))
  assert docs[1].text == 'second \ufffd doc'


def test_heldout_split_streams_with_the_in_memory_guarantees():
  docs = [corpus.Document(f'x{i}', 't') for i in range(40)]
  for fraction in (0.0, 0.001, 0.3, 0.999):
    train, held = corpus.split_documents(docs, fraction)
    assert corpus.stream_split(iter(docs), fraction, 'train') == train, fraction
    assert corpus.stream_split(iter(docs), fraction, 'heldout') == held, fraction


def test_heldout_is_written_once_and_read_without_the_corpus(corpus_files, tmp_path):
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  docs, files = corpus_files
  _, want_held = corpus.split_documents(docs, HELDOUT)
  data = tmp_path / 'c.parquet'
  data.write_bytes(open(files['parquet'], 'rb').read())
  cfg = ml_collections.ConfigDict({'corpus': _cfg(str(data))})
  work = str(tmp_path / 'work')
  assert artifacts.load_heldout(cfg, work) == want_held
  assert os.path.isfile(os.path.join(work, 'data', 'heldout.jsonl'))
  data.unlink()   # the training corpus is gone: the held-out split does not need it
  assert artifacts.load_heldout(cfg, work) == want_held
  cfg.corpus.heldout_fraction = 0.3   # another split: made again, from the corpus
  with pytest.raises(FileNotFoundError, match='c.parquet'):
    artifacts.load_heldout(cfg, work)


@pytest.mark.slow
@pytest.mark.parametrize('fmt,input_format,pattern', [
    ('parquet', 'parquet', 'c.parquet'), ('jsonl.zst', 'auto', 'c.jsonl.zst'),
    ('hf_dir', 'arrow', 'hf_dir/*.arrow'), ('array_record', 'arrayrecord', 'c.array_record')])
def test_beam_pipeline_reads_every_format_alike(corpus_files, tok, tmp_path, fmt, input_format,
                                                pattern):
  from scone_jax import fgrams_beam  # pylint: disable=g-import-not-at-top
  docs, files = corpus_files
  root = os.path.dirname(files['jsonl'])
  train, _ = corpus.split_documents(docs, HELDOUT)
  want_dir = str(tmp_path / 'want')
  token_shards.write_shards(train, tok, want_dir, num_shards=NUM_SHARDS)
  want_set = fgrams.extract([tok.encode(d.text) for d in train], max_len=3, min_count=2,
                            num_fgrams=50, progress=False)
  out = str(tmp_path / 'beam')
  got = fgrams_beam.run(
      input_patterns=[os.path.join(root, pattern)], input_format=input_format,
      output_path=str(tmp_path / 'f.npz'), max_len=3, min_count=2, num_fgrams=50,
      tokenizer_path=tok.path, shards_output=out, num_token_shards=NUM_SHARDS,
      heldout_fraction=HELDOUT, num_key_shards=2,
      pipeline_args=['--runner=FnApiRunner', '--direct_num_workers=1',
                     '--direct_running_mode=in_memory'])
  assert got.fingerprint == want_set.fingerprint
  assert _shard_bytes(out) == _shard_bytes(want_dir)
  assert token_shards.read_index(out)['docs'] == token_shards.read_index(want_dir)['docs']


@pytest.mark.slow
def test_every_format_reads_alike_from_gcs(corpus_files, gcs):  # pylint: disable=redefined-outer-name
  # Cloud Storage through the IO layer (an emulator on 127.0.0.1): the same documents.
  docs, files = corpus_files
  url, fs = gcs
  remote = {}
  for fmt, path in files.items():
    dest = f'{test_gcs.BUCKET}/formats/{os.path.basename(path)}'
    fs.put(path, dest, recursive=os.path.isdir(path))
    remote[fmt] = f'gs://{dest}'
  out = test_gcs._in_emulated_process(url, f'''
      import hashlib, json
      from scone_jax import corpus
      for fmt, path in {remote!r}.items():
        got = [[d.id, d.text] for d in corpus.read_text_documents(corpus._expand_globs(path, 'x'))]
        print(fmt, hashlib.sha256(json.dumps(got).encode()).hexdigest())
  ''')
  want = hashlib.sha256(json.dumps([[d.id, d.text] for d in docs]).encode()).hexdigest()
  lines = dict(line.split() for line in out.strip().splitlines())
  assert lines == {fmt: want for fmt in files}


@pytest.mark.slow
def test_beam_pipeline_with_a_huggingface_tokenizer(corpus_files, tmp_path):
  from scone_jax import fgrams_beam  # pylint: disable=g-import-not-at-top
  from scone_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  import test_tokenizer  # pylint: disable=g-import-not-at-top
  docs, files = corpus_files
  path = test_tokenizer.train_byte_level_bpe(str(tmp_path / 'tokenizer.json'),
                                             [d.text for d in docs])
  tok = tokenizer_lib.load(path)
  assert tok.id_offset == 1
  train, _ = corpus.split_documents(docs, HELDOUT)
  token_shards.write_shards(train, tok, str(tmp_path / 'want'), num_shards=NUM_SHARDS)
  want_set = fgrams.extract([tok.encode(d.text) for d in train], max_len=3, min_count=2,
                            num_fgrams=50, progress=False)
  fgrams_beam.main([f'--input={files["parquet"]}', '--input_format=parquet',
                          f'--tokenizer={path}', '--tokenizer_kind=huggingface',
                          f'--output={tmp_path / "f.npz"}', '--max_len=3', '--min_count=2',
                          '--num_fgrams=50', f'--shards_output={tmp_path / "beam"}',
                          f'--num_token_shards={NUM_SHARDS}', f'--heldout_fraction={HELDOUT}',
                          '--num_key_shards=2', '--runner=FnApiRunner',
                          '--direct_num_workers=1', '--direct_running_mode=in_memory'])
  assert fgrams.FGramSet.load(str(tmp_path / 'f.npz')).fingerprint == want_set.fingerprint
  assert _shard_bytes(str(tmp_path / 'beam')) == _shard_bytes(str(tmp_path / 'want'))
  assert token_shards.read_index(str(tmp_path / 'beam'))['tokenizer'] == tok.fingerprint
