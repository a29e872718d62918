"""--mode=compile: the real train, export and decode steps compiled by the TPU compiler for a
TPU topology on this CPU host (libtpu's compile-only devices), through the CLI."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Only where libtpu is not installed (e.g. a platform it has no wheel for); an installed
# libtpu that fails to compile fails the test.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed: no TPU compiler to compile for (pip install -e ".[tpu]")')

# The README's CPU config with one block per model (the TPU compiler's time grows with the
# program), FSDP over the 4 chips of a v5e:2x2 so the steps need collectives.
_SMALL = ['--config=experiments/configs/scone.py', '--topology=v5e:2x2',
          '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.model.num_layers=1',
          '--config.fgram_model.num_layers=1']


def _compile(*args):
  proc = subprocess.run([sys.executable, '-m', 'scone_jax.main', '--mode=compile', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  lines = proc.stdout.strip().splitlines()
  report = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else None
  return proc, report


@pytest.mark.slow
def test_small_config_compiles_for_v5e_2x2_and_fits():
  proc, report = _compile(*_SMALL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report['fits'] and report['devices'] == 4
  assert report['device_kind'] == 'TPU v5 lite'
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  for name in ('train', 'export', 'decode'):
    step = report['steps'][name]
    assert step['fits'], (name, step)
    mem = step['memory']
    assert mem['arguments'] > 0 and mem['outputs'] > 0 and mem['total'] > 0, (name, mem)
    assert mem['total'] <= mem['hbm'] == 16 << 30
    assert step['flops_per_device'] > 0, name
    assert step['bytes_accessed_per_device'] > 0, name
  assert report['steps']['train']['model_flops_per_device'] > 0
  train = report['steps']['train']
  # The donated state aliases the new state: its bytes are not counted twice.
  assert train['memory']['aliased'] > 0
  # FSDP: parameters gathered for the forward pass, gradients reduced back to their shards.
  assert train['collectives']['all-gather'] > 0, train['collectives']
  assert train['collectives']['reduce-scatter'] + train['collectives']['all-reduce'] > 0
  assert sum(report['steps']['export']['collectives'].values()) > 0
  # Serving decodes on one chip: nothing to communicate.
  assert sum(report['steps']['decode']['collectives'].values()) == 0
  # Every position matched by a distinct 5-token f-gram, 3 to a row of 16 slots: 683 rows,
  # bucketed to a multiple of 8.
  assert train['fgram_rows'] == 688
  assert report['steps']['export']['passes'] == 4  # 16,000 f-grams / 4,096 per pass
  assert 'train: fits; per device GiB' in proc.stdout


@pytest.mark.slow
def test_a_config_that_does_not_fit_exits_with_one_error_line():
  # 16,384 rows of 128 tokens in one micro-batch: about twice a v5e chip's 16 GiB (8,192
  # rows compile to 15.0 GiB per chip, mostly logits and the f-gram model's packed rows).
  proc, report = _compile(*_SMALL, '--config.batch_size=16384')
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: does not fit v5e:2x2 x1: train (')
  assert report is not None and report['fits'] is False
  assert report['steps']['train']['fits'] is False
  assert report['steps']['decode']['fits'] is True  # decode does not depend on the batch


@pytest.mark.slow
def test_two_slices_put_the_data_axis_across_slices():
  proc, report = _compile(*_SMALL, '--num_slices=2', '--config.mesh.dcn_data=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report['num_slices'] == 2 and report['devices'] == 8
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  # Each data index is one slice: only the data-parallel gradient reduction crosses DCN.
  assert report['data_axis_slices'] == [[0], [1]]
  train = report['steps']['train']
  assert train['fits']
  assert train['collectives']['all-reduce'] > 0


def _devices_in_fresh_process(env_extra):
  code = ('from scone_jax import compile as c\n'
          'try:\n'
          '  print(len(c.topology_devices("v5e:2x2")))\n'
          'except RuntimeError as e:\n'
          '  print(e)\n')
  env = {k: v for k, v in os.environ.items() if k != 'ALLOW_MULTIPLE_LIBTPU_LOAD'}
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**env, 'PYTHONPATH': REPO, **env_extra})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip().splitlines()[-1]


def test_compile_runs_beside_a_process_holding_the_libtpu_lockfile():
  """A server or trainer on a host with libtpu holds libtpu's lockfile; a compile needs no
  TPU, so it must still get its compile-only devices, and when the lockfile does stop it
  (ALLOW_MULTIPLE_LIBTPU_LOAD=0 set by hand) the error says so and names the holder."""
  import time  # pylint: disable=g-import-not-at-top
  from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  # A process that loads libtpu (all JAX platforms probed, as a plain `jax.devices()` does).
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'ALLOW_MULTIPLE_LIBTPU_LOAD')}
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import jax, sys, time\njax.devices()\nprint("up", flush=True)\n'
       'time.sleep(600)'], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'up'
    deadline = time.time() + 30
    while not any(h.startswith(f'{holder.pid} ') for h in compile_lib.lockfile_holders()):
      assert time.time() < deadline, 'the holder never took libtpu\'s lockfile'
      time.sleep(0.2)
    assert _devices_in_fresh_process({}) == '4'
    error = _devices_in_fresh_process({'ALLOW_MULTIPLE_LIBTPU_LOAD': '0'})
    assert f'lockfile {compile_lib.LIBTPU_LOCKFILE}' in error, error
    assert f'{holder.pid} (' in error and 'needs libtpu' not in error, error
  finally:
    holder.kill()
    holder.wait()


_DECODE_S = '''
import json, sys
from experiments import configs
from scone_jax import compile as c
devices = c.topology_devices('v5e:2x2')
out = {}
for storage in ('host', 'device'):
  for s in (1000, 1000000):
    cfg = configs.load('experiments/configs/scone.py')
    with cfg.unlocked():
      cfg.model.num_layers = 1
      cfg.fgrams.num_fgrams = s
    out[f'{storage}:{s}'] = c.compile_decode(cfg, devices, table_storage='host',
                                             matcher_storage=storage)
import numpy as np, jax.numpy as jnp
out['row_bytes'] = cfg.model.d_model * np.dtype(jnp.dtype(cfg.export.dtype)).itemsize
print(json.dumps(out))
'''


@pytest.mark.slow
def test_the_compiled_decode_chunk_does_not_grow_with_s_off_the_accelerator():
  """The decode chunk serving runs, compiled for a v5e chip with S = 1,000 and 1,000,000
  f-grams: with the matcher and the table in host memory its accelerator bytes are the
  same (the f-gram path's bytes are host bytes, reported beside them); with the matcher on
  the accelerator they grow by its ~38 bytes per f-gram."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _DECODE_S], cwd=REPO, capture_output=True,
                        text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  row_bytes = r.pop('row_bytes')
  accel = lambda key: tuple(r[key]['memory'][k] for k in ('arguments', 'temporaries',
                                                          'outputs'))
  assert all(x['fits'] and x['matcher_storage'] in key for key, x in r.items())
  assert accel('host:1000') == accel('host:1000000')
  table_growth = 999000 * row_bytes
  host_growth = (r['host:1000000']['memory']['host_arguments']
                 - r['host:1000']['memory']['host_arguments'])
  assert host_growth >= table_growth + 30 * 999000, host_growth
  device_growth = (r['device:1000000']['memory']['arguments']
                   - r['device:1000']['memory']['arguments'])
  assert 30 * 999000 <= device_growth <= 64 * 999000, device_growth
