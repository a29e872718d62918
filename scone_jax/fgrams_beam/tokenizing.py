"""Held-out documents are dropped, the rest tokenized: (id, text) -> ShardDocument."""
import apache_beam as beam
from apache_beam.metrics.metric import Metrics

from scone_jax import corpus
from scone_jax import token_shards
from scone_jax import tokenizer as tokenizer_lib
from scone_jax.fgrams_beam._common import METRICS_NAMESPACE
from scone_jax.fgrams_beam._common import read_file


def tokenize_documents(texts, tokenizer_path: str, heldout_fraction: float,
                       tokenizer_kind: str = '', special_ids=None):
  """(id, text) -> the training documents as `token_shards.ShardDocument`s whose ids are
  int32 LE bytes (held-out ones dropped before tokenizing)."""
  if heldout_fraction > 0:
    texts = texts | 'DropHeldOut' >> beam.ParDo(_DropHeldOutFn(heldout_fraction))
  return texts | 'Tokenize' >> beam.ParDo(
      _TokenizeFn(tokenizer_path, tokenizer_kind, special_ids))


def doc_tokens(doc: token_shards.ShardDocument) -> bytes:
  return doc.ids


class _TokenizeFn(beam.DoFn):
  """(id, text) -> ShardDocument with int32 LE token bytes; the tokenizer is loaded once
  per instance."""

  def __init__(self, tokenizer_path: str, kind: str = '', special_ids=None):
    self._tokenizer_path = tokenizer_path
    self._kind = kind
    self._special_ids = dict(special_ids or {})
    self._tokenizer = None
    self._docs = Metrics.counter(METRICS_NAMESPACE, 'documents')
    self._tokens = Metrics.counter(METRICS_NAMESPACE, 'tokens')

  def setup(self):
    # Read through FileSystems so gs:// and other remote paths work on workers.
    self._tokenizer = tokenizer_lib.load(self._tokenizer_path, self._kind, self._special_ids,
                                         data=read_file(self._tokenizer_path))

  def process(self, doc: tuple[str, str]):
    doc_id, text = doc
    ids = self._tokenizer.encode(text).astype('<i4')
    self._docs.inc()
    self._tokens.inc(ids.size)
    yield token_shards.shard_document(doc_id, text, ids.tobytes())


class _DropHeldOutFn(beam.DoFn):
  """Keeps the training documents: (id, text) whose corpus.heldout_score(id) >= fraction."""

  def __init__(self, heldout_fraction: float):
    self._fraction = heldout_fraction
    self._heldout = Metrics.counter(METRICS_NAMESPACE, 'heldout_documents')

  def process(self, doc: tuple[str, str]):
    if corpus.heldout_score(doc[0]) < self._fraction:
      self._heldout.inc()
      return
    yield doc
