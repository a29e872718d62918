"""Sampled matching: the training-time remedies that may let a model use f-grams it never met.

A model trained on one fixed set leans on exactly those f-grams, and a table grown after
training reads as noise to it (issue 29). Two ways to make the set it trains on less fixed,
both deciding per f-gram found inside the longest-match search (`kernels.match_flat_sampled`):

  keep_fraction  each segment (a training row) matches against a random subset of the set,
                 this fraction of it; the longest active f-gram ending at a position is taken.
  drop_prob      at each matched position the match is dropped to the next shorter (active)
                 f-gram ending there with this probability, repeatedly; none left: unmatched.

Every decision is a hash of (seed, the segment's key, [position,] f-gram id), so the same
rows always get the same matches (resumes are exact) and nothing but the matches changes.
keep_fraction 1 and drop_prob 0 match exactly as `FGramSet.match_flat` does.
"""
import dataclasses

import numpy as np

from scone_jax.fgrams import kernels
from scone_jax.fgrams.fgram_set import _as_tokens

_ONE = 1 << 53  # the kernel's uniforms are 53-bit integers


@dataclasses.dataclass(frozen=True)
class MatchSampling:
  """How training samples its matches; see the module docstring."""
  seed: int
  keep_fraction: float = 1.0
  drop_prob: float = 0.0

  def __post_init__(self):
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f'keep_fraction={self.keep_fraction} must be in (0, 1] (1 = the whole '
                       'set).')
    if not 0.0 <= self.drop_prob < 1.0:
      raise ValueError(f'drop_prob={self.drop_prob} must be in [0, 1) (0 = no drops).')

  def match_flat(self, fgram_set, tokens, offsets, keys):
    """`fgram_set.match_flat(tokens, offsets)` sampled; keys: one integer per segment (its
    subset and its drops depend on it; e.g. the global row id) -> (ids, lengths), int32."""
    tokens = _as_tokens(tokens)
    offsets = np.asarray(offsets, np.int64)
    keys = np.asarray(keys).astype(np.uint64)  # wraps negatives (padding rows): a key is a key
    if keys.shape != (offsets.size - 1,):
      raise ValueError(f'keys {keys.shape}: pass one key per segment ({offsets.size - 1}).')
    if offsets[0] != 0 or offsets[-1] != tokens.size or (np.diff(offsets) < 0).any():
      raise ValueError(f'offsets must start at 0, end at len(tokens)={tokens.size} and not '
                       'decrease.')
    ids = np.empty(tokens.size, np.int32)
    lens = np.empty(tokens.size, np.int32)
    t = fgram_set.table
    kernels.match_flat_sampled(
        tokens, offsets, keys, self._seed, self._keep_below, self._drop_below, t.flat, t.width,
        t.shift, fgram_set.max_len, ids, lens)
    return ids, lens

  def active(self, keys, num_fgrams: int) -> np.ndarray:
    """bool [len(keys), num_fgrams]: which f-grams each segment's subset holds."""
    keys = np.asarray(keys).reshape(-1).astype(np.uint64)
    out = np.empty((keys.size, int(num_fgrams)), np.bool_)
    kernels.subset_active(keys, int(num_fgrams), self._seed, self._keep_below, out)
    return out

  @property
  def _seed(self):
    return np.uint64(int(self.seed) % (1 << 64))

  @property
  def _keep_below(self):
    return np.uint64(round(self.keep_fraction * _ONE))

  @property
  def _drop_below(self):
    return np.uint64(round(self.drop_prob * _ONE))
