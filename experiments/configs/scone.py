"""SCONE: `baseline.py`'s main model plus f-gram embeddings from a jointly trained f-gram model.

16k f-grams (2 <= n <= 5, each seen >= 44 times in the training split) and a 2-layer f-gram
model of the main model's width: the study's headline point (experiments/README.md).
"""
from scone_jax import config


def get_config():
  c = config.cpu_default(config.default_config())
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = 16000
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  return c
