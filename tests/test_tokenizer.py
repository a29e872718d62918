"""Bring-your-own tokenizers: a byte-level BPE tokenizer.json and SentencePiece models whose
special ids are not scone_jax's own, through token shards, export, serving and generate."""
import hashlib
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from scone_jax import corpus
from scone_jax import packing
from scone_jax import token_shards
from scone_jax import tokenizer as tokenizer_lib
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRICKY = ('Fellow citizens,\n\n  two spaces\tand a tab; ünïcödé — “quotes” 日本語 😀\n'
           'a literal <|endoftext|> and </s> stay text.\r\n\n\n trailing  ')




def train_byte_level_bpe(path, texts, vocab_size=400, specials_first=False):
  """A GPT-2-style byte-level BPE tokenizer.json trained here (no network)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ['<pad>', '</s>'] if specials_first else []
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  if not specials_first:
    tok.add_special_tokens(['<|endoftext|>'])   # GPT-2: EOS last, no pad, id 0 = a byte
  tok.save(path)
  return path


@pytest.fixture(scope='module')
def texts(tmp_path_factory):
  paths = tiny.write_corpus(str(tmp_path_factory.mktemp('corpus')))
  return [d.text for d in corpus.read_text_documents(paths)]


@pytest.fixture(scope='module')
def gpt2_like(tmp_path_factory, texts):
  return train_byte_level_bpe(str(tmp_path_factory.mktemp('hf') / 'tokenizer.json'), texts)


def test_byte_level_bpe_round_trips_and_shifts_ids(gpt2_like, texts):
  tok = tokenizer_lib.load(gpt2_like)
  assert tok.kind == 'huggingface'
  raw = json.load(open(gpt2_like))
  file_eos = [t['id'] for t in raw['added_tokens'] if t['content'] == '<|endoftext|>'][0]
  # Id 0 of the file is a byte ('!'): every id moves up one, 0 is the start symbol.
  assert tok.id_offset == 1 and tok.eos_id == file_eos + 1
  assert tok.vocab_size == file_eos + 2 and tok.pad_id == -1   # no pad token: fine
  with open(gpt2_like, 'rb') as f:
    assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
  for text in [_TRICKY, texts[0], '', '!']:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids >= 1).all() and (ids < tok.vocab_size).all()
    assert tok.decode(ids) == text   # lossless: bits per byte are exact
    assert tok.eos_id not in ids     # '<|endoftext|>' in a document is text
  batch = tok.encode_batch([_TRICKY, 'abc'])
  np.testing.assert_array_equal(batch[0], tok.encode(_TRICKY))
  # EOS and the start symbol decode to nothing.
  assert tok.decode(np.r_[0, tok.encode('hi'), tok.eos_id]) == 'hi'
  with pytest.raises(ValueError, match='SentencePiece'):
    tok.seqio_vocabulary()


def test_special_ids_from_file_or_config(tmp_path, texts):
  path = train_byte_level_bpe(str(tmp_path / 'tokenizer.json'), texts, specials_first=True)
  tok = tokenizer_lib.load(path)
  # '<pad>' is id 0 and special: ids as they are.
  assert (tok.id_offset, tok.pad_id, tok.eos_id) == (0, 0, 1)
  over = tokenizer_lib.load(path, 'huggingface', {'eos_id': 0, 'pad_id': -1})
  assert over.eos_id == 0 and over.fingerprint != tok.fingerprint
  with pytest.raises(ValueError, match='outside'):
    tokenizer_lib.load(path, special_ids={'eos_id': 10**6})
  # No EOS in the file and none configured: one clear error.
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  bare = Tokenizer.from_file(path)
  raw = json.loads(bare.to_str())
  raw['added_tokens'] = [t for t in raw['added_tokens'] if t['content'] != '</s>']
  raw['model']['vocab'].pop('</s>')
  (tmp_path / 'noeos.json').write_text(json.dumps(raw))
  with pytest.raises(ValueError, match='tokenizer.eos_id'):
    tokenizer_lib.load(str(tmp_path / 'noeos.json'))
  with pytest.raises(ValueError, match='not a SentencePiece model'):
    tokenizer_lib.load(path, 'sentencepiece')
  with pytest.raises(ValueError, match='not a Hugging Face'):
    tokenizer_lib.load(str(tmp_path / 'noeos.json') + '', 'huggingface',
                       data=b'\x00\x01 not json')


def _train_sp(path, texts, **ids):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=320, model_type='bpe',
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2, **ids)
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return path


def test_sentencepiece_whose_eos_is_not_1(tmp_path, texts):
  # Llama's layout: unk 0, bos 1, eos 2, no pad; byte fallback: <unk> is never emitted.
  llama = tokenizer_lib.load(_train_sp(str(tmp_path / 'llama.model'), texts, unk_id=0,
                                       bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True))
  assert (llama.id_offset, llama.eos_id, llama.bos_id, llama.pad_id) == (0, 2, 1, -1)
  # Without byte fallback <unk> (id 0) can be emitted: the ids move up one.
  nofb = tokenizer_lib.load(_train_sp(str(tmp_path / 'nofb.model'), texts, unk_id=0,
                                      bos_id=-1, eos_id=3, pad_id=-1, byte_fallback=False))
  assert nofb.id_offset == 1 and nofb.eos_id == 4
  for tok in (llama, nofb):
    ids = tok.encode(texts[1])
    assert 0 not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == texts[1]
    assert tok.decode(np.r_[ids, tok.eos_id]) == texts[1]
    with pytest.raises(ValueError, match='input_pipeline=shards'):
      tok.seqio_vocabulary()


def test_token_shards_rows_with_a_huggingface_tokenizer(gpt2_like, texts, tmp_path):
  tok = tokenizer_lib.load(gpt2_like)
  docs = [corpus.Document(f'd{i}', t) for i, t in enumerate(texts[:40])]
  index = token_shards.write_shards(docs, tok, str(tmp_path / 's'), num_shards=3)
  assert index['eos_id'] == tok.eos_id
  assert index['num_bytes'] == sum(len(t.encode('utf-8')) for t in texts[:40])
  shards = token_shards.TokenShards(str(tmp_path / 's'))
  # Every document comes back whole: the bytes bits-per-byte divide by are the tokens' bytes.
  decoded = sorted(tok.decode(d[:-1]) for d in shards.documents())
  assert decoded == sorted(texts[:40])
  # Rows are packing's rule over the same documents in shard order.
  order = sorted(docs, key=lambda d: (token_shards.doc_key(d.id) % 3,
                                      token_shards.doc_key(d.id), d.id))
  split = packing.prepare_split(order, tok, None)
  seq_len = 32
  num_rows = -(-split.num_tokens // seq_len)
  got = shards.rows(np.arange(num_rows), seq_len)
  want = packing.make_rows(split, seq_len, np.arange(num_rows))
  for k in packing.BATCH_KEYS:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_prepare_copies_a_huggingface_tokenizer(gpt2_like, tmp_path):
  cfg = ml_collections.ConfigDict({'tokenizer': {
      'kind': 'huggingface', 'path': gpt2_like, 'vocab_size': 400, 'model_type': 'bpe',
      'eos_id': -1, 'bos_id': -1, 'pad_id': -1, 'unk_id': -1}})
  tok = tokenizer_lib.prepare(cfg, str(tmp_path / 'w'), None)
  assert tok.path == str(tmp_path / 'w' / 'tokenizer.json') and tok.kind == 'huggingface'
  assert tokenizer_lib.prepare(cfg, str(tmp_path / 'w'), None).fingerprint == tok.fingerprint
  cfg.tokenizer.path = ''
  with pytest.raises(ValueError, match='tokenizer.path'):
    tokenizer_lib.prepare(cfg, str(tmp_path / 'w2'), ['text'])


@pytest.mark.slow
def test_train_export_serve_and_generate_with_a_huggingface_tokenizer(gpt2_like, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import export  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  cfg = tiny.tiny_config(corpus_dir, steps=2)
  cfg.tokenizer.kind = 'huggingface'
  cfg.tokenizer.path = gpt2_like
  workdir = str(tmp_path / 'work')
  run = artifacts.prepare_run(cfg, workdir)
  assert run.tokenizer.kind == 'huggingface'
  trainer = train.create_trainer(cfg, workdir, run)
  loader, _ = train.make_loaders(cfg, workdir, run)
  for step in range(2):
    sb, _ = step_batch.make_step_batch(loader.batch_at(step), run.fgram_set, cfg)
    trainer.state, _ = trainer.train_step(
        trainer.state, step_batch.device_put_batch(sb, trainer.batch_shardings),
        jax.random.PRNGKey(1))
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 2})
  mngr.wait_until_finished()
  mngr.close()
  export_dir = str(tmp_path / 'export')
  export.export(cfg, workdir, run, export_dir)
  assert os.path.isfile(os.path.join(export_dir, 'tokenizer.json'))
  assert not os.path.exists(os.path.join(export_dir, 'tokenizer.model'))
  gen = serving.load(export_dir)
  assert gen.tokenizer.kind == 'huggingface'
  assert gen.tokenizer.fingerprint == run.tokenizer.fingerprint
  [ids] = gen.generate([gen.tokenizer.encode('The nation')], max_new_tokens=6)
  [text] = gen.generate_text(['The nation'], max_new_tokens=6)
  eos = gen.tokenizer.eos_id
  assert text == gen.tokenizer.decode([t for t in ids if t != eos])
  # --mode=generate decodes with the export's tokenizer.json.
  out = subprocess.run(
      [sys.executable, '-m', 'scone_jax.main', '--mode=generate', f'--export_dir={export_dir}',
       '--prompt=The nation', '--max_new_tokens=6'],
      capture_output=True, text=True, cwd=REPO, timeout=300,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert text in out.stdout
