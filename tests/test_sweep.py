"""The sweep runner: a tiny 3-point sweep finishes; kill + rerun gives the same results.csv;
a failing point does not lose the others. Every stage runs the real CLI in a subprocess."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tiny


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_TEMPLATE = '''
import sys
sys.path.insert(0, {tests_dir!r})
import tiny


def get_sweep():
  base = tiny.tiny_config({corpus_dir!r}, steps=6)
  base.eval_every_steps = 3
  base.checkpoint_every_steps = 2
  points = [
      {{'name': 'baseline', 'fgrams.enabled': False, 'fgrams.num_fgrams': 0}},
      {{'fgrams.num_fgrams': 40, 'group': 'count'}},
      {{'fgrams.num_fgrams': 120, 'group': 'count'}},
  ]{extra}
  return base, points
'''


def _write_sweep(path, corpus_dir, extra=''):
  with open(path, 'w') as f:
    f.write(SWEEP_TEMPLATE.format(tests_dir=os.path.dirname(os.path.abspath(__file__)),
                                  corpus_dir=corpus_dir, extra=extra))
  return str(path)


def _env():
  env = dict(os.environ)
  # One device per stage: the subprocesses do not need the 8 fake devices.
  env['XLA_FLAGS'] = ''
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _run(sweep, root, **kw):
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--sweep={sweep}',
                         f'--root={root}'], cwd=REPO, env=_env(), capture_output=True,
                        text=True, **kw)


def _csv(root):
  with open(os.path.join(root, 'results.csv')) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('corpus'))
  tiny.write_corpus(d)
  return d


@pytest.mark.slow
def test_sweep_runs_resumes_and_survives_a_failing_point(corpus_dir, tmp_path):
  bad = ",\n      {'name': 'broken', 'model.mlp_activation': 'nonsense'}"
  sweep = _write_sweep(tmp_path / 'tiny_sweep.py', corpus_dir, extra=f'\n  points += [{bad[2:]}]')
  straight = tmp_path / 'straight'
  proc = _run(sweep, straight)
  assert proc.returncode == 1, proc.stderr[-3000:]   # the broken point failed ...
  status = json.loads(proc.stdout.strip().splitlines()[-1])
  assert status['ran'] == 3 and status['failed'] == 1   # ... and the others still ran
  failed = json.load(open(straight / 'points' / 'broken' / 'failed.json'))
  assert failed['stage'] == 'train' and 'mlp_activation' in failed['error']
  rows = _csv(straight)
  assert [r['name'] for r in rows] == ['baseline', 'num_fgrams=40', 'num_fgrams=120']
  by = {r['name']: r for r in rows}
  # Shared extraction: the 40-gram set is the first 40 ids of the 120-gram set.
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  small = fgrams.FGramSet.load(straight / 'points' / 'num_fgrams=40' / 'fgrams.npz')
  large = fgrams.FGramSet.load(straight / 'points' / 'num_fgrams=120' / 'fgrams.npz')
  assert len(small) == 40 and len(large) == 120
  assert large.top(40).fingerprint == small.fingerprint
  assert len(os.listdir(straight / 'shared')) >= 2   # one tokenizer, one extraction
  for name in ('num_fgrams=40', 'num_fgrams=120'):
    assert float(by[name]['heldout_match_rate']) > 0.1
    assert float(by[name]['params_fgram_model']) > 0
    assert float(by[name]['train_flops_per_token']) > float(by[name]['inference_flops_per_token'])
    # The f-gram model's window positions: the trainer logs them per step; the column is per
    # training token (<= K: at most one window of K per token), the FLOPs are counted from it.
    point = straight / 'points' / name
    cfg = json.load(open(point / 'config.json'))
    tokens_per_step = cfg['batch_size'] * cfg['seq_len']
    logged = {}
    for line in open(point / 'metrics.jsonl'):
      rec = json.loads(line)
      if 'train/fgram_positions_per_step' in rec:
        logged[rec['step']] = rec['train/fgram_positions_per_step']
    per_step = sum(logged.values()) / len(logged)
    assert float(by[name]['fgram_positions_per_step']) == pytest.approx(per_step, rel=1e-5)
    per_token = float(by[name]['fgram_positions_per_token'])
    assert per_token == pytest.approx(per_step / tokens_per_step, rel=1e-5)
    assert 0 < per_token <= cfg['fgrams']['max_len']
  assert by['baseline']['params_fgram_model'] == '0'
  assert by['baseline']['inference_flops_per_token'] == by['num_fgrams=40'][
      'inference_flops_per_token']
  for png in ('count.png', 'ppl_vs_inference_flops.png', 'ppl_vs_training_tokens.png'):
    assert os.path.getsize(straight / png) > 1000
  # A rerun skips the finished points (and retries the broken one, which fails again).
  again = _run(sweep, straight)
  assert json.loads(again.stdout.strip().splitlines()[-1])['done'] == 3

  # Killed mid-way (inside the second point's training), then rerun: the same results.csv.
  sweep_ok = _write_sweep(tmp_path / 'ok_sweep.py', corpus_dir)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.sweep', f'--sweep={sweep_ok}',
                           f'--root={killed}'], cwd=REPO, env=_env(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed / 'points' / 'num_fgrams=40' / 'run' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt.is_dir() and any(
      n.isdigit() for n in os.listdir(ckpt))):
    time.sleep(0.2)
  assert proc.poll() is None, 'the sweep ended before it could be killed'
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  _wait_group_dead(proc.pid)
  assert not (killed / 'points' / 'num_fgrams=40' / 'result.json').exists()
  proc = _run(sweep_ok, killed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _csv(killed) == rows


def _wait_group_dead(pgid, timeout=60):
  """Until no process of the group runs (zombies aside): a SIGKILLed trainer inside a
  checkpoint write can take a moment to go."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while time.time() < deadline:
    members = []
    for pid in map(int, filter(str.isdigit, os.listdir('/proc'))):
      try:
        in_group = os.getpgid(pid) == pgid
      except ProcessLookupError:
        continue
      if in_group and artifacts.process_state(pid) not in (None, 'Z', 'X'):
        members.append(pid)
    if not members:
      return
    time.sleep(0.2)
  raise AssertionError(f'processes {members} of the killed sweep still run after {timeout}s')


def test_claims_are_the_run_lock(tmp_path):
  """A point's claim is artifacts.ExclusiveLock: held while its runner lives, taken over
  when the runner is gone, and released for the next runner."""
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  point = str(tmp_path / 'p')
  assert sweep._claim(point)
  claim = json.load(open(os.path.join(point, 'claim.json')))
  assert claim['pid'] == os.getpid() and claim['token']
  other = artifacts.ExclusiveLock(os.path.join(point, 'claim.json'))
  assert not other.try_acquire() and other.holder == claim   # a live holder keeps it
  sweep._release(point)
  assert not os.path.exists(os.path.join(point, 'claim.json'))
  # A claim left by a runner that is gone (a pid that runs no process) is taken over.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(point, 'claim.json'), 'w') as f:
    json.dump({'host': claim['host'], 'pid': int(dead)}, f)
  assert sweep._claim(point)
  assert json.load(open(os.path.join(point, 'claim.json')))['pid'] == os.getpid()
  sweep._release(point)


def test_a_killed_unreaped_holder_is_gone(tmp_path):
  """A holder killed but not yet reaped (a zombie: what a trainer becomes when the sweep
  above it is killed and the process adopting it, such as a CI harness, has not waited for
  it) still answers signal 0; its run lock is taken over, not refused (one CI failure)."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    assert artifacts.pid_alive(child.pid)
    child.kill()
    deadline = time.time() + 30
    while artifacts.process_state(child.pid) != 'Z' and time.time() < deadline:
      time.sleep(0.05)
    assert artifacts.process_state(child.pid) == 'Z'   # not waited for: a zombie
    os.kill(child.pid, 0)                               # which signal 0 still reaches
    assert not artifacts.pid_alive(child.pid)
    lock_path = str(tmp_path / 'run.lock')
    with open(lock_path, 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': child.pid}, f)
    with artifacts.RunLock(str(tmp_path)) as lock:
      assert json.load(open(lock.path))['pid'] == os.getpid()
  finally:
    child.kill()
    child.wait()


def _sweep_configs(name):
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  base, points, evals = sweep.load_sweep(os.path.join(REPO, 'experiments', 'sweeps', name))
  return {p['name']: sweep.resolve(base, p) for p in points}, evals


def test_grow_remedies_points_are_the_readme_model_plus_one_remedy():
  """Each point of grow_remedies.py is cpu_study's scone_xs_16k_s<seed>_v2 (the README
  model, seed for seed) but for S and one remedy field, and validates."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  remedies, evals = _sweep_configs('grow_remedies.py')
  study, study_evals = _sweep_configs('cpu_study.py')
  assert evals == study_evals
  assert {'remedy_subset_s0', 'remedy_subset_s1', 'remedy_shorten_s0',
          'remedy_shorten_s1'} <= set(remedies)
  for name, cfg in remedies.items():
    config_lib.validate(cfg, num_devices=1)
    got = artifacts.flatten(cfg.to_dict())
    want = artifacts.flatten(study[f'scone_xs_16k_s{cfg.seed}_v2'].to_dict())
    diff = {k: got[k] for k in got if got[k] != want.get(k)}
    remedy = 'train_subset_fraction' if 'subset' in name else 'train_shorten_prob'
    assert set(diff) - {'fgrams.num_fgrams'} == {f'fgrams.{remedy}'}, (name, diff)
