"""The IO layer: one place for local and gs:// paths, atomic writes, clear URL errors."""
import os
import subprocess
import sys

import pytest

from scone_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('bad', ['s3://bucket/run', 'gs:/bucket/run', 'hdfs://nn/x', 'gs:b'])
def test_unsupported_schemes_fail_clearly(bad):
  with pytest.raises(ValueError, match='unsupported path'):
    paths.check(bad)


def test_cloud_paths_join_and_kvstore():
  assert paths.is_cloud('gs://b/run') and not paths.is_cloud('/tmp/run')
  assert paths.join('gs://b/run', 'export', 'table') == 'gs://b/run/export/table'
  assert paths.kvstore_spec('gs://b/run/table') == {'driver': 'gcs', 'bucket': 'b',
                                                    'path': 'run/table/'}
  assert paths.kvstore_spec('rel')['path'] == os.path.abspath('rel')
  assert paths.abspath('gs://b/x') == 'gs://b/x'


def test_atomic_write_replaces_whole_and_leaves_no_temporaries(tmp_path):
  target = tmp_path / 'out.json'
  paths.write_json_atomic(str(target), {'a': 1})
  paths.write_json_atomic(str(target), {'a': 2})
  assert paths.read_json(str(target)) == {'a': 2}
  assert os.listdir(tmp_path) == ['out.json']
  paths.copy(str(target), str(tmp_path / 'copy.json'))
  assert paths.read_json(str(tmp_path / 'copy.json')) == {'a': 2}
  assert sorted(os.listdir(tmp_path)) == ['copy.json', 'out.json']


def test_cli_refuses_a_workdir_with_an_unsupported_scheme(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'scone_jax.main', '--mode=train',
       '--config=experiments/configs/scone.py', '--workdir=s3://bucket/run'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'unsupported path' in proc.stderr
  assert not os.path.exists(os.path.join(REPO, 's3:'))
