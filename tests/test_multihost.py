"""Multi-host training: 2 local processes × 4 CPU devices joined by jax.distributed.

Runs `launch/local_run.sh` (the same entry point a pod uses, with the coordinator on
127.0.0.1) and checks the run against one process with 8 devices: same losses, and each
process fed its own part of every global batch.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def _env(**extra):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', **extra)
  return env


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  config = tiny.write_config_file(str(tmp_path / 'config.py'), corpus_dir, steps=STEPS)
  args = ['--mode=train', f'--config={config}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=2']

  multi = str(tmp_path / 'multi')
  proc = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local_run.sh'), '2', '4', '--',
                         *args, f'--workdir={multi}'], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert '[p0]' in proc.stdout and '[p1]' in proc.stdout

  single = str(tmp_path / 'single')
  proc = subprocess.run([sys.executable, '-m', 'scone_jax.main', *args, f'--workdir={single}'],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert proc.returncode == 0, proc.stderr[-4000:]

  multi_losses, single_losses = _losses(multi), _losses(single)
  assert sorted(multi_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi_losses[s] for s in sorted(multi_losses)],
                             [single_losses[s] for s in sorted(single_losses)], rtol=2e-4)
  # Both processes wrote their shards of the final checkpoint; the tokenizer was made once.
  assert os.path.isdir(os.path.join(multi, 'checkpoints', str(STEPS)))
  assert not [f for f in os.listdir(multi) if '.tmp' in f]


def _process_pids(workdir):
  """{JAX_PROCESS_ID: pid} of the running trainers of workdir."""
  found = {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmd = f.read().split(b'\0')
      with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(e.split(b'=', 1) for e in f.read().split(b'\0') if b'=' in e)
    except OSError:
      continue
    if b'scone_jax.main' in cmd and f'--workdir={workdir}'.encode() in cmd:
      found[int(env.get(b'JAX_PROCESS_ID', b'-1'))] = int(pid)
  return found


@pytest.mark.slow
def test_sigterm_on_one_host_checkpoints_the_same_step_on_all(tmp_path):
  """A preemption notice reaching one process stops both at one agreed step, each writing
  its shards of that checkpoint; the same launch then resumes there on both."""
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  steps = 40
  config = tiny.write_config_file(str(tmp_path / 'config.py'), corpus_dir, steps=steps)
  workdir = str(tmp_path / 'multi')
  cmd = ['bash', os.path.join(REPO, 'launch', 'local_run.sh'), '2', '4', '--', '--mode=train',
         f'--config={config}', '--config.log_every_steps=1',
         '--config.checkpoint_every_steps=1000', f'--workdir={workdir}']
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if os.path.isfile(metrics) and os.path.getsize(metrics):
      break
    time.sleep(0.05)
  pids = _process_pids(workdir)
  assert proc.poll() is None and set(pids) == {0, 1}, pids
  os.kill(pids[1], signal.SIGTERM)        # the notice reaches process 1 only
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, out[-4000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert len(saved) == 1 and saved[0] < steps, (saved, out[-4000:])
  for p in ('[p0]', '[p1]'):
    assert any(line.startswith(p) and f'stopping at step {saved[0]}' in line
               for line in out.splitlines()), out[-4000:]

  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:]
  for p in ('[p0]', '[p1]'):
    assert any(line.startswith(p) and f'resumed from step {saved[0]}' in line
               for line in proc.stdout.splitlines()), proc.stdout[-4000:]
  assert sorted(_losses(workdir))[-1] == steps


@pytest.mark.slow
def test_damage_seen_by_one_process_is_agreed_by_all(tmp_path):
  """Step 4's parameter shards that only process 1 reads are truncated: process 0 reads its
  part fine. Both must still reach one decision (damaged), set it aside once and resume
  from step 2 together, instead of restoring different steps and deadlocking."""
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  config = tiny.write_config_file(str(tmp_path / 'config.py'), corpus_dir, steps=STEPS)
  workdir = str(tmp_path / 'multi')
  # FSDP over all 8 devices: each process holds (and saves, and reads) its own shards.
  cmd = ['bash', os.path.join(REPO, 'launch', 'local_run.sh'), '2', '4', '--', '--mode=train',
         f'--config={config}', '--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
         '--config.async_checkpointing=False', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
         f'--workdir={workdir}']
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:]
  ckpt = os.path.join(workdir, 'checkpoints')
  data = os.path.join(ckpt, str(STEPS), 'state', 'ocdbt.process_1', 'd')
  truncated = 0
  for name in os.listdir(data):
    path = os.path.join(data, name)
    if os.path.getsize(path) > 1000:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
      truncated += 1
  assert truncated
  proc = subprocess.run(cmd + [f'--config.num_train_steps={STEPS + 2}'], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout
  assert proc.returncode == 0, out[-4000:]
  lines = lambda p: [l for l in out.splitlines() if l.startswith(p)]
  # Only process 1 found the damage itself; process 0 learnt it from the agreement.
  assert any('is unreadable (' in l and 'another process' not in l for l in lines('[p1]')), out
  assert any('another process could not read' in l for l in lines('[p0]')), out[-4000:]
  for p in ('[p0]', '[p1]'):
    assert any('resumed from step 2' in l for l in lines(p)), out[-4000:]
  assert sum('moved the unreadable checkpoint' in l for l in out.splitlines()) == 1
  assert os.path.isdir(os.path.join(ckpt, f'{STEPS}.unreadable'))
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())[-1] == STEPS + 2
