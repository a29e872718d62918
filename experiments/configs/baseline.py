"""Baseline: the main decoder-only LM alone, small enough to train on a CPU in minutes.

`scone.py` is this config plus f-grams; every main-model field is shared so the two
runs compare like for like. The sizes are `config.cpu_default` (chosen by the CPU scaling
study, experiments/README.md); all fields and their defaults: scone_jax/config.py.
Override any on the command line: `--config.model.num_layers=4`.
"""
from scone_jax import config


def get_config():
  return config.cpu_default(config.default_config())
