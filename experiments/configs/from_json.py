"""A resolved config written by a run (config.json) or a sweep point, as a config file.

  python -m scone_jax.main --mode=train --config=experiments/configs/from_json.py:RUN/config.json

Fields missing from the JSON keep their defaults; unknown ones fail like any override, except
retired ones that only shaped the computation, not its result (skipped).
"""
import json

import ml_collections

from scone_jax import config as config_lib

# Replaced by fgram_model.pack_len / pack_bucket and compile.fgram_rows when the f-gram
# windows began to be packed; same results, other shapes.
_RETIRED = ('fgram_model.unique_bucket', 'compile.fgram_unique')


def _update(cfg, values, prefix):
  for key, value in values.items():
    if f'{prefix}{key}' in _RETIRED:
      continue
    if key not in cfg:
      raise ValueError(f'{prefix}{key} is not a config field (from the JSON config).')
    if isinstance(cfg[key], ml_collections.ConfigDict):
      _update(cfg[key], value, f'{prefix}{key}.')
    else:
      cfg[key] = value


def get_config(path):
  with open(path, encoding='utf-8') as f:
    values = json.load(f)
  cfg = config_lib.default_config()
  _update(cfg, values, '')
  return cfg
