"""SCONE: `baseline.py`'s main model plus f-gram embeddings from a jointly trained f-gram model."""
import importlib.util
import os


def _baseline():
  # Loaded by path so the config works however config_flags imports this file.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'baseline.py')
  spec = importlib.util.spec_from_file_location('scone_baseline_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _baseline().get_config()
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = 20000
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  return c
