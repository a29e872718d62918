"""Every path on gs://: the whole CLI run against a Cloud Storage emulator equals a local run.

The test starts `gcp-storage-emulator` on 127.0.0.1 and points each library at it through
its own endpoint setting (the subprocesses' environment, `emulator_env`): the path layer
(etils.epath → fsspec → gcsfs) by STORAGE_EMULATOR_HOST, tensorstore's gcs kvstore (the
table, and orbax's arrays) by TENSORSTORE_GCS_HTTP_URL. Then corpus (a gs:// glob),
tokenizer, f-gram set, data caches, checkpoints, metrics, export and serving all live in
the bucket: extract, train, SIGKILL, resume, export, eval and generate from the export;
the same run on local paths must give bitwise equal parameters, the same eval JSON and
the same generated text. Fast tests before it: the emulator refuses an exclusive create
over an existing object as Cloud Storage does, the run lock holds on gs://, and a damaged
checkpoint is set aside there (a directory rename on object storage).
"""
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'scone-test'
STEPS = 8


def emulator_env(url: str) -> dict:
  """What points every library scone_jax uses for gs:// at an emulator at url."""
  return {
      'STORAGE_EMULATOR_HOST': url,        # gcsfs (the path layer; orbax's directories)
      'TENSORSTORE_GCS_HTTP_URL': url,     # tensorstore's gcs kvstore (table, orbax arrays)
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # tensorstore: no credential lookup
      'FSSPEC_GCS_TOKEN': 'anon',          # gcsfs: no credential lookup
      'NO_GCE_CHECK': 'true',              # no metadata-server probe
      # gcsfs's zonal-bucket probe speaks gRPC to the endpoint, which the emulator lacks
      # (a 60 s timeout per bucket otherwise).
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 with one bucket; yields (url, gcsfs filesystem)."""
  import gcsfs.core  # the plain client: the extended one probes for zonal buckets over gRPC
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('emulator') / 'emulator.log', 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), 'gcs_emulator.py'), 'start',
       '--host=127.0.0.1',
       f'--port={port}', '--in-memory', f'--default-bucket={BUCKET}', '--quiet'],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'the GCS emulator did not start (exit {proc.poll()}); '
                             f'see {log.name}') from None
        time.sleep(0.2)
    fs = gcsfs.core.GCSFileSystem(endpoint_url=url, token='anon', skip_instance_cache=True)
    yield url, fs
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


def _cli(env_extra, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8', **env_extra)
  return subprocess.Popen([sys.executable, '-m', 'scone_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, what):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, f'{what}:\n{err[-4000:]}'
  return out, err


def _last_json(out):
  return json.loads(out.strip().splitlines()[-1])


def _params(checkpoint_dir):
  return ocp.StandardCheckpointer().restore(os.path.join(checkpoint_dir, 'state'))['params']


def _run(env_extra, workdir, config, corpus_args, eval_file, kill=None):
  """extract → train (SIGKILLed once when kill(…) says so, then resumed) → export → eval
  from the export → generate from the export; returns (eval JSON, generated text)."""
  common = [f'--config={config}', f'--workdir={workdir}', *corpus_args]
  _finish(_cli(env_extra, '--mode=extract', *common), 'extract')
  train = ['--mode=train', *common, '--config.async_checkpointing=False']
  if kill is not None:
    p = _cli(env_extra, *train)
    deadline = time.time() + 600
    while not kill() and p.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert p.poll() is None, 'training ended before it could be killed: ' + p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.wait()
    out, err = _finish(_cli(env_extra, *train), 'resumed train')
    assert 'resumed from step' in out + err, err[-3000:]
  else:
    _finish(_cli(env_extra, *train), 'train')
  export_dir = f'{workdir}/export'
  _finish(_cli(env_extra, '--mode=export', *common, f'--export_dir={export_dir}'), 'export')
  p_eval = _cli(env_extra, '--mode=eval', f'--export_dir={export_dir}',
                f'--eval_text={eval_file}')
  p_gen = _cli(env_extra, '--mode=generate', f'--export_dir={export_dir}',
               '--prompt=The nation', '--max_new_tokens=8')
  got_eval = _last_json(_finish(p_eval, 'eval from export')[0])
  text = _finish(p_gen, 'generate from export')[0]
  return got_eval, text[text.index("=== 'The nation'"):]


def _in_emulated_process(url: str, code: str) -> str:
  """Runs code in a fresh Python pointed at the emulator (fsspec reads its token setting at
  import, epath keeps the filesystem it first made); returns stdout."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', **emulator_env(url))
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


class _Refusing(http.server.BaseHTTPRequestHandler):
  """A Cloud Storage stand-in that answers every request with one HTTP error."""
  status, message = 401, ''

  def do_GET(self):  # pylint: disable=invalid-name
    body = json.dumps({'error': {'code': self.status, 'message': self.message}}).encode()
    self.send_response(self.status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _refusing_server(status, message):
  handler = type('Handler', (_Refusing,), {'status': status, 'message': message})
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()


def _access_error(endpoint, path):
  """paths.check_access(path) in a fresh process whose gs:// goes to endpoint: the error."""
  env = dict(os.environ, PYTHONPATH=REPO, **emulator_env(endpoint))
  code = ('from scone_jax import paths\n'
          'try:\n'
          f'  paths.check_access({path!r}); print("ok")\n'
          'except paths.CloudAccessError as e:\n'
          '  print(e)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip()


@pytest.mark.parametrize('status,message,expected', [
    (401, 'Anonymous caller does not have storage.objects.list access to the Google Cloud '
     'Storage bucket.', ('no valid credentials (401', 'gcloud auth application-default login')),
    (403, 'sa@p.iam.gserviceaccount.com does not have storage.objects.list access.',
     ('may not list it (403', 'roles/storage.objectAdmin on gs://locked')),
])
def test_gs_refused_for_credentials_is_one_line(status, message, expected):
  with _refusing_server(status, message) as url:
    error = _access_error(url, 'gs://locked/run')
  assert error.startswith('gs://locked/run: bucket locked cannot be used: '), error
  assert '\n' not in error and all(e in error for e in expected), error


def test_gs_without_network_is_one_line():
  # A name that cannot resolve (the DNS failure an offline host sees for googleapis.com) ...
  error = _access_error('http://storage.no-such-host.invalid:4443', 'gs://bkt/run')
  assert 'bucket bkt' in error and 'DNS lookup of storage.no-such-host.invalid failed' in error
  # ... and an endpoint nobody listens on.
  port = _free_port()
  error = _access_error(f'http://127.0.0.1:{port}', 'gs://bkt/run')
  assert 'bucket bkt' in error and f'cannot connect to 127.0.0.1:{port}' in error, error


def test_gs_missing_bucket_and_the_cli_error_line(gcs):
  url, _ = gcs
  assert _access_error(url, f'gs://{BUCKET}/run') == 'ok'
  error = _access_error(url, 'gs://no-such-bucket/run')
  assert 'bucket no-such-bucket' in error and 'does not exist (404' in error, error
  assert 'gcloud storage buckets create gs://no-such-bucket' in error
  # The CLI: one `error:` line on stderr, exit 1, no traceback.
  port = _free_port()
  proc = _cli(emulator_env(f'http://127.0.0.1:{port}'), '--mode=train',
              '--workdir=gs://bkt/run')
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: gs://bkt/run: bucket bkt '), err[-3000:]


def test_emulator_refuses_create_over_an_existing_object(gcs):
  """As Cloud Storage does (412, FileExistsError in gcsfs), for each upload gcsfs makes."""
  _, fs = gcs
  path = f'{BUCKET}/create_test/obj'
  fs.pipe_file(path, b'first', mode='create')  # multipart upload
  with pytest.raises(FileExistsError):
    fs.pipe_file(path, b'second', mode='create')
  big = os.urandom(3 * 2**18)  # over the block size: a resumable upload
  with pytest.raises(FileExistsError):  # refused when it starts
    with fs.open(path, 'xb', block_size=2**18) as f:
      f.write(big)
  assert fs.cat(path) == b'first'
  late = f'{BUCKET}/create_test/late'
  with pytest.raises(FileExistsError):  # refused at a chunk: the object appeared meanwhile
    with fs.open(late, 'xb', block_size=2**18) as f:
      f.write(big[:2**18 + 1])
      f.flush()  # starts the upload, sends the first chunk
      fs.pipe_file(late, b'other writer')
      f.write(big[2**18 + 1:])
  fs.invalidate_cache()
  assert fs.cat(late) == b'other writer'
  with fs.open(f'{BUCKET}/create_test/new', 'xb', block_size=2**18) as f:
    f.write(big)
  assert fs.cat(f'{BUCKET}/create_test/new') == big


def test_run_lock_is_exclusive_on_gcs(gcs):
  url, fs = gcs
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  out = _in_emulated_process(url, f"""
      import json, socket
      from scone_jax import artifacts, paths
      path = 'gs://{BUCKET}/lock_test/once'
      assert paths.create_exclusive(path, 'first') is True
      assert paths.create_exclusive(path, 'second') is False
      assert paths.read_text(path) == 'first'

      workdir = 'gs://{BUCKET}/lock_test/run'
      lock = artifacts.RunLock(workdir).acquire()
      held = paths.read_json(lock.path)
      assert held['host'] == socket.gethostname(), held
      try:  # a second trainer on this host, its holder alive
        artifacts.RunLock(workdir).acquire()
        raise AssertionError('a second lock was granted')
      except RuntimeError as e:
        print('LIVE:', e)
      lock.release()
      assert not paths.exists(lock.path)

      # A holder on another host cannot be checked: refused, whatever its pid.
      paths.atomic_write(lock.path, json.dumps({{'host': 'other-host', 'pid': 1,
                                                'start': 'then'}}))
      try:
        artifacts.RunLock(workdir).acquire()
        raise AssertionError('the lock of another host was taken')
      except RuntimeError as e:
        print('OTHER:', e)

      # A dead process on this host: taken over, then released.
      paths.atomic_write(lock.path, json.dumps({{'host': socket.gethostname(),
                                                'pid': {dead.pid}, 'start': 'then'}}))
      with artifacts.RunLock(workdir) as lock:
        print('TAKEN:', json.dumps(paths.read_json(lock.path)))
      assert not paths.exists(lock.path)
      """)
  lines = dict(line.split(': ', 1) for line in out.splitlines())
  for key in ('LIVE', 'OTHER'):
    assert 'another training process' in lines[key] and 'delete the lock file' in lines[key]
  assert 'host other-host, pid 1' in lines['OTHER']
  taken = json.loads(lines['TAKEN'])
  assert taken['host'] == socket.gethostname() and taken['pid'] != dead.pid


def test_damaged_checkpoint_is_set_aside_on_gcs(gcs):
  url, fs = gcs
  ckpts = f'{BUCKET}/aside_test/checkpoints'
  files = {'5/state/manifest.ocdbt': b'manifest', '5/state/d/0a1b': bytes(range(256)) * 9,
           '5/_CHECKPOINT_METADATA': b'{"step": 5}', '5/commit_success.txt': b'ok',
           '4/commit_success.txt': b'ok'}
  fs.pipe({f'{ckpts}/{rel}': data for rel, data in files.items()})
  out = _in_emulated_process(url, f"""
      from scone_jax import checkpoints, paths
      ckpts = 'gs://{ckpts}'
      first = checkpoints.set_aside(ckpts, 5)
      print(first)
      for rel, path in paths.walk_files(first):  # a later run wrote step 5 again, also damaged
        paths.copy(path, paths.join(ckpts, '5', rel))
      print(checkpoints.set_aside(ckpts, 5))
      """)
  assert out.split()[-2:] == [f'gs://{ckpts}/5.unreadable', f'gs://{ckpts}/5.unreadable.1']

  def tree(step_dir):
    return {p[len(f'{ckpts}/{step_dir}/'):]: fs.cat(p)
            for p in fs.find(f'{ckpts}/{step_dir}')}

  fs.invalidate_cache()
  step_5 = {rel[2:]: data for rel, data in files.items() if rel.startswith('5/')}
  assert tree('5.unreadable') == step_5 and tree('5.unreadable.1') == step_5
  assert tree('5') == {} and tree('4') == {'commit_success.txt': b'ok'}


@pytest.mark.slow
def test_whole_run_on_gcs_equals_the_local_run(gcs, tmp_path):
  url, fs = gcs
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  gs_corpus = f'{BUCKET}/corpus'
  # Same file name as the local run: document ids ('<basename>#<n>') place documents in the
  # token shards, so the two runs train on the same stream.
  fs.put(os.path.join(corpus_dir, 'train.txt'), f'{gs_corpus}/train.txt')
  fs.put(os.path.join(corpus_dir, 'eval.txt'), f'{gs_corpus}/eval.txt')
  config = tiny.write_config_file(str(tmp_path / 'cfg.py'), corpus_dir, steps=STEPS)

  local_dir = str(tmp_path / 'local')
  local_eval, local_text = _run({}, local_dir, config, [], os.path.join(corpus_dir, 'eval.txt'))

  workdir = f'gs://{BUCKET}/run'
  ckpts = f'{BUCKET}/run/checkpoints'

  def a_checkpoint_exists():
    # On gs:// orbax marks a finished step with commit_success.txt (no atomic rename there).
    fs.invalidate_cache()
    return bool(fs.glob(f'{ckpts}/*/commit_success.txt'))

  gs_eval, gs_text = _run(
      emulator_env(url), workdir, config,
      [f'--config.corpus.train_files=gs://{gs_corpus}/train*.txt',
       f'--config.corpus.eval_files=gs://{gs_corpus}/eval.txt'],
      f'gs://{gs_corpus}/eval.txt', kill=a_checkpoint_exists)

  assert gs_eval == local_eval
  assert gs_text == local_text
  fs.invalidate_cache()
  names = {p.rsplit('/', 1)[-1] for p in fs.ls(f'{BUCKET}/run', detail=False)}
  assert {'tokenizer.model', 'fgrams.npz', 'data', 'checkpoints', 'metrics.jsonl',
          'config.json', 'export'} <= names, names
  lines = fs.cat(f'{BUCKET}/run/metrics.jsonl').decode().splitlines()
  assert json.loads(lines[-1])['step'] == STEPS
  gs_ckpt = str(tmp_path / 'gs_ckpt')
  fs.get(f'{ckpts}/{STEPS}', gs_ckpt, recursive=True)
  jax.tree.map(np.testing.assert_array_equal,
               _params(os.path.join(local_dir, 'checkpoints', str(STEPS))), _params(gs_ckpt))
  local_meta = json.load(open(os.path.join(local_dir, 'export', 'export.json')))
  gs_meta = json.loads(fs.cat(f'{BUCKET}/run/export/export.json'))
  assert gs_meta['table_sha256'] == local_meta['table_sha256']
