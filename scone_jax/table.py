"""The export format: the [S, d] f-gram table on disk, its checksums, and the serving-side Table.

Export writes what this module describes and serving reads it; neither imports the other.
An export directory:
  table/             tensorstore zarr3 array [S, d]; rows in read chunks (one chunk is the unit
                     of a random-row read) grouped into shard files (`sharding_indexed`), every
                     chunk and shard index with a crc32c
  params/            orbax checkpoint of the main model's parameters only
  fgrams.npz, tokenizer.model, model_config.json
  export.json        metadata binding the pieces (fingerprints, step, layout, per-shard
                     sha256); written last, so a directory without it is not an export
The table checksum is sha256 over the per-shard sha256 digests in order, each taken over the
shard's rows as stored (little-endian, row-major).
"""
import dataclasses
import hashlib
import logging
import os
import time
from typing import Optional

import jax.numpy as jnp
import numba
import numpy as np
import tensorstore as ts

from scone_jax import paths

FORMAT_VERSION = 1
PARTIAL_SUFFIX = '.partial'
TABLE_DIR = 'table'
PARAMS_DIR = 'params'
FGRAMS_FILE = 'fgrams.npz'
TOKENIZER_FILE = 'tokenizer.model'
MODEL_CONFIG_FILE = 'model_config.json'
METADATA_FILE = 'export.json'
REQUEST_FILE = 'request.json'
TABLE_DTYPES = ('float32', 'bfloat16', 'float16')
_TABLE_DIGEST_TAG = b'scone_jax.table.v1'
_SHARD_TARGET_BYTES = 64 << 20   # default shard file size: few files, cheap random reads
MMAP_FILE = 'table.npy'


# ----------------------------------------------------------------------------- checksums


def rows_digest(rows_NxD: np.ndarray) -> str:
  """sha256 of rows as stored: little-endian bytes, row-major."""
  rows = np.ascontiguousarray(rows_NxD)
  if rows.dtype.byteorder == '>':
    rows = rows.astype(rows.dtype.newbyteorder('<'))
  return hashlib.sha256(memoryview(rows.reshape(-1).view(np.uint8))).hexdigest()


def table_digest(shard_digests) -> str:
  """The table checksum: sha256 over the shards' sha256 digests, in shard order."""
  h = hashlib.sha256(_TABLE_DIGEST_TAG)
  for d in shard_digests:
    h.update(bytes.fromhex(d))
  return h.hexdigest()


def file_tree_digest(directory: str) -> str:
  """sha256 over every file under directory (relative path, size, content), sorted by path."""
  h = hashlib.sha256()
  for rel, p in paths.walk_files(directory):
    h.update(rel.encode('utf-8') + b'\0')
    h.update(str(paths.getsize(p)).encode() + b'\0')
    with paths.open(p, 'rb') as f:   # streamed: parameter files can be gigabytes
      for block in iter(lambda: f.read(1 << 22), b''):
        h.update(block)
  return h.hexdigest()


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with paths.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------- table layout


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """How the [S, d] table is cut: read chunks of rows, grouped into shard files."""
  num_rows: int
  dim: int
  dtype: str
  rows_per_chunk: int
  chunks_per_shard: int

  @property
  def shard_rows(self) -> int:
    return self.rows_per_chunk * self.chunks_per_shard

  @property
  def num_shards(self) -> int:
    return -(-self.num_rows // self.shard_rows)

  def shard_range(self, s: int) -> tuple:
    return s * self.shard_rows, min(self.num_rows, (s + 1) * self.shard_rows)

  def shard_file(self, table_dir: str, s: int) -> str:
    # zarr3 default chunk key encoding: c/<row block>/<column block>.
    return paths.join(table_dir, 'c', str(s), '0')

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def make_layout(num_rows: int, dim: int, dtype: str, rows_per_chunk: int,
                chunks_per_shard: int = 0) -> TableLayout:
  """A layout; chunks_per_shard=0 picks shard files of about 64 MiB."""
  if dtype not in TABLE_DTYPES:
    raise ValueError(f'export.dtype={dtype!r}; use one of {", ".join(TABLE_DTYPES)}.')
  if rows_per_chunk < 1:
    raise ValueError(f'export.rows_per_chunk={rows_per_chunk} must be positive.')
  if chunks_per_shard <= 0:
    chunk_bytes = rows_per_chunk * dim * np.dtype(jnp.dtype(dtype)).itemsize
    chunks_per_shard = max(1, _SHARD_TARGET_BYTES // max(chunk_bytes, 1))
    # No point in shards longer than the table.
    chunks_per_shard = min(chunks_per_shard, max(1, -(-num_rows // rows_per_chunk)))
  return TableLayout(int(num_rows), int(dim), dtype, int(rows_per_chunk), int(chunks_per_shard))


def table_spec(table_dir: str, layout: Optional[TableLayout] = None) -> dict:
  """tensorstore spec of the table; with a layout, the zarr3 metadata to create it."""
  spec = {'driver': 'zarr3', 'kvstore': paths.kvstore_spec(table_dir)}
  if layout is not None:
    little = {'name': 'bytes', 'configuration': {'endian': 'little'}}
    spec['metadata'] = {
        'shape': [layout.num_rows, layout.dim],
        'data_type': layout.dtype,
        'chunk_grid': {'name': 'regular',
                       'configuration': {'chunk_shape': [layout.shard_rows, layout.dim]}},
        'chunk_key_encoding': {'name': 'default'},
        'fill_value': 0,
        'codecs': [{
            'name': 'sharding_indexed',
            'configuration': {
                'chunk_shape': [layout.rows_per_chunk, layout.dim],
                # Uncompressed rows (embeddings do not compress) with a crc32c per chunk, so a
                # damaged chunk fails its read instead of returning wrong numbers.
                'codecs': [little, {'name': 'crc32c'}],
                'index_codecs': [little, {'name': 'crc32c'}],
                'index_location': 'end',
            },
        }],
    }
  return spec


def open_table(table_dir: str, layout: Optional[TableLayout] = None, *, create=False,
               cache_bytes: int = 0):
  """Opens (or with create=True, creates or reopens) the table's tensorstore."""
  spec = table_spec(table_dir, layout)
  context = ts.Context({'cache_pool': {'total_bytes_limit': int(cache_bytes)}})
  if create:
    return ts.open(spec, create=True, open=True, context=context).result()
  return ts.open(spec, open=True, context=context).result()


write_json_atomic = paths.write_json_atomic
read_json = paths.read_json



# ----------------------------------------------------------------------------- reading

@numba.njit(nogil=True)
def gather_rows_kernel(table_SxW, ids_N, out_NxW):
  for i in range(ids_N.shape[0]):
    out_NxW[i, :] = table_SxW[ids_N[i], :]


def as_bits(arr: np.ndarray) -> np.ndarray:
  """The same memory as unsigned ints of the item size (numba copies them; no bfloat16 there)."""
  return arr.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[arr.dtype.itemsize])


# ----------------------------------------------------------------------------- table


class Table:
  """The exported [S, d] f-gram table: in RAM, memory-mapped, read through tensorstore, or a
  jax array (`device_rows`: accelerator memory, or host memory the compiled step addresses)
  with `device_gather(rows, ids) -> rows` to read it."""

  def __init__(self, rows_SxD: Optional[np.ndarray] = None, *, store=None, storage='ram',
               device_rows=None, device_gather=None):
    if sum(x is not None for x in (rows_SxD, store, device_rows)) != 1:
      raise ValueError('pass exactly one of rows_SxD (ram/mmap), store (tensorstore) or '
                       'device_rows (device/host).')
    self.storage = storage
    self._rows = rows_SxD
    self._store = store
    self.device_rows = device_rows
    self._device_gather = device_gather
    # Seconds spent in host lookups from a compiled step (serving.host_gather): the server's
    # table-lookup metric. Device/host storages gather inside the step and add nothing here.
    self.host_lookup_seconds = 0.0
    if device_rows is not None:
      self.num_rows, self.dim = (int(x) for x in device_rows.shape)
      self.dtype = np.dtype(device_rows.dtype)
      self._rows_bits = None
    elif rows_SxD is not None:
      if rows_SxD.ndim != 2:
        raise ValueError(f'table rows have shape {rows_SxD.shape}; expected [S, d].')
      self.num_rows, self.dim = rows_SxD.shape
      self.dtype = rows_SxD.dtype
      self._rows_bits = as_bits(np.asarray(rows_SxD))
    else:
      self.num_rows, self.dim = (int(x) for x in store.shape)
      self.dtype = np.dtype(store.dtype.numpy_dtype)
      self._rows_bits = None

  @property
  def array(self) -> Optional[np.ndarray]:
    """The rows as a numpy array (RAM or memmap; a host copy for device/host storage); None
    for tensorstore storage."""
    if self.device_rows is not None:
      return np.asarray(self.device_rows)
    return self._rows

  @property
  def nbytes(self) -> int:
    return self.num_rows * self.dim * self.dtype.itemsize

  def lookup(self, ids, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, d] of f-gram ids (each in [0, S)); `out` ([n, d], table dtype) is reused."""
    ids = np.asarray(ids).reshape(-1)
    if out is None:
      out = np.empty((ids.size, self.dim), self.dtype)
    if ids.size == 0:
      return out
    if ids.dtype != np.int64 and ids.dtype != np.int32:
      ids = ids.astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= self.num_rows:
      raise IndexError(f'f-gram ids in [{lo}, {hi}] are outside the table of {self.num_rows} '
                       'rows.')
    if self.device_rows is not None:
      out[...] = np.asarray(self._device_gather(self.device_rows, ids))
    elif self._rows is not None:
      gather_rows_kernel(self._rows_bits, ids, as_bits(out))
    else:
      # One read of the distinct rows: tensorstore fetches each chunk once through its cache.
      uniq, inverse = np.unique(ids, return_inverse=True)
      rows = self._store[uniq].read().result()
      np.take(rows, inverse.reshape(-1), axis=0, out=out)
    return out


def read_shards(store, meta, *, into=None, verify=True, what=''):
  """Reads the table shard by shard (into `into` if given), checking each shard's sha256."""
  layout = TableLayout(**meta['layout'])
  for s in range(layout.num_shards):
    lo, hi = layout.shard_range(s)
    try:
      rows = store[lo:hi].read().result()
    except ValueError as e:  # tensorstore reports crc32c and index damage as ValueError
      raise ValueError(f'{what}: shard {s} (rows {lo}..{hi}) is corrupt ({str(e)[:200]}); '
                       're-run --mode=export to rebuild the export.') from e
    if verify:
      got = rows_digest(rows)
      want = meta['shard_sha256'][s]
      if got != want:
        raise ValueError(f'{what}: shard {s} (rows {lo}..{hi}) has sha256 {got[:12]}… but the '
                         f'export recorded {want[:12]}…: the table is truncated or corrupt; '
                         're-run --mode=export to rebuild it.')
    if into is not None:
      into[lo:hi] = rows


def verify_array(rows_SxD, meta, what):
  layout = TableLayout(**meta['layout'])
  for s in range(layout.num_shards):
    lo, hi = layout.shard_range(s)
    got = rows_digest(rows_SxD[lo:hi])
    if got != meta['shard_sha256'][s]:
      raise ValueError(f'{what}: rows {lo}..{hi} have sha256 {got[:12]}… but the export '
                       f'recorded {meta["shard_sha256"][s][:12]}…: the file is truncated or '
                       'corrupt; delete it (it is rebuilt from the table) or re-run '
                       '--mode=export.')


def mmap_table(store, meta, path, verify, table_dir) -> np.ndarray:
  """A read-only memmap of the table, materialised from the zarr table once and verified."""
  layout = TableLayout(**meta['layout'])
  dtype = np.dtype(jnp.dtype(layout.dtype))
  bits_dtype = as_bits(np.zeros(1, dtype)).dtype
  sidecar = path + '.json'
  if paths.is_cloud(path):
    raise ValueError(f'{path}: a memory-mapped table needs a local file; pass '
                     'mmap_path=LOCAL_FILE or use table_storage=ram or tensorstore.')
  fresh = False
  if paths.isfile(path) and paths.isfile(sidecar):
    try:
      ok = read_json(sidecar).get('table_sha256') == meta['table_sha256']
    except (OSError, ValueError):
      ok = False
    if not ok:
      logging.info('%s was built from another table; rebuilding it', path)
  else:
    ok = False
  if not ok:
    t0 = time.time()
    tmp = f'{path}.tmp{os.getpid()}'
    # Stored as unsigned ints of the item size: .npy has no bfloat16.
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=bits_dtype,
                                    shape=(layout.num_rows, layout.dim))
    read_shards(store, meta, into=out.view(dtype), verify=True, what=table_dir)
    out.flush()
    del out
    paths.replace(tmp, path)
    write_json_atomic(sidecar, {'table_sha256': meta['table_sha256'], 'dtype': layout.dtype})
    fresh = True
    logging.info('materialised the table as %s (%.1f MB, %.1fs)', path,
                 layout.num_rows * layout.dim * dtype.itemsize / 1e6, time.time() - t0)
  mm = np.load(path, mmap_mode='r')
  if mm.shape != (layout.num_rows, layout.dim) or mm.dtype != bits_dtype:
    raise ValueError(f'{path} holds {mm.shape} {mm.dtype}, not the table '
                     f'[{layout.num_rows}, {layout.dim}] {layout.dtype}; delete it.')
  rows = np.asarray(mm).view(dtype)
  if verify and not fresh:
    verify_array(rows, meta, path)
  return rows


_PIECES = (
    (TABLE_DIR, 'the f-gram table'),
    (PARAMS_DIR, 'the main model parameters'),
    (FGRAMS_FILE, 'the f-gram set'),
    (TOKENIZER_FILE, 'the tokenizer'),
    (MODEL_CONFIG_FILE, 'the model config'),
)


def read_metadata(export_dir: str) -> dict:
  """The export's metadata; refuses a missing, incomplete or interrupted export."""
  export_dir = paths.abspath(export_dir)
  partial = export_dir + PARTIAL_SUFFIX
  if not paths.isdir(export_dir):
    if paths.isdir(partial):
      raise ValueError(f'no export at {export_dir}, only the interrupted one at {partial}: '
                       're-run --mode=export with the same config and workdir to finish it.')
    raise FileNotFoundError(f'no export at {export_dir}; create one with --mode=export.')
  meta_path = paths.join(export_dir, METADATA_FILE)
  if not paths.isfile(meta_path):
    raise ValueError(f'{export_dir} has no {METADATA_FILE}: the export did not '
                     'complete (interrupted, or copied part way); re-run --mode=export.')
  try:
    meta = read_json(meta_path)
  except (OSError, ValueError) as e:
    raise ValueError(f'{meta_path} is unreadable ({e}); re-run --mode=export.') from e
  version = meta.get('format_version')
  if version != FORMAT_VERSION:
    raise ValueError(f'{export_dir} has export format {version}, this scone_jax reads '
                     f'{FORMAT_VERSION}; re-export with this version.')
  for name, what in _PIECES:
    if name == TOKENIZER_FILE:   # tokenizer.json for a Hugging Face tokenizer
      name = meta.get('tokenizer_file', TOKENIZER_FILE)
    if not paths.exists(paths.join(export_dir, name)):
      raise FileNotFoundError(f'{export_dir} lacks {name} ({what}); the export is incomplete '
                              'or was altered: re-run --mode=export.')
  return meta


