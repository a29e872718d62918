"""Multi-host training: 2 local processes × 4 CPU devices joined by jax.distributed.

Runs `launch/local_run.sh` (the same entry point a pod uses, with the coordinator on
127.0.0.1) and checks the run against one process with 8 devices: same losses, and each
process fed its own part of every global batch.
"""
import json
import os
import shutil
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


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch_two(args, log_dir, bind_for_p1=None, timeout=600):
  """Two trainers joined by jax.distributed (as launch/local_run.sh starts them); with
  bind_for_p1=(src, dst), process 1 runs in its own mount namespace where src is mounted
  over dst: that host sees other files there than process 0. Returns (rcs, [out0, out1])."""
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    cmd = [sys.executable, '-m', 'scone_jax.main', *args]
    if i == 1 and bind_for_p1:
      cmd = ['unshare', '-m', '--propagation', 'private', 'sh', '-c',
             'mount --bind "$1" "$2" && shift 2 && exec "$@"', 'sh', *bind_for_p1, *cmd]
    log = open(os.path.join(log_dir, f'p{i}.log'), 'w')  # pylint: disable=consider-using-with
    logs.append(log)
    procs.append(subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=4',
                 JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                 JAX_PROCESS_ID=str(i))))
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  outs = [open(os.path.join(log_dir, f'p{i}.log')).read() for i in range(2)]
  return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_damage_seen_by_one_process_is_agreed_by_all(tmp_path):
  """Process 1 sees step 4 damaged (a truncated copy is mounted over it in its own mount
  namespace: hosts with different views of the checkpoint), process 0 reads it whole. Both
  must still reach one decision (damaged), set it aside once and resume from step 2
  together, instead of restoring different steps and deadlocking."""
  probe = subprocess.run(['unshare', '-m', '--propagation', 'private', 'true'],
                         capture_output=True, text=True)
  if probe.returncode:
    pytest.skip(f'cannot give one process its own mount namespace ({probe.stderr.strip()}): '
                'needs root')
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  config = tiny.write_config_file(str(tmp_path / 'config.py'), corpus_dir, steps=STEPS)
  workdir = str(tmp_path / 'multi')
  args = ['--mode=train', f'--config={config}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=2', '--config.async_checkpointing=False',
          f'--workdir={workdir}']
  rcs, outs = _launch_two(args, str(tmp_path))
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  ckpt = os.path.join(workdir, 'checkpoints')
  step_dir = os.path.join(ckpt, str(STEPS))
  damaged = str(tmp_path / 'damaged_view')
  shutil.copytree(step_dir, damaged)
  truncated = 0
  for root, _, files in os.walk(os.path.join(damaged, 'state')):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + 'd' + os.sep in path and os.path.getsize(path) > 1000:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  rcs, outs = _launch_two(args + [f'--config.num_train_steps={STEPS + 2}'], str(tmp_path),
                          bind_for_p1=(damaged, step_dir))
  p0, p1 = outs
  assert rcs == [0, 0], f'exit codes {rcs}:\n{p0[-3000:]}\n{p1[-3000:]}'
  # Process 1 found the damage itself; process 0 read step 4 whole and learnt it from the
  # agreement.
  assert 'is unreadable (' in p1 and 'another process could not read' not in p1, p1[-3000:]
  assert 'another process could not read' in p0, p0[-3000:]
  for out in outs:
    assert 'resumed from step 2' in out, out[-3000:]
  assert (p0 + p1).count('moved the unreadable checkpoint') == 1
  assert os.path.isdir(os.path.join(ckpt, f'{STEPS}.unreadable'))
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())[-1] == STEPS + 2
