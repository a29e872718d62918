"""Nothing lost, nothing silent: every case runs the real CLI in a subprocess.

A changed config never overwrites a run, one trainer per workdir, bad text is named, user
errors are one line, and a full disk leaves the previous checkpoint and export loadable.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'scone_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _error_line(proc):
  """The CLI's one-line error, and no traceback."""
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny SCONE run trained 4 steps (checkpoints at 2 and 4)."""
  root = tmp_path_factory.mktemp('reliability')
  corpus_dir = str(root / 'corpus')
  tiny.write_corpus(corpus_dir)
  config = tiny.write_config_file(str(root / 'cfg.py'), corpus_dir, steps=4)
  workdir = str(root / 'run')
  proc = _cli('--mode=train', f'--config={config}', f'--workdir={workdir}',
              '--config.async_checkpointing=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {'root': root, 'corpus': corpus_dir, 'config': config, 'workdir': workdir}


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


@pytest.mark.slow
def test_changed_model_shape_is_refused_and_schedule_change_allowed(run_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir['workdir'], workdir)
  before = _steps(workdir)
  metrics = open(os.path.join(workdir, 'metrics.jsonl')).read()
  proc = _cli('--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.model.d_model=48', '--config.learning_rate=0.5')
  line = _error_line(proc)
  assert proc.returncode == 1
  assert 'model.d_model: 32 -> 48' in line and 'learning_rate: 0.01 -> 0.5' in line
  assert 'new --workdir' in line
  # Nothing was touched: same checkpoints, same metrics, same recorded config.
  assert _steps(workdir) == before
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == metrics
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['d_model'] == 32
  # A schedule change resumes (and is logged).
  proc = _cli('--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.num_train_steps=6', '--config.async_checkpointing=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from step 4' in proc.stderr
  assert 'num_train_steps: 4 -> 6' in proc.stderr
  assert _steps(workdir)[-1] == 6


@pytest.mark.slow
def test_one_trainer_per_workdir(run_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir['workdir'], workdir)
  lock = os.path.join(workdir, 'run.lock')
  # A live holder (this test process, same host) is refused ...
  import socket  # pylint: disable=g-import-not-at-top
  with open(lock, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'start': 'now'}, f)
  proc = _cli('--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.num_train_steps=6')
  line = _error_line(proc)
  assert f'pid {os.getpid()}' in line and 'another training process' in line
  assert _steps(workdir)[-1] == 4
  # ... a dead one's lock is taken over, and released at the end.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  with open(lock, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': dead.pid, 'start': 'then'}, f)
  proc = _cli('--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.num_train_steps=6', '--config.async_checkpointing=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'stale lock' in proc.stderr
  assert _steps(workdir)[-1] == 6 and not os.path.exists(lock)


@pytest.mark.slow
def test_invalid_utf8_is_named_or_replaced(run_dir, tmp_path):
  corpus_dir = str(tmp_path / 'corpus')
  shutil.copytree(run_dir['corpus'], corpus_dir)
  train_txt = os.path.join(corpus_dir, 'train.txt')
  data = open(train_txt, 'rb').read()
  offset = data.index(b'\n\n') + 7
  with open(train_txt, 'wb') as f:
    f.write(data[:offset] + b'\xff\xfe' + data[offset:])
  config = tiny.write_config_file(str(tmp_path / 'cfg.py'), corpus_dir, steps=2)
  proc = _cli('--mode=extract', f'--config={config}', f'--workdir={tmp_path / "run"}')
  line = _error_line(proc)
  assert train_txt in line and f'byte {offset} (0xff) is not valid UTF-8' in line
  assert 'decode_errors=replace' in line
  proc = _cli('--mode=extract', f'--config={config}', f'--workdir={tmp_path / "run"}',
              '--config.corpus.decode_errors=replace')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'replaced 2 invalid UTF-8 sequence(s)' in proc.stderr


@pytest.mark.slow
def test_user_errors_are_one_line_and_verbose_shows_the_traceback(run_dir, tmp_path):
  missing = str(tmp_path / 'missing.txt')
  common = ['--mode=eval', f'--config={run_dir["config"]}', f'--workdir={run_dir["workdir"]}',
            f'--eval_text={missing}']
  line = _error_line(_cli(*common))
  assert missing in line
  verbose = _cli(*common, '--verbose')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr
  usage = _cli('--mode=train', f'--config={run_dir["config"]}')
  assert usage.returncode == 2 and _error_line(usage) == (
      'error: --workdir is required for --mode=train.')
  bad_field = _cli('--mode=train', f'--config={run_dir["config"]}', '--workdir=x',
                   '--config.model.no_such_field=1')
  assert bad_field.returncode == 2 and 'no_such_field' in _error_line(bad_field)


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a small tmpfs to fill ({proc.stderr.strip()}): needs root')


def _fill(path, leave_bytes):
  st = os.statvfs(path)
  with open(os.path.join(path, 'filler'), 'wb') as f:
    f.write(b'\0' * max(0, st.f_bavail * st.f_frsize - leave_bytes))


@pytest.mark.slow
def test_full_disk_during_export_keeps_the_previous_export(run_dir, tmp_path):
  full = tmp_path / 'full'
  _mount_tmpfs(full, '8m')
  try:
    export_dir = str(full / 'export')
    common = ['--mode=export', f'--config={run_dir["config"]}', f'--workdir={run_dir["workdir"]}',
              f'--export_dir={export_dir}']
    proc = _cli(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _fill(full, 16 << 10)
    # Another table layout is another export: it must be built beside the old one.
    proc = _cli(*common, '--config.export.rows_per_chunk=16')
    line = _error_line(proc)
    assert 'out of disk space writing the export under' in line and export_dir in line
    # The previous export still loads and evaluates.
    from scone_jax import corpus  # pylint: disable=g-import-not-at-top
    from scone_jax import serving  # pylint: disable=g-import-not-at-top
    gen = serving.load(export_dir)
    ev = gen.evaluate(corpus.read_text_documents([os.path.join(run_dir['corpus'], 'eval.txt')]))
    assert ev['tokens'] > 0 and ev['loss'] == ev['loss']
  finally:
    subprocess.run(['umount', str(full)], check=False)


def _tree_listing(directory):
  """{relative path: size} of every file under directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, directory)] = os.path.getsize(full)
  return out


@pytest.mark.slow
def test_damaged_checkpoint_is_set_aside_and_training_resumes(run_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir['workdir'], workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  # Truncate step 4's array data (not its metadata): only reading the arrays finds it.
  data = os.path.join(ckpt, '4', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    path = os.path.join(data, name)
    if os.path.getsize(path) > 1000:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  damaged = _tree_listing(os.path.join(ckpt, '4'))
  proc = _cli('--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.num_train_steps=6', '--config.async_checkpointing=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'is unreadable' in proc.stderr and 'resumed from step 2' in proc.stderr
  assert f'to {os.path.join(ckpt, "4.unreadable")}' in proc.stderr
  # Step 4 was trained and saved again; the damaged copy is still there, byte for byte.
  assert _steps(workdir) == [2, 4, 6]
  assert _tree_listing(os.path.join(ckpt, '4.unreadable')) == damaged


@pytest.mark.slow
def test_structure_mismatch_raises_and_changes_nothing(run_dir, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir['workdir'], workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  before = _tree_listing(ckpt)
  cfg = tiny.tiny_config(run_dir['corpus'], steps=4)
  cfg.tokenizer.path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  cfg.model.d_model = 48
  run = artifacts.prepare_run(cfg, workdir)
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  try:
    with pytest.raises(ValueError) as e:
      train.restore_latest(mngr, trainer, set_aside_damaged=True)
  finally:
    mngr.close()
  message = str(e.value)
  assert message.startswith(f'checkpoint {os.path.join(ckpt, "4")} holds another model')
  assert 'params/decoder/final_norm/scale: [32] float32 -> [48] float32' in message
  assert 'new --workdir' in message and 'more)' in message
  # The params-only restore (export) compares the parameters alone, and refuses the same.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          trainer.state.params)
  with pytest.raises(ValueError, match=r'holds another model: \d+ of its leaves differ .*'
                                       r'final_norm/scale: \[32\] float32 -> \[48\] float32'):
    checkpoints.restore_latest_params(ckpt, abstract)
  assert _tree_listing(ckpt) == before


@pytest.mark.slow
def test_full_disk_during_checkpoint_keeps_the_previous_checkpoint(run_dir, tmp_path):
  full = tmp_path / 'full'
  _mount_tmpfs(full, '8m')
  try:
    workdir = str(full / 'run')
    shutil.copytree(run_dir['workdir'], workdir)
    # A checkpoint of the tiny model is ~700 KB: logs and metrics fit, step 6 does not.
    _fill(full, 256 << 10)
    common = ['--mode=train', f'--config={run_dir["config"]}', f'--workdir={workdir}',
              '--config.num_train_steps=6']
    line = _error_line(_cli(*common))
    ckpt = os.path.join(workdir, 'checkpoints')
    assert f'out of disk space writing a checkpoint under {ckpt}' in line, line
    assert _steps(workdir) == [2, 4]
    # With space again the run resumes from step 4, past whatever the failed save left.
    os.remove(full / 'filler')
    proc = _cli(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'resumed from step 4' in proc.stderr
    assert _steps(workdir) == [2, 4, 6]
  finally:
    subprocess.run(['umount', str(full)], check=False)
