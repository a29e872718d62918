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

The table on disk is always float (export.dtype). Serving may hold it in another dtype
(`table_dtype`): float16 / bfloat16 (a cast), or int8 with one float32 scale per row
(symmetric: scale = max|row| / 127, q = round(row / scale)), converted shard by shard as it
is read, so the float table is never held beside the converted one. A row's int8 values
depend on that row alone, so every storage (including rows quantized as they are read from
tensorstore) gives the same numbers.
"""
import dataclasses
import functools
import hashlib
import logging
import mmap
import os
import time
from typing import Optional

import jax.numpy as jnp
import numba
import numpy as np
import tensorstore as ts

from scone_jax import paths
from scone_jax import row_reads

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
# What serving may hold the table as (`table_dtype`); int8 carries a float32 scale per row.
SERVING_DTYPES = TABLE_DTYPES + ('int8',)
INT8 = 'int8'
# float32, not float16: the scale's own rounding would add up to 127 * 2^-11 of a scale per
# element (float16 has 11 significant bits) and small rows' scales would go subnormal; the
# 2 extra bytes per row are 1.5% of an int8 row at d=128, 0.1% at d=2048.
SCALE_DTYPE = np.float32
_QUANTIZE_BLOCK_ROWS = 1 << 14   # rows converted at a time: bounds the float32 temporaries
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
  if dtype == INT8:
    raise ValueError("export.dtype='int8': the export stays float (int8 is made as serving "
                     'loads it); export float32 or float16 and load with --table_dtype=int8.')
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
  return arr.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[arr.dtype.itemsize])


# ----------------------------------------------------------------------------- table dtypes


def check_table_dtype(table_dtype: Optional[str]) -> Optional[str]:
  """table_dtype itself (None: the export's own dtype); ValueError for an unknown one."""
  if table_dtype is not None and table_dtype not in SERVING_DTYPES:
    raise ValueError(f'table_dtype={table_dtype!r}; use one of {", ".join(SERVING_DTYPES)} '
                     '(or none: the export\'s own dtype).')
  return table_dtype


def np_dtype(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))


def quantize_rows(rows_NxD: np.ndarray) -> tuple:
  """Symmetric per-row int8: (q [N, d] int8, scale [N] float32), scale = max|row| / 127, so
  |q * scale - row| <= scale / 2 per element. A zero row gets scale 0."""
  x_NxD = np.asarray(rows_NxD, np.float32)
  if not np.isfinite(x_NxD).all():
    bad = int(np.flatnonzero(~np.isfinite(x_NxD).all(axis=1))[0])
    raise ValueError(f'table row {bad} (of this block) is not finite: it cannot be quantized '
                     'to int8; check the export (re-run --mode=export) or use a float table_dtype.')
  scale_N = (np.abs(x_NxD).max(axis=1) / np.float32(127)).astype(SCALE_DTYPE)
  safe_N = np.where(scale_N > 0, scale_N, np.float32(1))
  q_NxD = np.clip(np.rint(x_NxD / safe_N[:, None]), -127, 127).astype(np.int8)
  return q_NxD, scale_N


def dequantize_rows(q_NxD, scale_N):
  """q * scale as float32 (numpy or jax arrays alike: int8 -> float32 is exact, then one
  rounded multiply, so the host and the compiled step agree bit for bit)."""
  return q_NxD.astype(np.float32) * scale_N[..., None]


def convert_rows(rows_NxD: np.ndarray, table_dtype: str, out=None, scales_out=None):
  """Rows of the export's dtype as table_dtype, in blocks (bounded float32 temporaries):
  into `out` (and `scales_out` for int8) when given; returns (rows, scales or None)."""
  n = rows_NxD.shape[0]
  if out is None:
    out = np.empty(rows_NxD.shape, np_dtype(table_dtype))
  if table_dtype != INT8:
    out[...] = rows_NxD
    return out, None
  if scales_out is None:
    scales_out = np.empty(n, SCALE_DTYPE)
  for lo in range(0, n, _QUANTIZE_BLOCK_ROWS):
    hi = min(n, lo + _QUANTIZE_BLOCK_ROWS)
    out[lo:hi], scales_out[lo:hi] = quantize_rows(rows_NxD[lo:hi])
  return out, scales_out


def read_table(store, meta, table_dtype: str, *, verify=True, what=''):
  """The whole table in host memory as table_dtype: (rows [S, d], scales [S] or None). Read
  and converted shard by shard (each shard checked against its sha256 as stored), so peak
  memory is the converted table plus one shard, never the float table beside it."""
  layout = TableLayout(**meta['layout'])
  rows = np.empty((layout.num_rows, layout.dim), np_dtype(table_dtype))
  scales = np.empty(layout.num_rows, SCALE_DTYPE) if table_dtype == INT8 else None
  if table_dtype == layout.dtype:
    read_shards(store, meta, into=rows, verify=verify, what=what)
    return rows, None

  class _Into:   # read_shards assigns each verified shard: convert it on the way in
    def __setitem__(self, sl, shard_rows):
      convert_rows(shard_rows, table_dtype, rows[sl],
                   None if scales is None else scales[sl])

  read_shards(store, meta, into=_Into(), verify=verify, what=what)
  return rows, scales


# ----------------------------------------------------------------------------- table


class Table:
  """The exported [S, d] f-gram table: in RAM, memory-mapped, read through tensorstore, or a
  jax array (`device_rows`: accelerator memory, or host memory the compiled step addresses)
  with `device_gather(operand, ids) -> rows` to read it.

  An int8 table also has `scales` [S] (float32; numpy, or a jax array beside device_rows) and
  its lookups return float32 rows q * scale (`row_dtype`). A tensorstore table stays as the
  export wrote it on disk; `table_dtype` converts each row as it is read (the same numbers
  as a table converted at load).

  A lookup of several rows of an mmap table reads them concurrently (`row_reads`: one
  page fault per pool thread); a tensorstore table reads them in one batched read (its
  own I/O runs the chunks in parallel; per-row read futures were no faster at 10M or
  100M rows: experiments/results/scale/cpu_quiet_100m.json). `lookup_concurrent` sets it
  per table; the bits are the same either way.
  `lookup_times` keeps the duration of the latest host lookups from a compiled step.
  cache_bytes: a tensorstore table's cache bound (its cache pool), kept to reopen it."""

  # Concurrent per-row reads for a lookup of several rows of an mmap or tensorstore table
  # (False: one gather / one read of all rows); set in __init__ per storage, and a
  # benchmark flips it per table.
  lookup_concurrent = True

  def __init__(self, rows_SxD: Optional[np.ndarray] = None, *, store=None, storage='ram',
               device_rows=None, device_gather=None, scales=None,
               table_dtype: Optional[str] = None, cache_bytes: int = 0):
    if sum(x is not None for x in (rows_SxD, store, device_rows)) != 1:
      raise ValueError('pass exactly one of rows_SxD (ram/mmap), store (tensorstore) or '
                       'device_rows (device/host).')
    self.storage = storage
    self.lookup_concurrent = storage != 'tensorstore'
    self._rows = rows_SxD
    self._store = store
    self.device_rows = device_rows
    self.scales = scales
    self._device_gather = device_gather
    # Seconds spent in host lookups from a compiled step (serving.host_gather): the server's
    # table-lookup metric. Device/host storages gather inside the step and add nothing here.
    self.host_lookup_seconds = 0.0
    self.lookup_times = row_reads.LookupTimes()
    self.cache_bytes = int(cache_bytes)
    self._convert_on_read = None
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
      if table_dtype is not None and np_dtype(table_dtype) != self.dtype:
        self._convert_on_read = table_dtype
        self.dtype = np_dtype(table_dtype)
    if (self.dtype == np.int8) != (scales is not None or self._convert_on_read == INT8):
      raise ValueError('an int8 table needs its per-row scales, and only an int8 table has '
                       'them.')
    if scales is not None and tuple(scales.shape) != (self.num_rows,):
      raise ValueError(f'scales have shape {tuple(scales.shape)}; expected [{self.num_rows}].')
    if storage == 'mmap' and rows_SxD is not None:
      # Lookups read scattered rows: a fault reads its page, not a readahead window around it.
      row_reads.advise(rows_SxD, mmap.MADV_RANDOM)

  @property
  def quantized(self) -> bool:
    return self.dtype == np.int8

  @property
  def row_dtype(self) -> np.dtype:
    """The dtype of the rows a lookup or gather returns (float32 for an int8 table)."""
    return np.dtype(np.float32) if self.quantized else self.dtype

  @property
  def operand(self):
    """What a compiled step gathers from: device_rows, or (device_rows, scales) for int8."""
    if self.device_rows is None:
      return None
    return (self.device_rows, self.scales) if self.quantized else self.device_rows

  @property
  def array(self) -> Optional[np.ndarray]:
    """The rows as stored, as a numpy array (RAM or memmap; a host copy for device/host
    storage; int8 for an int8 table: see `scales`); None for tensorstore storage."""
    if self.device_rows is not None:
      return np.asarray(self.device_rows)
    return self._rows

  @property
  def nbytes(self) -> int:
    """Bytes of the table as held (rows plus an int8 table's scales)."""
    rows = self.num_rows * self.dim * self.dtype.itemsize
    return rows + (self.num_rows * np.dtype(SCALE_DTYPE).itemsize if self.quantized else 0)

  def lookup(self, ids, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, d] of f-gram ids (each in [0, S)) in row_dtype; `out` ([n, d]) is reused."""
    ids = np.asarray(ids).reshape(-1)
    if out is None:
      out = np.empty((ids.size, self.dim), self.row_dtype)
    if ids.size == 0:
      return out
    if ids.dtype != np.int64 and ids.dtype != np.int32:
      ids = ids.astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= self.num_rows:
      raise IndexError(f'f-gram ids in [{lo}, {hi}] are outside the table of {self.num_rows} '
                       'rows.')
    concurrent = (self.lookup_concurrent and ids.size > 1
                  and self.storage in ('mmap', 'tensorstore'))
    if self.device_rows is not None:
      out[...] = np.asarray(self._device_gather(self.operand, ids))
    elif self._rows is not None:
      gather = (functools.partial(row_reads.gather_mapped, gather_rows_kernel)
                if concurrent else gather_rows_kernel)
      if self.quantized:
        q = np.empty((ids.size, self.dim), np.int8)
        gather(self._rows_bits, ids, as_bits(q))
        out[...] = dequantize_rows(q, np.asarray(self.scales)[ids])
      else:
        gather(self._rows_bits, ids, as_bits(out))
    else:
      # The distinct rows: tensorstore fetches each chunk once through its cache.
      uniq, inverse = np.unique(ids, return_inverse=True)
      rows = (row_reads.read_rows_concurrent(self._store, uniq) if concurrent
              else self._store[uniq].read().result())
      if self._convert_on_read is not None:
        rows, scales = convert_rows(rows, self._convert_on_read)
        if scales is not None:
          rows = dequantize_rows(rows, scales)
      np.take(rows, inverse.reshape(-1), axis=0, out=out)
    return out

  def drop_cache(self):
    """Forgets what this process holds of a table on disk, so the next lookups read the
    disk once the page cache is dropped too: an mmap table's mapped pages are released
    (and its files' page cache dropped), a tensorstore table is reopened with an empty
    cache of the same bound. Nothing for tables in memory."""
    if self.storage == 'mmap':
      for arr in (self._rows, self.scales):
        if arr is not None and row_reads.release_pages(arr):
          row_reads.drop_file_cache(row_reads.mapping_of(arr)[1])
    elif self._store is not None:
      self._store = row_reads.reopen_store(self._store, self.cache_bytes)


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


def verify_array(rows_SxD, meta, what, shard_sha256=None):
  """Checks rows against the export's shard digests (or shard_sha256: those of a converted
  copy, recorded when it was made)."""
  layout = TableLayout(**meta['layout'])
  digests = shard_sha256 if shard_sha256 is not None else meta['shard_sha256']
  for s in range(layout.num_shards):
    lo, hi = layout.shard_range(s)
    got = rows_digest(rows_SxD[lo:hi])
    if got != digests[s]:
      raise ValueError(f'{what}: rows {lo}..{hi} have sha256 {got[:12]}… but '
                       f'{digests[s][:12]}… was recorded: the file is truncated or '
                       'corrupt; delete it (it is rebuilt from the table) or re-run '
                       '--mode=export.')


def scales_path(path: str) -> str:
  """Where the memory-mapped copy of an int8 table keeps its per-row scales."""
  return (path[:-4] if path.endswith('.npy') else path) + '.scales.npy'


def mmap_table(store, meta, path, verify, table_dir, table_dtype: Optional[str] = None):
  """A read-only memmap of the table as table_dtype (default: the export's), materialised
  from the zarr table once (converted shard by shard) and verified -> (rows, scales or None;
  an int8 table's scales are a second memmapped file, `scales_path(path)`)."""
  layout = TableLayout(**meta['layout'])
  table_dtype = table_dtype or layout.dtype
  dtype = np_dtype(table_dtype)
  converted = table_dtype != layout.dtype
  quantized = table_dtype == INT8
  bits_dtype = as_bits(np.zeros(1, dtype)).dtype
  sidecar = path + '.json'
  spath = scales_path(path)
  if paths.is_cloud(path):
    raise ValueError(f'{path}: a memory-mapped table needs a local file; pass '
                     'mmap_path=LOCAL_FILE or use table_storage=ram or tensorstore.')
  fresh = False
  info = {}
  if paths.isfile(path) and paths.isfile(sidecar) and (not quantized or paths.isfile(spath)):
    try:
      info = read_json(sidecar)
      ok = (info.get('table_sha256') == meta['table_sha256']
            and info.get('dtype') == table_dtype)
    except (OSError, ValueError):
      ok = False
    if not ok:
      logging.info('%s was built from another table or as another dtype; rebuilding it', path)
  else:
    ok = False
  if not ok:
    t0 = time.time()
    tmp = f'{path}.tmp{os.getpid()}'
    # Stored as unsigned ints of the item size: .npy has no bfloat16.
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=bits_dtype,
                                    shape=(layout.num_rows, layout.dim))
    rows_view = out.view(dtype)
    scales_tmp = f'{spath}.tmp{os.getpid()}'
    scales = (np.lib.format.open_memmap(scales_tmp, mode='w+', dtype=SCALE_DTYPE,
                                        shape=(layout.num_rows,)) if quantized else None)
    info = {'table_sha256': meta['table_sha256'], 'dtype': table_dtype}
    if converted:
      digests = []

      class _Into:   # each verified float shard, converted into the copy, its digest kept
        def __setitem__(self, sl, shard_rows):
          convert_rows(shard_rows, table_dtype, rows_view[sl],
                       None if scales is None else scales[sl])
          digests.append(rows_digest(rows_view[sl]))

      read_shards(store, meta, into=_Into(), verify=True, what=table_dir)
      info['shard_sha256'] = digests
    else:
      read_shards(store, meta, into=rows_view, verify=True, what=table_dir)
    out.flush()
    del out, rows_view
    if quantized:
      scales.flush()
      info['scales_sha256'] = rows_digest(np.asarray(scales))
      del scales
      paths.replace(scales_tmp, spath)
    paths.replace(tmp, path)
    write_json_atomic(sidecar, info)
    fresh = True
    logging.info('materialised the table as %s (%s, %.1f MB, %.1fs)', path, table_dtype,
                 layout.num_rows * layout.dim * dtype.itemsize / 1e6, time.time() - t0)
  mm = np.load(path, mmap_mode='r')
  if mm.shape != (layout.num_rows, layout.dim) or mm.dtype != bits_dtype:
    raise ValueError(f'{path} holds {mm.shape} {mm.dtype}, not the table '
                     f'[{layout.num_rows}, {layout.dim}] {table_dtype}; delete it.')
  rows = np.asarray(mm).view(dtype)
  scales = None
  if quantized:
    scales = np.asarray(np.load(spath, mmap_mode='r'))
    if scales.shape != (layout.num_rows,) or scales.dtype != SCALE_DTYPE:
      raise ValueError(f'{spath} holds {scales.shape} {scales.dtype}, not the table\'s '
                       f'[{layout.num_rows}] scales; delete it.')
  if verify and not fresh:
    verify_array(rows, meta, path, info.get('shard_sha256') if converted else None)
    if quantized and rows_digest(scales) != info.get('scales_sha256'):
      raise ValueError(f'{spath}: the scales do not match the sha256 recorded when they '
                       'were made: the file is truncated or corrupt; delete it (it is '
                       'rebuilt from the table).')
  return rows, scales


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


