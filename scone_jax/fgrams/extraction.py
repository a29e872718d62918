"""Exact f-gram extraction in one process: the paper's K-1 pruned counting passes.

An f-gram is a token n-gram, 2 <= n <= `max_len`, that occurs at least `min_count` times
inside the documents of a corpus (overlapping occurrences count, no n-gram crosses a
document boundary); the ranking and the cut to `num_fgrams` are `fgram_set.select_top`'s.

Pass n only looks at positions where the (n-1)-gram starting there AND the one starting one
token later are frequent. Frequency is anti-monotone, so the pruning changes cost, never the
result. Each n-gram is encoded exactly (no hashing) as `prefix_id * V + last_token` with
dense, order-preserving ids, so sorting the codes sorts the n-grams in tuple order; codes
are counted with a numba radix sort. Tuples are only rebuilt for the final candidates.
"""
import time
from typing import Iterable

from absl import logging
import numpy as np

from scone_jax.fgrams import fgram_set
from scone_jax.fgrams import kernels

# Exact fast path while (#frequent (n-1)-grams) * V fits in a uint64 code; above it a
# (slow, exact) row-wise lexsort takes over. Tests lower it to exercise that path.
_WIDE_KEY_LIMIT = 2**64
# Documents are concatenated in chunks of about this many tokens while reading.
_CHUNK_TOKENS = 1 << 22


def _validate_document(doc, index):
  arr = np.asarray(doc)
  if arr.ndim != 1:
    raise ValueError(f'document {index} has shape {arr.shape}; pass 1-D token id arrays.')
  if arr.size == 0:
    return None
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'document {index} has dtype {arr.dtype}; pass integer token ids '
                     '(e.g. tokenizer output as np.int32).')
  lo, hi, max_token = arr.min(), arr.max(), fgram_set.MAX_TOKEN
  if lo < 0 or hi > max_token:
    raise ValueError(f'document {index} has token ids in [{lo}, {hi}]; ids must be in '
                     f'[0, {max_token}] (remove padding/negative ids before extraction).')
  return arr.astype(np.int32, copy=False)


def _concatenate(documents, log):
  """One int32 array of all documents, each followed by a -1 separator."""
  t0 = time.time()
  sep = np.array([-1], np.int32)
  chunks, parts = [], []
  part_tokens = num_docs = num_tokens = 0
  for index, doc in enumerate(documents):
    arr = _validate_document(doc, index)
    num_docs += 1
    if arr is None:
      continue
    parts += [arr, sep]
    part_tokens += arr.size + 1
    num_tokens += arr.size
    if part_tokens >= _CHUNK_TOKENS:
      chunks.append(np.concatenate(parts))
      parts, part_tokens = [], 0
      if len(chunks) % 25 == 0:
        log('f-grams: read %d documents, %d tokens (%.1fs)', num_docs, num_tokens,
            time.time() - t0)
  if parts:
    chunks.append(np.concatenate(parts))
  tok = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  del chunks
  log('f-grams: read %d documents, %d tokens (%.1fs)', num_docs, num_tokens, time.time() - t0)
  return tok, num_tokens


def _wide_pass(prev, tok1, n, min_count, ids, write_ids):
  """Exact but slow pass for when prefix_id * V would overflow a uint64 code."""
  cand = np.flatnonzero((prev[:-1] >= 0) & (prev[1:] >= 0))
  prefix = prev[cand].astype(np.int64)
  last = tok1[cand + n - 1].astype(np.int64)
  order = np.lexsort((last, prefix))
  prefix, last, pos = prefix[order], last[order], cand[order]
  m = len(pos)
  if m == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0
  brk = np.flatnonzero((prefix[1:] != prefix[:-1]) | (last[1:] != last[:-1])) + 1
  starts = np.concatenate([[0], brk])
  run_counts = np.diff(np.concatenate([starts, [m]]))
  frequent = run_counts >= min_count
  if write_ids:
    run_ids = np.where(frequent, np.cumsum(frequent) - 1, -1)
    ids[pos] = np.repeat(run_ids, run_counts)
  return prefix[starts[frequent]], last[starts[frequent]], run_counts[frequent], m


def extract(documents: Iterable, *, max_len: int, min_count: int, num_fgrams: int,
            progress: bool = True) -> fgram_set.FGramSet:
  """Exact f-gram extraction: n-grams (2 <= n <= max_len) inside documents with count >=
  min_count, ranked by (count desc, tuple asc); the top `num_fgrams` become the set.

  Args:
    documents: iterable of 1-D integer arrays of token ids in [0, 2**31 - 1].
    max_len: K >= 2.
    min_count: >= 1.
    num_fgrams: S >= 1 (the set is smaller if fewer n-grams qualify).
    progress: log per-pass progress at INFO (else DEBUG).

  Returns:
    The FGramSet.
  """
  if not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ValueError(f'max_len={max_len!r}: f-grams have 2 <= n <= max_len; pass an int >= 2 '
                     '(the paper uses 5).')
  if not isinstance(min_count, (int, np.integer)) or min_count < 1:
    raise ValueError(f'min_count={min_count!r}: pass an int >= 1.')
  if not isinstance(num_fgrams, (int, np.integer)) or num_fgrams < 1:
    raise ValueError(f'num_fgrams={num_fgrams!r}: pass an int >= 1.')
  if isinstance(documents, np.ndarray) and documents.ndim == 1 and documents.dtype != object:
    raise ValueError('documents is one flat array; pass an iterable of documents, e.g. '
                     '[tokens] for a single document.')
  max_len, min_count, num_fgrams = int(max_len), int(min_count), int(num_fgrams)
  log = logging.info if progress else logging.debug
  t_start = time.time()

  tok, num_tokens = _concatenate(documents, log)

  # Pass 1: frequent tokens, renumbered densely in increasing order (so that comparing
  # dense ids compares tokens) with -1 for rare tokens and document separators.
  t0 = time.time()
  max_token = int(tok.max()) if tok.size else -1
  if max_token + 1 <= max(1 << 24, 2 * tok.size):
    token_counts = kernels.count_tokens(tok, max_token + 1)
    vocab = np.flatnonzero(token_counts >= min_count).astype(np.int32)
    lut = np.full(max_token + 1, -1, np.int32)
    lut[vocab] = np.arange(len(vocab), dtype=np.int32)
    kernels.densify_lut(tok, lut)
    del lut, token_counts
  else:
    values, token_counts = np.unique(tok[tok >= 0], return_counts=True)
    vocab = values[token_counts >= min_count].astype(np.int32)
    kernels.densify_search(tok, vocab)
    del values, token_counts
  tok1 = tok
  num_vocab = len(vocab)
  log('f-grams pass 1: %d tokens, %d frequent tokens (%.1fs)', num_tokens, num_vocab,
      time.time() - t0)

  # Passes 2..K. Level n keeps, per frequent n-gram (dense id = rank in tuple order among
  # n-grams), the id of its (n-1)-prefix and its last dense token.
  prefix_by_len = {}
  last_by_len = {}
  counts_by_len = {}
  num_prev = num_vocab
  prev = tok1
  for n in range(2, max_len + 1):
    if num_prev == 0 or tok1.size < n:
      break
    t0 = time.time()
    write_ids = n < max_len
    # Pass n overwrites pass n-1's ids (pass 1's are the tokens, which are kept).
    ids = prev if (n > 2 or not write_ids) else np.empty_like(tok1)
    if num_prev * num_vocab <= _WIDE_KEY_LIMIT:
      m = kernels.count_candidates(prev)
      nbits = max(1, (num_prev * num_vocab - 1).bit_length())
      keys = np.empty(m, np.uint32 if nbits <= 32 else np.uint64)
      pos = np.empty(m if write_ids else 0, np.uint32 if tok1.size < 2**32 else np.int64)
      kernels.fill_candidates(prev, tok1, n, num_vocab, keys, pos, write_ids)
      keys, pos = kernels.radix_sort(keys, pos, nbits, write_ids)
      if write_ids:
        ids[:] = -1
      fkeys, fcounts = kernels.scan_runs(keys, pos, min_count, ids, write_ids)
      del keys, pos
      prefix_by_len[n] = (fkeys // np.uint64(num_vocab)).astype(np.int64)
      last_by_len[n] = (fkeys % np.uint64(num_vocab)).astype(np.int64)
      del fkeys
    else:
      logging.warning('f-grams pass %d: %d x %d codes overflow uint64; using the slow exact '
                      'row sort.', n, num_prev, num_vocab)
      prev_copy = prev.copy() if write_ids else prev
      if write_ids:
        ids[:] = -1
      prefix_by_len[n], last_by_len[n], fcounts, m = _wide_pass(
          prev_copy, tok1, n, min_count, ids, write_ids)
      del prev_copy
    counts_by_len[n] = fcounts
    num_prev = len(fcounts)
    prev = ids
    log('f-grams pass %d: %d candidate positions, %d frequent %d-grams (%.1fs)', n, m,
        num_prev, n, time.time() - t0)
  del prev, tok, tok1

  # Keep only candidates that can make the top S by count (ties at the boundary included),
  # rebuild their tuples, and let select_top rank them.
  t0 = time.time()
  lens_present = sorted(counts_by_len)
  all_counts = (np.concatenate([counts_by_len[n] for n in lens_present])
                if lens_present else np.zeros(0, np.int64))
  if all_counts.size > num_fgrams:
    threshold = np.partition(all_counts, all_counts.size - num_fgrams)[
        all_counts.size - num_fgrams]
  else:
    threshold = min_count
  del all_counts
  rows, counts = [], []
  for n in lens_present:
    cur = np.flatnonzero(counts_by_len[n] >= threshold)
    r = np.full((cur.size, max_len), -1, np.int32)
    counts.append(counts_by_len[n][cur])
    for level in range(n, 1, -1):
      r[:, level - 1] = vocab[last_by_len[level][cur]]
      cur = prefix_by_len[level][cur]
    r[:, 0] = vocab[cur]
    rows.append(r)
  rows = np.concatenate(rows) if rows else np.zeros((0, max_len), np.int32)
  counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
  result = fgram_set.select_top(rows, counts, max_len=max_len, num_fgrams=num_fgrams)
  log('f-grams: %d candidates with count >= %d, kept %d (%.1fs); total %.1fs, %.2fM tokens/s',
      len(rows), threshold, len(result), time.time() - t0, time.time() - t_start,
      num_tokens / max(time.time() - t_start, 1e-9) / 1e6)
  return result
