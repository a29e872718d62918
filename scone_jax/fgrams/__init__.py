"""F-grams: exact extraction of frequent n-grams, the `FGramSet`, and a compiled matcher.

An f-gram is a token n-gram, 2 <= n <= `max_len`, that occurs at least `min_count` times
inside the documents of a corpus; all lengths are ranked together by (count desc, token
tuple asc), the first `num_fgrams` are kept and an f-gram's id is its rank. Matching finds,
for each position, the longest f-gram ending there (causal, within the document).

  kernels.py     numba kernels: hashing, the match table, matching (batch and decode-time
                 `advance_matches`), radix sort and run scans for counting
  fgram_set.py   `FGramSet` (persistence, fingerprint, matching) and ranking:
                 `rank_order`, `select_top`, `union` (several sets as one)
  extraction.py  `extract`: exact in-process extraction with the K-1 pruned passes
  sampling.py    `MatchSampling`: training-time sampled matching (a random subset of the
                 set per row, random drops to shorter f-grams), keyed by hashes

Use the names below; the modules' underscore names are private to this package.
`extract` and `MatchSampling` are loaded on first use, so a serving process (which
matches the whole set, never extracts or samples) loads no extraction or sampling code.
"""
from scone_jax.fgrams.fgram_set import FGramSet
from scone_jax.fgrams.fgram_set import FORMAT_VERSION
from scone_jax.fgrams.fgram_set import MAX_TOKEN
from scone_jax.fgrams.fgram_set import rank_order
from scone_jax.fgrams.fgram_set import select_top
from scone_jax.fgrams.fgram_set import union
from scone_jax.fgrams.kernels import advance_matches

__all__ = ['FGramSet', 'FORMAT_VERSION', 'MAX_TOKEN', 'MatchSampling', 'advance_matches',
           'extract', 'rank_order', 'select_top', 'union']


def __getattr__(name):
  if name == 'extract':
    from scone_jax.fgrams import extraction  # pylint: disable=g-import-not-at-top
    return extraction.extract
  if name == 'MatchSampling':
    from scone_jax.fgrams import sampling  # pylint: disable=g-import-not-at-top
    return sampling.MatchSampling
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
