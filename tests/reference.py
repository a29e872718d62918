"""Brute-force f-gram references, shared by the tests and experiments/bench_fgrams.py.

Written independently of scone_jax: a Counter over token tuples and a dict lookup per
position, no numba and no encoding tricks, so that they can check the compiled code. The
benchmark times them as the denominators of its speedups, so keep them plain Python.
"""
import collections

import numpy as np


def reference_extract(documents, max_len, min_count, num_fgrams=None):
  """[(tuple, count)] ranked by (count desc, tuple asc): every n-gram, 2 <= n <= max_len,
  inside one document (overlaps count) with count >= min_count; the first `num_fgrams`
  (all when None)."""
  counter = collections.Counter()
  for doc in documents:
    doc = np.asarray(doc).tolist()
    for n in range(2, max_len + 1):
      counter.update(tuple(doc[i:i + n]) for i in range(len(doc) - n + 1))
  ranked = sorted(((g, c) for g, c in counter.items() if c >= min_count),
                  key=lambda gc: (-gc[1], gc[0]))
  return ranked if num_fgrams is None else ranked[:num_fgrams]


def reference_match(tokens, ngram_to_id, max_len):
  """(ids, lengths), int32: at each position the longest n-gram of `ngram_to_id` (tuple ->
  id) ending there, at most max_len tokens, none before tokens[0]; no match: -1, 1."""
  tokens = np.asarray(tokens).tolist()
  ids, lengths = [], []
  for i in range(len(tokens)):
    fid, flen = -1, 1
    for n in range(min(max_len, i + 1), 1, -1):
      found = ngram_to_id.get(tuple(tokens[i - n + 1:i + 1]))
      if found is not None:
        fid, flen = found, n
        break
    ids.append(fid)
    lengths.append(flen)
  return np.array(ids, np.int32), np.array(lengths, np.int32)
