"""Soak: train while SIGKILLing the trainer at random moments, resume each time, compare.

  python -m experiments.soak_resume [--kills=12] [--steps=40] [--seed=0] [--workdir=DIR]

A tiny SCONE config (tests/tiny.py) is trained once without interruption, then again in a
second run directory where the process is killed with SIGKILL at least --kills times —
some at random moments once a launch is training again (startup alone takes tens of
seconds, and a kill before the first step tests nothing), some the instant an orbax
checkpoint write is in flight — and relaunched after each kill (the stale run lock is taken
over). Each launch's log is kept under <root>/logs. At the end both runs'
final parameters are compared bitwise and both are evaluated on the held-out split.
The last line printed is one JSON object: the kill times, what was being written, and the
result.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.soak_resume')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))  # tiny.py (tests/ is not a package)
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='',
              TF_CPP_MIN_LOG_LEVEL='2')


def _train(config, workdir, log_path, extra=()):
  # The log goes to a file: a pipe nobody reads while the soak waits to kill would fill up
  # and stall the trainer.
  with open(log_path, 'w') as log:
    return subprocess.Popen(
        [sys.executable, '-m', 'scone_jax.main', '--mode=train', f'--config={config}',
         f'--workdir={workdir}', *extra], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
        stderr=log, start_new_session=True)


def _tail(path, n=3000):
  with open(path, errors='replace') as f:
    return f.read()[-n:]


def _metrics_size(workdir):
  try:
    return os.path.getsize(os.path.join(workdir, 'metrics.jsonl'))
  except FileNotFoundError:
    return 0


def _ckpt_state(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return [], set()
  names = os.listdir(d)
  steps = sorted(int(n) for n in names if n.isdigit())
  return steps, {n for n in names if 'tmp' in n}


def _final_params(config_path, workdir):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  from experiments import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.load(config_path)
  run = artifacts.prepare_run(cfg, workdir)
  trainer = train.load_for_eval(cfg, workdir, run)
  import jax  # pylint: disable=g-import-not-at-top
  leaves = [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]
  loss = train.eval_documents(trainer, run.heldout_docs)['loss']
  return leaves, int(trainer.state.step), loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=12)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix='scone_soak_')
  corpus_dir = os.path.join(root, 'corpus')
  tiny.write_corpus(corpus_dir)
  config = tiny.write_config_file(os.path.join(root, 'cfg.py'), corpus_dir, steps=args.steps)
  extra = ['--config.checkpoint_every_steps=2', '--config.keep_checkpoints=2',
           '--config.log_every_steps=2']

  logs = os.path.join(root, 'logs')
  os.makedirs(logs, exist_ok=True)
  t0 = time.time()
  straight = os.path.join(root, 'straight')
  log_path = os.path.join(logs, 'straight.log')
  proc = _train(config, straight, log_path, extra)
  if proc.wait():
    raise SystemExit(f'uninterrupted run failed:\n{_tail(log_path)}')
  straight_s = time.time() - t0
  print(f'uninterrupted run: {straight_s:.1f}s', flush=True)

  # The same tokenizer file for both runs (training it twice need not give the same bytes).
  config_soak = tiny.write_config_file(os.path.join(root, 'cfg_soak.py'), corpus_dir,
                                       steps=args.steps,
                                       tokenizer=os.path.join(straight, 'tokenizer.model'))
  soaked = os.path.join(root, 'soaked')
  kills, launches = [], 0
  while True:
    steps, tmp_at_launch = _ckpt_state(soaked)
    if len(kills) < args.kills and args.steps in steps:
      raise SystemExit(f'the run reached step {args.steps} after {len(kills)} kills; use '
                       'more --steps for this many --kills')
    log_path = os.path.join(logs, f'soaked_{launches}.log')
    metrics_at_launch = _metrics_size(soaked)
    proc = _train(config_soak, soaked, log_path, extra)
    launches += 1
    started = time.time()
    if len(kills) < args.kills:
      during_write = len(kills) % 3 == 2   # every third kill waits for a write in flight
      delay = rng.uniform(0.0, 8.0)        # after the first step this launch logs
      deadline, killed = None, None
      while proc.poll() is None:
        steps, tmp = _ckpt_state(soaked)
        # A write of this launch: a killed one's leftover temporary directory does not count.
        writing = bool(tmp - tmp_at_launch)
        now = time.time()
        if deadline is None and _metrics_size(soaked) > metrics_at_launch:
          deadline = now + (60.0 if during_write else delay)
        if (during_write and writing) or (deadline is not None and now >= deadline):
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          killed = {'after_s': round(now - started, 2), 'wanted': 'during_write' if
                    during_write else 'random', 'checkpoint_write_in_flight': writing,
                    'checkpoints_before': steps}
          break
        time.sleep(0.01)
      if killed is not None:
        kills.append(killed)
        print(f'kill {len(kills)}: {json.dumps(killed)}', flush=True)
        continue
    if proc.wait():
      raise SystemExit(f'resumed run failed (exit {proc.returncode}):\n{_tail(log_path)}')
    if len(kills) >= args.kills:
      break

  a, step_a, loss_a = _final_params(config, straight)
  b, step_b, loss_b = _final_params(config_soak, soaked)
  equal = len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and
                                   (x == y).all() for x, y in zip(a, b))
  result = {
      'benchmark': 'soak_resume', 'kills': len(kills), 'launches': launches,
      'kills_during_checkpoint_write': sum(k['checkpoint_write_in_flight'] for k in kills),
      'kill_times_s': [k['after_s'] for k in kills], 'kill_log': kills,
      'steps': args.steps, 'final_step_uninterrupted': step_a, 'final_step_soaked': step_b,
      'params_bitwise_equal': bool(equal), 'eval_loss_uninterrupted': loss_a,
      'eval_loss_soaked': loss_b, 'eval_loss_equal': loss_a == loss_b,
      'seconds': round(time.time() - t0, 1), 'root': root,
  }
  print(json.dumps(result))
  return 0 if equal and loss_a == loss_b and step_a == step_b else 1


if __name__ == '__main__':
  sys.exit(main())
