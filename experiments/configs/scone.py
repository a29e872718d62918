"""SCONE: `baseline.py`'s main model plus f-gram embeddings from a jointly trained f-gram model."""
from scone_jax import config


def get_config():
  c = config.default_config()
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = 20000
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  return c
