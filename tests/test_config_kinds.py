"""config.RESUME_KINDS: every field says whether a resume may change it, and resumes obey."""
import glob
import json
import os

import pytest

from experiments import configs
from scone_jax import artifacts
from scone_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = (config_lib.IDENTITY, config_lib.OPERATIONAL)


def _fields(cfg) -> list:
  return sorted(artifacts.flatten(json.loads(cfg.to_json_best_effort())))


def _unclassified(cfg) -> list:
  return [f for f in _fields(cfg) if config_lib.resume_kind(f) not in KINDS]


def test_every_field_of_the_schema_is_classified():
  assert not _unclassified(config_lib.default_config()), (
      'add these fields to config.RESUME_KINDS')


def test_every_entry_names_a_field_or_group_of_the_schema():
  fields = _fields(config_lib.default_config())
  groups = {'.'.join(f.split('.')[:n]) for f in fields for n in range(1, f.count('.') + 1)}
  stale = [k for k in config_lib.RESUME_KINDS if k not in fields and k not in groups]
  assert not stale, 'config.RESUME_KINDS names fields the schema no longer has'
  assert set(config_lib.RESUME_KINDS.values()) <= set(KINDS)


def _experiment_configs(tmp_dir):
  """(name, config) of every experiments/configs/*.py, with an argument where it needs one."""
  out = []
  for path in sorted(glob.glob(os.path.join(REPO, 'experiments', 'configs', '*.py'))):
    name = os.path.basename(path)[:-3]
    if name == '__init__':
      continue
    if name == 'from_json':
      saved = os.path.join(tmp_dir, 'config.json')
      with open(saved, 'w', encoding='utf-8') as f:
        f.write(configs.load(os.path.join(REPO, 'experiments/configs/scone.py'))
                .to_json_best_effort())
      path = f'{path}:{saved}'
    out.append((name, configs.load(path)))
  return out


def test_every_field_of_every_experiment_config_is_classified(tmp_path):
  loaded = _experiment_configs(str(tmp_path))
  assert len(loaded) >= 6
  for name, cfg in loaded:
    assert not _unclassified(cfg), f'experiments/configs/{name}.py'


def _run_dir(tmp_path, cfg) -> str:
  """A workdir as training leaves it, as far as check_config looks: config.json, checkpoints/."""
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, artifacts.CHECKPOINT_DIR))
  artifacts.write_config(cfg, workdir)
  return workdir


def test_resume_accepts_operational_changes(tmp_path):
  cfg = config_lib.default_config()
  cfg.profile_steps = '40,42'
  workdir = _run_dir(tmp_path, cfg)
  resumed = config_lib.default_config()
  resumed.profile_steps = ''
  resumed.compilation_cache = False
  resumed.num_train_steps = cfg.num_train_steps * 2
  resumed.mesh.fsdp = 2
  artifacts.check_config(resumed, workdir)  # no error
  refused, allowed = artifacts.config_changes(json.loads(cfg.to_json_best_effort()),
                                              json.loads(resumed.to_json_best_effort()))
  assert not refused
  assert "profile_steps: '40,42' -> ''" in allowed and 'compilation_cache: True -> False' in allowed


@pytest.mark.parametrize('field,value', [('model.d_model', 512), ('seed', 3),
                                         ('fgrams.num_fgrams', 99), ('learning_rate', 0.5)])
def test_resume_refuses_identity_changes(tmp_path, field, value):
  cfg = config_lib.default_config()
  workdir = _run_dir(tmp_path, cfg)
  resumed = config_lib.default_config()
  resumed.profile_steps = '2,4'  # allowed, and not what the error names
  group, _, leaf = field.rpartition('.')
  setattr(resumed[group] if group else resumed, leaf, value)
  with pytest.raises(ValueError, match='holds checkpoints of a run with another config') as e:
    artifacts.check_config(resumed, workdir)
  assert f'{field}: ' in str(e.value) and 'profile_steps' not in str(e.value)


def test_a_field_the_schema_no_longer_has_is_refused():
  refused, allowed = artifacts.config_changes({'seed': 0, 'gone': 1}, {'seed': 0})
  assert refused == ["gone: 1 -> '(absent)'"] and not allowed
