"""The one config loader of the experiments/ scripts: a config file as the CLI reads it.

  from experiments import configs
  cfg = configs.load('experiments/configs/scone.py', ['fgrams.num_fgrams=4000'])
  cfg = configs.load('experiments/configs/from_json.py:RUN/config.json')

`path[:arg]` is what `--config=` takes (`get_config(arg)` when an argument is given);
overrides are `field.sub=value` strings parsed to the field's type, as `--config.field.sub=`
is. Unknown fields and ill-typed values fail with one line naming them.
"""
import importlib.util
import os

import ml_collections


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such config file.')
  module_spec = importlib.util.spec_from_file_location(
      f'experiments_config_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    override(cfg, item)
  return cfg


def override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `field.sub=value` override in place, the value parsed to the field's type."""
  key, sep, value = item.partition('=')
  if not sep:
    raise ValueError(f'config override {item!r}: use field=value.')
  node = cfg
  *parents, leaf = key.split('.')
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise ValueError(f'config override {item!r}: no config group {p!r}.')
    node = node[p]
  if leaf not in node:
    raise ValueError(f'config override {item!r}: {key} is not a config field.')
  old = node[leaf]
  if isinstance(old, bool):
    if value.lower() not in ('1', 'true', '0', 'false'):
      raise ValueError(f'config override {item!r}: {key} takes true or false.')
    node[leaf] = value.lower() in ('1', 'true')
  elif old is None or isinstance(old, str):
    node[leaf] = value
  else:
    try:
      node[leaf] = type(old)(value)
    except (TypeError, ValueError):
      raise ValueError(f'config override {item!r}: {key} takes a {type(old).__name__}.') from None
