"""experiments.configs.load: the one config loader of the experiments/ scripts."""
import json
import os

import pytest

from experiments import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_a_config_file_with_overrides():
  cfg = configs.load(os.path.join(REPO, 'experiments/configs/scone.py'),
                     ['fgrams.num_fgrams=4000', 'model.dtype=float32', 'fgrams.enabled=false'])
  assert cfg.fgrams.num_fgrams == 4000 and cfg.model.dtype == 'float32'
  assert cfg.fgrams.enabled is False


def test_load_from_json_with_an_argument(tmp_path):
  base = configs.load(os.path.join(REPO, 'experiments/configs/scone.py'))
  base.seed = 7
  path = tmp_path / 'config.json'
  path.write_text(base.to_json_best_effort())
  cfg = configs.load(f'{os.path.join(REPO, "experiments/configs/from_json.py")}:{path}')
  assert cfg.seed == 7 and json.loads(cfg.to_json_best_effort()) == json.loads(path.read_text())


@pytest.mark.parametrize('item,message', [
    ('fgrams.nope=1', 'is not a config field'), ('nogroup.x=1', "no config group 'nogroup'"),
    ('seed=abc', 'takes a int'), ('fgrams.enabled=maybe', 'takes true or false'),
    ('seed', 'use field=value')])
def test_bad_overrides_are_named(item, message):
  with pytest.raises(ValueError, match=message):
    configs.load(os.path.join(REPO, 'experiments/configs/scone.py'), [item])
