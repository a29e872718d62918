"""The one IO layer: every path scone_jax reads or writes, local or `gs://`, goes through here.

Built on `etils.epath` (what orbax uses), so the same calls work on a local disk and on
Cloud Storage. A path is a string: a local path or `gs://bucket/key`. Any other URL scheme
(`s3://`, `hdfs://`, a mistyped `gs:/b`) fails with one clear error instead of becoming a
local directory with a colon in its name. Writes that must never be seen half done go
through `atomic_write`: a local file is written to a temporary name beside it, fsynced and
renamed; a Cloud Storage object is uploaded whole, which is atomic by itself.
tensorstore gets its kvstore spec from `kvstore_spec`, so the table follows the same rule.

gs:// goes through fsspec's gcsfs on every host, TensorFlow installed or not: epath would
otherwise pick tf.io.gfile where TensorFlow is importable (a training host) and gcsfs where
it is not (a serving host), and only gcsfs and tensorstore can be pointed at another
endpoint (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL; see `emulated_gcs`).
"""
import builtins
import contextlib
import json
import os
import posixpath
import re
import shutil
import socket
import urllib.parse
from typing import Iterator, Optional, Union

from etils import epath

# Read by epath (and so by orbax, in this process) on its first gs:// call; see above.
os.environ.setdefault('EPATH_USE_TF', 'false')

CLOUD_SCHEMES = ('gs',)
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):(//)?')

PathLike = Union[str, os.PathLike]


def check(path: PathLike) -> str:
  """The path as a string; ValueError for a URL scheme this project cannot read or write."""
  path = os.fspath(path)
  m = _URL.match(path)
  if m and not (len(m.group(1)) == 1 and os.name == 'nt'):  # not a Windows drive letter
    scheme = m.group(1).lower()
    if scheme not in CLOUD_SCHEMES or not m.group(2):
      raise ValueError(f'{path}: unsupported path; use a local path or '
                       f'{" or ".join(s + "://bucket/..." for s in CLOUD_SCHEMES)}.')
  return path


def is_cloud(path: PathLike) -> bool:
  return _URL.match(check(path)) is not None


def emulated_gcs() -> Optional[str]:
  """The Cloud Storage emulator gs:// paths go to (STORAGE_EMULATOR_HOST), or None."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  return None if host in ('', 'default') else host


def as_epath(path: PathLike) -> epath.Path:
  return epath.Path(check(path))


def join(path: PathLike, *parts: str) -> str:
  path = check(path)
  return posixpath.join(path, *parts) if is_cloud(path) else os.path.join(path, *parts)


def abspath(path: PathLike) -> str:
  path = check(path)
  return path if is_cloud(path) else os.path.abspath(path)


def basename(path: PathLike) -> str:
  return as_epath(path).name


def dirname(path: PathLike) -> str:
  path = check(path)
  return posixpath.dirname(path) if is_cloud(path) else os.path.dirname(path)


def exists(path: PathLike) -> bool:
  return as_epath(path).exists()


def isfile(path: PathLike) -> bool:
  p = as_epath(path)
  return p.exists() and not p.is_dir()


def isdir(path: PathLike) -> bool:
  return as_epath(path).is_dir()


def makedirs(path: PathLike) -> str:
  as_epath(path).mkdir(parents=True, exist_ok=True)
  return check(path)


def listdir(path: PathLike) -> list[str]:
  return sorted(p.name for p in as_epath(path).iterdir())


def walk_files(directory: PathLike) -> list[tuple[str, str]]:
  """(relative '/'-separated path, path) of every file under directory, sorted."""
  directory = check(directory)
  out = []
  if not is_cloud(directory):
    for root, _, files in os.walk(directory):
      for f in files:
        full = os.path.join(root, f)
        out.append((os.path.relpath(full, directory).replace(os.sep, '/'), full))
    return sorted(out)
  stack = [(as_epath(directory), '')]
  while stack:
    node, prefix = stack.pop()
    for child in node.iterdir():
      rel = prefix + child.name
      if child.is_dir():
        stack.append((child, rel + '/'))
      else:
        out.append((rel, str(child)))
  return sorted(out)


def getsize(path: PathLike) -> int:
  path = check(path)
  if not is_cloud(path):
    return os.path.getsize(path)
  return as_epath(path).stat().length


def remove(path: PathLike) -> None:
  as_epath(path).unlink()


def rmtree(path: PathLike) -> None:
  path = check(path)
  if is_cloud(path):
    as_epath(path).rmtree()
  else:
    shutil.rmtree(path)


def replace(src: PathLike, dst: PathLike) -> None:
  """Renames src to dst, replacing dst (atomic on a local filesystem).

  A gs:// directory (objects under a prefix: Cloud Storage renames no directories) is
  copied whole to a dst that must not exist, then deleted: an interrupted move leaves the
  original intact beside a partial copy, never its objects split between the two names.
  """
  src, dst = check(src), check(dst)
  if is_cloud(src) and is_cloud(dst) and isdir(src):
    if exists(dst):
      raise FileExistsError(f'{dst} exists; the directory {src} is moved only to a new name.')
    fs = _fsspec(src)
    fs.copy(src, dst, recursive=True)
    fs.rm(src, recursive=True)
    return
  if is_cloud(src) or is_cloud(dst):
    as_epath(src).rename(dst)
  else:
    os.replace(src, dst)


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies a file atomically: dst is either absent or whole."""
  src, dst = check(src), check(dst)
  if not is_cloud(src) and not is_cloud(dst):
    tmp = _tmp_name(dst)
    try:
      shutil.copyfile(src, tmp)
      os.replace(tmp, dst)
    finally:
      _discard(tmp)
    return
  atomic_write(dst, read_bytes(src))


def glob(pattern: str) -> list[str]:
  """Files matching a glob (local or gs://), sorted."""
  pattern = check(pattern)
  if not is_cloud(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(pattern))
  m = re.match(r'^(gs://[^/*?\[]+)/(.*)$', pattern)
  if not m:
    raise ValueError(f'{pattern}: a gs:// glob needs a bucket without wildcards.')
  return sorted(str(p) for p in epath.Path(m.group(1)).glob(m.group(2)))


@contextlib.contextmanager
def open(path: PathLike, mode: str = 'r', **kwargs) -> Iterator:  # pylint: disable=redefined-builtin
  """Opens a file for reading or (non-atomic) writing; prefer atomic_write for outputs."""
  with as_epath(path).open(mode, **kwargs) as f:
    yield f


def read_bytes(path: PathLike) -> bytes:
  return as_epath(path).read_bytes()


def read_text(path: PathLike, encoding: str = 'utf-8') -> str:
  return as_epath(path).read_text(encoding=encoding)


def read_json(path: PathLike):
  return json.loads(read_text(path))


def _tmp_name(path: str) -> str:
  return f'{path}.tmp{os.getpid()}'


def _discard(tmp: str) -> None:
  try:
    os.remove(tmp)
  except FileNotFoundError:
    pass


def atomic_write(path: PathLike, data: Union[bytes, str]) -> str:
  """Writes data to path so that readers see the old file or the new one, never a part.

  Local: a per-process temporary name in the same directory (several hosts may write the
  same file), fsync, rename; the temporary file is removed if anything fails (a full disk
  leaves the previous file intact). gs://: one object upload, atomic by itself.
  """
  path = check(path)
  payload = data.encode('utf-8') if isinstance(data, str) else data
  if is_cloud(path):
    as_epath(path).write_bytes(payload)
    return path
  tmp = _tmp_name(path)
  try:
    with builtins.open(tmp, 'wb') as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    _discard(tmp)
  return path


def create_exclusive(path: PathLike, data: Union[bytes, str]) -> bool:
  """Creates a file holding data unless one exists; False if it existed.

  Local: O_EXCL. gs://: one upload with the precondition `ifGenerationMatch=0`, which Cloud
  Storage refuses (412) when the object exists, so of several hosts racing exactly one wins.
  """
  path = check(path)
  payload = data.encode('utf-8') if isinstance(data, str) else data
  if is_cloud(path):
    try:
      _fsspec(path).pipe_file(path, payload, mode='create')
    except FileExistsError:  # gcsfs's translation of 412 Precondition Failed
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(payload)
  return True


def _fsspec(path: str):
  """The fsspec filesystem (gcsfs for gs://) epath uses for path, its listing cache too.

  For what epath does not do: exclusive create, a directory copy.
  """
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  return backend.fsspec_backend.fs(path)


def write_json_atomic(path: PathLike, obj, **kwargs) -> str:
  kwargs.setdefault('indent', 2)
  kwargs.setdefault('sort_keys', True)
  return atomic_write(path, json.dumps(obj, **kwargs))


def is_disk_full(e: BaseException) -> bool:
  """Whether an error (or one it was raised from) is a full disk or exhausted quota.

  orbax and tensorstore report a full disk in their own exception types; the errno or the
  C library's message survives in the error or its cause.
  """
  import errno  # pylint: disable=g-import-not-at-top
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if 'No space left on device' in text or 'Disk quota exceeded' in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def disk_full_error(what: str, where: str, e: BaseException) -> OSError:
  """The one-line error for a full disk: what ran out, where, and what is still intact."""
  import errno  # pylint: disable=g-import-not-at-top
  return OSError(errno.ENOSPC, f'out of disk space writing {what} under {where} '
                 f'({type(e).__name__}); the previous one is intact: free space and re-run '
                 'to resume')


def kvstore_spec(path: PathLike) -> dict:
  """tensorstore kvstore for a directory: `file`, or `gcs` for gs://bucket/key."""
  path = check(path)
  if is_cloud(path):
    bucket, _, key = path[len('gs://'):].partition('/')
    if not bucket:
      raise ValueError(f'{path}: no bucket name.')
    return {'driver': 'gcs', 'bucket': bucket, 'path': key.rstrip('/') + '/'}
  return {'driver': 'file', 'path': os.path.abspath(path)}


# ----------------------------------------------------------------------------- reaching gs://


class CloudAccessError(RuntimeError):
  """A gs:// path cannot be used: one line naming the bucket, what failed and what to do."""


_CREDENTIALS_FIX = ('run `gcloud auth application-default login`, or set '
                    'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file')


def check_access(path: PathLike, *, timeout: float = 10.0) -> None:
  """Raises CloudAccessError unless the bucket of a gs:// path answers a listing; local
  paths pass. Each failure is told apart, with its fix: the endpoint's name does not
  resolve (DNS: no network), the endpoint refuses or drops the connection, the request is
  refused for want of credentials (401) or of permission (403), the bucket does not exist
  (404). Cheap (one DNS lookup, one connection, one listing of at most one object), so a
  run checks its gs:// directories before it starts instead of failing deep inside
  gcsfs / aiohttp after a minute of retries.
  """
  path = check(path)
  if not is_cloud(path):
    return
  bucket = path[len('gs://'):].split('/', 1)[0]
  if not bucket:
    raise ValueError(f'{path}: no bucket name.')
  endpoint = emulated_gcs() or 'https://storage.googleapis.com'
  url = urllib.parse.urlsplit(endpoint if '://' in endpoint else f'http://{endpoint}')
  host, port = url.hostname, url.port or (443 if url.scheme == 'https' else 80)
  where = f'{path}: bucket {bucket} cannot be used'
  try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except (socket.gaierror, UnicodeError) as e:
    raise CloudAccessError(
        f'{where}: DNS lookup of {host} failed ({getattr(e, "strerror", None) or e}), so this '
        'host has no network or no DNS; connect it (or point STORAGE_EMULATOR_HOST at an '
        'emulator), or use a local directory') from None
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    raise CloudAccessError(
        f'{where}: cannot connect to {host}:{port} ({getattr(e, "strerror", None) or e}); '
        'check the network, firewall or proxy'
        + (' and that the emulator at STORAGE_EMULATOR_HOST is running' if emulated_gcs()
           else '')) from None
  try:
    _fsspec(path).call('GET', 'b/{}/o', bucket, maxResults=1, json_out=True)
  except FileNotFoundError:
    raise CloudAccessError(
        f'{where}: the bucket does not exist (404 from {endpoint}); fix the name, or create '
        f'it: gcloud storage buckets create gs://{bucket}') from None
  except Exception as e:  # pylint: disable=broad-except
    code = getattr(e, 'code', None)
    text = str(e).split('\n')[-1].strip() or type(e).__name__
    if code == 401 or _is_credentials_error(e):
      raise CloudAccessError(
          f'{where}: no valid credentials (401: {text}); {_CREDENTIALS_FIX}') from None
    if code == 403 or str(e).startswith('Forbidden'):
      raise CloudAccessError(
          f'{where}: the credentials in use may not list it (403: {text}); grant that '
          f'account roles/storage.objectAdmin on gs://{bucket}, or use other credentials '
          f'({_CREDENTIALS_FIX})') from None
    raise CloudAccessError(f'{where}: listing it failed ({type(e).__name__}: {text}); '
                           'retry, or pass --verbose to see where') from e


def _is_credentials_error(e: BaseException) -> bool:
  try:
    from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(e, exceptions.GoogleAuthError)
