"""Tokenizers: text <-> int32 ids, from a SentencePiece .model or a Hugging Face tokenizer.json.

`tokenizer.kind` picks the library (config fields in `config.py`):
  'sentencepiece'  a `.model` file (`tokenizer.path`), or one trained on the training split
                   (the default when no path is given: `train_tokenizer`).
  'huggingface'    a `tokenizer.json` read with the `tokenizers` library (offline; nothing is
                   fetched from a hub): GPT-2, Llama, OLMo, ... tokenizers.

Special ids (BOS/EOS/PAD/UNK) are read from the file (SentencePiece's own, or the special
tokens of a tokenizer.json named as below) or set with `tokenizer.eos_id` etc. (ids in the
file's numbering; -1 = from the file). Only EOS is required: it ends every document. A
tokenizer without a pad token works (padding is masked; its filler id is 0).

The model's ids are the file's ids plus `id_offset`, 0 or 1. The packed rows give a
segment's first position the input 0 (`packing.BOS_ID`), which must be an id that text
never encodes to: when the file's id 0 is a control / special token (a trained model's
pad, Llama's <unk> with byte fallback, GPT-NeoX's <|endoftext|>) the ids are used as they
are; when it is an ordinary token (GPT-2's '!') every id moves up by one and 0 is the
model's own start symbol. `encode` / `decode` / `eos_id` / `vocab_size` are in the model's
numbering.

Text that names a special token ('<|endoftext|>' in a document) is encoded as text, not as
the token, so EOS never appears inside a document. The trained SentencePiece models and any
byte-level BPE (`ByteLevel` pre-tokenizer and decoder, no normalizer) are lossless:
decode(encode(text)) == text, so bits per byte are exact.
"""
import hashlib
import io
import json
import logging
import os
import re
import time
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from scone_jax import paths as paths_lib

KINDS = ('sentencepiece', 'huggingface')
# The file a run keeps in its workdir (and an export beside its table), per kind.
FILES = {'sentencepiece': 'tokenizer.model', 'huggingface': 'tokenizer.json'}
SPECIAL_IDS = ('eos_id', 'bos_id', 'pad_id', 'unk_id')
# A trained model's ids (seqio's convention): pad 0, EOS 1, UNK 2, no BOS.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Special tokens of a tokenizer.json recognised by name, first match wins.
_HF_NAMES = {
    'eos_id': ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '<|eos|>', '[SEP]'),
    'bos_id': ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>', '[CLS]'),
    'pad_id': ('<pad>', '<|padding|>', '[PAD]', '<|pad|>'),
    'unk_id': ('<unk>', '[UNK]', '<|unk|>'),
}

# Byte fallback reserves 256 pieces; with pad/eos/unk and '\n' a model needs more than this.
_MIN_VOCAB_SIZE = 261
# Training "sentences" are cut to at most this many characters (sentencepiece silently
# drops sentences longer than max_sentence_length bytes; 4 bytes per char at most).
_MAX_PIECE_CHARS = 4000
_MAX_SENTENCE_BYTES = 4 * _MAX_PIECE_CHARS + 16


def kind_of(path: str, kind: str = '') -> str:
  """The tokenizer kind: `kind` if given, else by the file name ('.json': huggingface)."""
  if kind:
    if kind not in KINDS:
      raise ValueError(f'tokenizer.kind={kind!r}; use one of {" | ".join(KINDS)}.')
    return kind
  return 'huggingface' if str(path).endswith('.json') else 'sentencepiece'


def _special_overrides(special_ids) -> dict:
  special_ids = dict(special_ids or {})
  unknown = set(special_ids) - set(SPECIAL_IDS)
  if unknown:
    raise ValueError(f'unknown special ids {sorted(unknown)}; use {SPECIAL_IDS}.')
  return {k: int(v) for k, v in sorted(special_ids.items()) if v is not None and int(v) >= 0}


class _Base:
  """What both kinds share; subclasses set _file_ids (file numbering) and id_offset."""
  kind = ''

  def _init_common(self, path: str, data: bytes, overrides: dict, file_vocab_size: int):
    self.path = path
    self.overrides = overrides
    for name, value in overrides.items():
      if not 0 <= value < file_vocab_size:
        raise ValueError(f'tokenizer.{name}={value} is outside {path}\'s vocabulary '
                         f'[0, {file_vocab_size}).')
    self._file_ids.update(overrides)
    if self._file_ids.get('eos_id', -1) < 0:
      raise ValueError(f'{path} has no end-of-text token (looked for '
                       f'{", ".join(_HF_NAMES["eos_id"])}); set --config.tokenizer.eos_id=ID '
                       'to the id that ends a document.')
    h = hashlib.sha256(data)
    if overrides:   # the same file with other special ids tokenizes into other shards
      h.update(json.dumps(overrides, sort_keys=True).encode('utf-8'))
    self.fingerprint = h.hexdigest()
    self._vocab_size = file_vocab_size + self.id_offset

  def _model_id(self, name: str) -> int:
    i = self._file_ids.get(name, -1)
    return i + self.id_offset if i >= 0 else -1

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def eos_id(self) -> int:
    return self._model_id('eos_id')

  @property
  def bos_id(self) -> int:
    return self._model_id('bos_id')

  @property
  def pad_id(self) -> int:
    return self._model_id('pad_id')

  @property
  def unk_id(self) -> int:
    return self._model_id('unk_id')

  def spec(self) -> dict:
    """What loads this tokenizer again from its file: {'kind', 'special_ids'} (JSON)."""
    return {'kind': self.kind, 'special_ids': dict(self.overrides)}

  def _file_numbering(self, ids) -> list:
    ids = np.asarray(ids, np.int64).reshape(-1) - self.id_offset
    return [int(i) for i in ids if i >= 0]

  def __repr__(self):
    return (f'{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, '
            f'eos_id={self.eos_id}, id_offset={self.id_offset}, {self.fingerprint[:12]})')


class SentencePieceTokenizer(_Base):
  """A SentencePiece model; with pad 0 and EOS 1 (what `train_tokenizer` makes) its ids are
  seqio's (`seqio_vocabulary`)."""
  kind = 'sentencepiece'

  def __init__(self, path: str, special_ids=None, data: Optional[bytes] = None):
    if data is None:
      if not paths_lib.isfile(path):
        raise FileNotFoundError(f'no SentencePiece model at {path}; set '
                                '--config.tokenizer.path or let the run train one.')
      data = paths_lib.read_bytes(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path} is not a SentencePiece model ({e}); for a Hugging Face '
                       'tokenizer.json set --config.tokenizer.kind=huggingface.') from None
    sp = self._sp
    self._file_ids = {'eos_id': sp.eos_id(), 'bos_id': sp.bos_id(), 'pad_id': sp.pad_id(),
                      'unk_id': sp.unk_id()}
    # Id 0 may stand for "start of segment" if encode never emits it: a control piece, or
    # <unk> when byte fallback leaves nothing unknown.
    never_emitted = sp.is_control(0) or sp.is_unused(0) or (
        sp.is_unknown(0) and sp.piece_to_id('<0x00>') != sp.unk_id())
    self.id_offset = 0 if never_emitted else 1
    self._init_common(path, data, _special_overrides(special_ids), sp.get_piece_size())
    self._proto = data

  def encode(self, text: str) -> np.ndarray:
    """Token ids of text, int32, without EOS."""
    return np.asarray(self._sp.encode(text), dtype=np.int32) + self.id_offset

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
    """encode() of each text (sentencepiece's own threads)."""
    ids = self._sp.encode(list(texts), num_threads=num_threads)
    return [np.asarray(x, dtype=np.int32) + self.id_offset for x in ids]

  def decode(self, ids) -> str:
    """Text of ids; control ids (pad, EOS, BOS) decode to nothing."""
    return self._sp.decode(self._file_numbering(ids))

  def id_to_piece(self, i: int) -> str:
    i = int(i) - self.id_offset
    return self._sp.id_to_piece(i) if i >= 0 else '<bos>'

  def seqio_vocabulary(self):
    """This model as a seqio.SentencePieceVocabulary (imports seqio, hence TensorFlow)."""
    if self.id_offset or self.overrides or (self.pad_id, self.eos_id) != (PAD_ID, EOS_ID):
      raise ValueError(f'{self.path}: input_pipeline=seqio needs a SentencePiece model with '
                       'pad 0 and EOS 1 (as trained by scone_jax); use input_pipeline=shards.')
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(self.path)


class HuggingFaceTokenizer(_Base):
  """A Hugging Face `tokenizer.json` through the `tokenizers` library (Rust, batched)."""
  kind = 'huggingface'

  def __init__(self, path: str, special_ids=None, data: Optional[bytes] = None):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('tokenizer.kind=huggingface needs the `tokenizers` library: '
                        'pip install tokenizers') from e
    if data is None:
      if not paths_lib.isfile(path):
        raise FileNotFoundError(f'no tokenizer.json at {path}; set --config.tokenizer.path.')
      data = paths_lib.read_bytes(path)
    try:
      tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path} is not a Hugging Face tokenizer.json ({e}); for a '
                       'SentencePiece .model set --config.tokenizer.kind=sentencepiece.') from None
    # A document that spells a special token ('<|endoftext|>') is text, not that token.
    tok.encode_special_tokens = True
    self._tok = tok
    added = tok.get_added_tokens_decoder()
    special = {t.content: i for i, t in added.items() if t.special}
    self._file_ids = {}
    for name, candidates in _HF_NAMES.items():
      found = [special[c] for c in candidates if c in special]
      self._file_ids[name] = found[0] if found else -1
    self.id_offset = 0 if 0 in special.values() else 1
    self._init_common(path, data, _special_overrides(special_ids),
                      tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32) + self.id_offset

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
    """encode() of each text, batched across the library's threads (RAYON_NUM_THREADS)."""
    del num_threads
    encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) + self.id_offset for e in encodings]

  def decode(self, ids) -> str:
    """Text of ids; special tokens (EOS, pad, ...) and the start symbol decode to nothing."""
    return self._tok.decode(self._file_numbering(ids), skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    i = int(i) - self.id_offset
    return (self._tok.id_to_token(i) or '') if i >= 0 else '<bos>'

  def seqio_vocabulary(self):
    raise ValueError(f'{self.path}: input_pipeline=seqio needs a SentencePiece model; with a '
                     'Hugging Face tokenizer use input_pipeline=shards.')


def load(path: str, kind: str = '', special_ids=None, data: Optional[bytes] = None):
  """The tokenizer in `path`: `kind` 'sentencepiece' | 'huggingface' ('' = by file name),
  special_ids {'eos_id': ...} overriding the file's (file numbering; -1 = the file's);
  `data`: the file's bytes when the caller read them (Beam workers, through FileSystems)."""
  cls = {'sentencepiece': SentencePieceTokenizer,
         'huggingface': HuggingFaceTokenizer}[kind_of(path, kind)]
  return cls(path, special_ids, data)


def config_special_ids(tokenizer_cfg) -> dict:
  return {k: tokenizer_cfg.get(k, -1) for k in SPECIAL_IDS}


def from_config(tokenizer_cfg, path: str):
  """The tokenizer at `path`, of the config's kind, with its special-id overrides."""
  return load(path, tokenizer_cfg.get('kind', ''), config_special_ids(tokenizer_cfg))


def _training_pieces(texts: Iterable[str]) -> Iterable[str]:
  """Cuts texts into sentencepiece "sentences" that tokenize as they do in context.

  Each piece starts at a newline run (so line-initial words are learned without the
  word-boundary marker, as they occur in documents) and is at most _MAX_PIECE_CHARS long,
  cut before a space.
  """
  for text in texts:
    for piece in re.split(r'(?=(?<!\n)\n)', text):
      while len(piece) > _MAX_PIECE_CHARS:
        cut = piece.rfind(' ', _MAX_PIECE_CHARS // 2, _MAX_PIECE_CHARS)
        cut = cut if cut > 0 else _MAX_PIECE_CHARS
        yield piece[:cut]
        piece = piece[cut:]
      if piece:
        yield piece


def train_tokenizer(texts: Sequence[str], *, vocab_size: int, model_type: str,
                    model_path: str, max_sentences: int = 2_000_000,
                    num_threads: int = 2) -> str:
  """Trains a SentencePiece model on texts and saves model_path and its .vocab; returns the path.

  Deterministic: the same texts and settings give the same bytes. Corpora with more than
  max_sentences pieces are subsampled with a fixed seed.
  """
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f'tokenizer.model_type={model_type!r}; use "bpe" or "unigram".')
  if vocab_size < _MIN_VOCAB_SIZE:
    raise ValueError(f'tokenizer.vocab_size={vocab_size} is too small: byte fallback alone '
                     f'needs 256 pieces; use at least {_MIN_VOCAB_SIZE}.')
  t0 = time.time()
  pieces = list(_training_pieces(texts))
  if not pieces:
    raise ValueError('cannot train a tokenizer on an empty corpus.')
  if len(pieces) > max_sentences:
    keep = np.sort(np.random.default_rng(0).choice(len(pieces), max_sentences, replace=False))
    pieces = [pieces[i] for i in keep]
  num_bytes = sum(len(p.encode('utf-8')) for p in pieces)
  logging.info('training a %d-piece %s tokenizer on %d pieces (%.1f MB)', vocab_size,
               model_type, len(pieces), num_bytes / 1e6)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(pieces), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
      add_dummy_prefix=False, user_defined_symbols=['\n'], split_digits=False,
      input_sentence_size=0, max_sentence_length=_MAX_SENTENCE_BYTES,
      # Small corpora cannot always fill the vocabulary; take what they support.
      hard_vocab_limit=False, num_threads=num_threads, minloglevel=2)
  proto = model.getvalue()
  paths_lib.makedirs(paths_lib.dirname(paths_lib.abspath(model_path)))
  paths_lib.atomic_write(model_path, proto)
  processor = spm.SentencePieceProcessor(model_proto=proto)
  paths_lib.atomic_write(vocab_path(model_path), ''.join(
      f'{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n'
      for i in range(processor.get_piece_size())))
  logging.info('tokenizer with %d pieces saved to %s (%.1fs)', processor.get_piece_size(),
               model_path, time.time() - t0)
  return model_path


def vocab_path(model_path: str) -> str:
  """The human-readable piece list SentencePiece writes beside a model: x.model -> x.vocab."""
  return os.path.splitext(model_path)[0] + '.vocab'   # '/'-separated gs:// paths too




def prepare(cfg, workdir: str, train_texts):
  """The run's tokenizer: the one in workdir (tokenizer.model / tokenizer.json by kind),
  else a copy of tokenizer.path, else a SentencePiece model trained on train_texts.

  train_texts: the training texts, or a function returning them (called only to train).
  """
  tcfg = cfg.tokenizer
  kind = kind_of(tcfg.path, tcfg.get('kind', ''))
  path = paths_lib.join(workdir, FILES[kind])
  if paths_lib.isfile(path):
    tokenizer = from_config(tcfg, path)
    if tcfg.path:
      given = from_config(tcfg, tcfg.path)
      if given.fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f'{path} ({tokenizer.fingerprint[:12]}) differs from tokenizer.path='
            f'{tcfg.path} ({given.fingerprint[:12]}); use a new --workdir or '
            'drop --config.tokenizer.path.')
    elif tokenizer.vocab_size != tcfg.vocab_size:
      logging.warning('reusing %s with %d pieces although tokenizer.vocab_size=%d',
                      path, tokenizer.vocab_size, tcfg.vocab_size)
    logging.info('reusing tokenizer %s', tokenizer)
    return tokenizer
  paths_lib.makedirs(workdir)
  if tcfg.path:
    from_config(tcfg, tcfg.path)   # refuse a bad file before copying it
    paths_lib.copy(tcfg.path, path)
    if kind == 'sentencepiece' and paths_lib.isfile(vocab_path(tcfg.path)):
      paths_lib.copy(vocab_path(tcfg.path), vocab_path(path))
    tokenizer = from_config(tcfg, path)
    logging.info('using tokenizer %s copied from %s', tokenizer, tcfg.path)
    return tokenizer
  if kind != 'sentencepiece':
    raise ValueError(f'tokenizer.kind={kind} needs --config.tokenizer.path=.../tokenizer.json; '
                     'a tokenizer trained by the run is SentencePiece (tokenizer.kind='
                     'sentencepiece, the default).')
  if callable(train_texts):
    train_texts = train_texts()
  train_tokenizer(train_texts, vocab_size=tcfg.vocab_size, model_type=tcfg.model_type,
                  model_path=path)
  return from_config(tcfg, path)
