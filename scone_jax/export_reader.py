"""Reading an export for serving: its consistency checks, the tokenizer, the parameters, and
where the f-gram path (the table and the matcher) lives and how the compiled step reads it.

`read` refuses an export whose pieces do not belong together (f-gram set, tokenizer, params,
model config fingerprints), a truncated or corrupt table, a missing piece, and an export
that never completed; each message says what to do.

Where the f-gram path lives (the accelerator holds nothing whose size grows with the number
of f-grams S unless a user asks for it):
- table_storage 'device': accelerator memory; 'host': host memory in a pinned_host memory
  kind, gathered by the compiled step (XLA host compute; only the B matched rows cross);
  'ram', 'mmap', 'tensorstore': host lookups called from the step.
- matcher_storage 'device': `device_match` arrays in accelerator memory (~39 bytes per
  f-gram, replicated per chip on a mesh); 'host': the same arrays in host memory, matched by
  host compute inside the compiled step (only the B f-gram ids cross). Default: host unless
  the table is on the device.
"""
import dataclasses
import functools
import logging
import time
from typing import Optional

from flax import linen as nn
import jax
from jax.experimental.compute_on import compute_on
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scone_jax import decode
from scone_jax import device_match
from scone_jax import fgrams as fgrams_lib
from scone_jax import model as model_lib
from scone_jax import paths
from scone_jax import sharding
from scone_jax import table as table_lib
from scone_jax import tokenizer as tokenizer_lib
from scone_jax.table import Table

STORAGES = ('device', 'host', 'ram', 'mmap', 'tensorstore')
DEFAULT_STORAGE = 'host'
# Gathered by the compiled step itself; the others are host lookups called from the step.
IN_STEP_STORAGES = ('device', 'host')
MATCHER_STORAGES = ('device', 'host')
MMAP_FILE = table_lib.MMAP_FILE


def default_matcher_storage(table_storage: str, matcher_storage: Optional[str] = None) -> str:
  """The matcher's storage: as asked, else host unless the table is on the device."""
  if matcher_storage is None:
    return 'device' if table_storage == 'device' else 'host'
  if matcher_storage not in MATCHER_STORAGES:
    raise ValueError(f'matcher_storage={matcher_storage!r}; use device or host.')
  return matcher_storage


# ----------------------------------------------------------------------------- memory kinds


def host_memory_kind(device) -> str:
  kinds = {m.kind for m in device.addressable_memories()}
  if 'pinned_host' not in kinds:
    raise ValueError(f'{device.platform} device {device} has no pinned_host memory '
                     f'(memories: {sorted(kinds)}); use table_storage=device or ram and '
                     'matcher_storage=device.')
  return 'pinned_host'


def placement(storage: str, device=None, mesh=None, spec=None) -> jax.sharding.NamedSharding:
  """A sharding in accelerator ('device') or host ('host') memory: `spec` (default:
  replicated) over a mesh, or one device (a one-device mesh: a NamedSharding carries its
  memory kind into the type of an abstract operand, so `compile.lower_decode`'s operands
  are typed as serving's arrays are)."""
  first = mesh.devices.flat[0] if mesh is not None else (device or jax.devices()[0])
  kind = host_memory_kind(first) if storage == 'host' else 'device'
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array([first]), ('one',))
  return jax.sharding.NamedSharding(mesh, spec or jax.sharding.PartitionSpec(),
                                    memory_kind=kind)


# ----------------------------------------------------------------------------- the table


def gather_in_step(table_SxD, fid_B, *, host: bool = False):
  """Rows [B, d] of f-gram ids (-1: row 0, unused), traced inside a jitted step. A table in
  host memory (host=True) is gathered there (XLA host compute) and only the B rows cross
  to the device. An int8 table is (rows int8 [S, d], scales [S]): its rows and scales cross
  as they are and are dequantized (float32) on the device."""
  ids_B = jnp.maximum(fid_B, 0)
  parts = table_SxD if isinstance(table_SxD, tuple) else (table_SxD,)
  if not host:
    got = tuple(p[ids_B] for p in parts)
  else:
    with compute_on('device_host'):
      host_ids_B = jax.device_put(ids_B, jax.memory.Space.Host)
      got = tuple(p[host_ids_B] for p in parts)
    got = jax.device_put(got, jax.memory.Space.Device)
  return table_lib.dequantize_rows(*got) if len(got) == 2 else got[0]


gather_jit = jax.jit(gather_in_step, static_argnames='host')


def table_sharding(mesh, dim: int, storage: str) -> jax.sharding.NamedSharding:
  """A device/host table on a serving mesh: columns split over `tensor` (replicated when d
  does not divide). Split rather than replicated: a replicated pinned_host table would be
  one copy per device in the host's memory; split, each device gathers [B, d/N] of the B
  matched rows locally and only those cross between devices."""
  split = dim % mesh.shape['tensor'] == 0
  return placement(storage, mesh=mesh,
                   spec=jax.sharding.PartitionSpec(None, 'tensor' if split else None))


def scales_sharding(table_placement: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  """An int8 table's scales [S] beside its rows on a mesh: replicated, same memory kind."""
  return jax.sharding.NamedSharding(table_placement.mesh, jax.sharding.PartitionSpec(None),
                                    memory_kind=table_placement.memory_kind)


def _in_step_table(rows, storage: str, scales=None) -> Table:
  return Table(device_rows=rows, storage=storage, scales=scales,
               device_gather=functools.partial(gather_jit, host=storage == 'host'))


def place_table(rows_SxD: np.ndarray, storage: str, device=None, mesh=None,
                scales_S=None) -> Table:
  """A Table of numpy rows (int8 ones with their per-row scales) in `storage`: 'ram' (as
  given), 'device' (accelerator memory) or 'host' (host memory the compiled step addresses:
  a pinned_host memory kind). With a serving mesh the device and host tables are split over
  the tensor axis along d (`table_sharding`): one copy in all."""
  if storage == 'ram':
    return Table(rows_SxD, storage='ram', scales=scales_S)
  if storage not in IN_STEP_STORAGES:
    raise ValueError(f'place_table(storage={storage!r}); use ram, device or host.')
  if mesh is not None:
    rows_at = table_sharding(mesh, rows_SxD.shape[1], storage)
    scales_at = scales_sharding(rows_at)
  else:
    rows_at = scales_at = placement(storage, device)
  scales = jax.device_put(scales_S, scales_at) if scales_S is not None else None
  return _in_step_table(jax.device_put(rows_SxD, rows_at), storage, scales)


def table_on_mesh(table: Optional[Table], mesh) -> Optional[Table]:
  """`table` as the compiled steps over `mesh` read it: a device or host table placed
  elsewhere (e.g. on one device) is moved to `table_sharding`; the others are unchanged."""
  if table is None or table.device_rows is None:
    return table
  want = table_sharding(mesh, table.dim, table.storage)
  if table.device_rows.sharding.is_equivalent_to(want, 2):
    return table
  scales = (jax.device_put(table.scales, scales_sharding(want)) if table.scales is not None
            else None)
  return _in_step_table(jax.device_put(table.device_rows, want), table.storage, scales)


def host_gather(table: Table, fid_B: np.ndarray) -> np.ndarray:
  """Rows [B, d] of ids through a host lookup (ram, mmap, tensorstore); zeros where -1."""
  t0 = time.perf_counter()
  fid_B = np.asarray(fid_B)
  rows = np.zeros((fid_B.size, table.dim), table.row_dtype)
  matched = fid_B >= 0
  if matched.any():
    rows[matched] = table.lookup(fid_B[matched])
  seconds = time.perf_counter() - t0
  table.host_lookup_seconds += seconds
  # A decode step asks for B ids, a prefill for B x width; only the matched ones are read.
  table.lookup_times.record(seconds, fid_B.size, int(np.count_nonzero(matched)))
  return rows


def callback_gather(table: Table):
  """gather(operand, fid_B) for host-lookup storages: a host callback from the compiled
  step (the row depends on the token sampled just before, so nothing can run ahead)."""
  def gather(_, fid_B):
    shape = jax.ShapeDtypeStruct((fid_B.shape[0], table.dim), table.row_dtype)
    return jax.pure_callback(lambda f: host_gather(table, f), shape, fid_B)
  return gather


# ----------------------------------------------------------------------------- the matcher


def place_matcher(arrays: device_match.MatcherArrays, storage: str, device=None,
                  mesh=None) -> device_match.MatcherArrays:
  """The matcher's arrays in accelerator ('device') or host ('host') memory, replicated over
  a mesh (a lookup needs every key)."""
  return jax.device_put(arrays, placement(storage, device, mesh))


def host_take(pairs):
  """device_match's `take` for arrays in host memory: the indices go to the host, the
  gathers run there (XLA host compute) and only the gathered values come back."""
  with compute_on('device_host'):
    got = tuple(a[jax.device_put(i, jax.memory.Space.Host)] for a, i in pairs)
  return jax.device_put(got, jax.memory.Space.Device)


def match_in_step(matcher, ctx_BxK, doc_len_B, *, host: bool = False):
  """device_match.match_last traced inside a jitted step; with host=True the matcher's
  arrays stay in host memory and are read there (`host_take`): the hashing and compares
  run on the device over [B, K-1, ~2] values, only indices and gathered values cross."""
  return device_match.match_last(matcher, ctx_BxK, doc_len_B,
                                 take=host_take if host else None)


def fgram_path(table_storage: str, matcher_storage: str,
               callback: Optional[object] = None) -> decode.FgramPath:
  """How the compiled step reads a table in `table_storage` and a matcher in
  `matcher_storage`; callback: the gather of a host-lookup table (`callback_gather`)."""
  if table_storage in IN_STEP_STORAGES:
    gather = functools.partial(gather_in_step, host=table_storage == 'host')
  elif callback is None:
    raise ValueError(f'a {table_storage} table is read through a host callback; pass it.')
  else:
    gather = callback
  return decode.FgramPath(match=functools.partial(match_in_step,
                                                  host=matcher_storage == 'host'),
                          gather=gather)


def fgram_path_bytes(table: Optional[Table], matcher: Optional[device_match.MatcherArrays],
                     matcher_storage: str) -> dict:
  """{'accelerator': bytes, 'host': bytes} of the table and matcher as placed (per copy)."""
  out = {'accelerator': 0, 'host': 0}
  if table is not None:
    out['accelerator' if table.storage == 'device' else 'host'] += int(table.nbytes)
  if matcher is not None:
    out['accelerator' if matcher_storage == 'device' else 'host'] += matcher.nbytes
  return out


# ----------------------------------------------------------------------------- parameters


def abstract_params(model, device, *, mesh=None, rules=None):
  """The main model's parameters as ShapeDtypeStructs on one device, or in their shardings
  over a serving mesh (a restore target)."""
  if mesh is not None:
    return sharding.abstract_params(model, {'inputs_BxL': jnp.zeros((1, 1), jnp.int32)},
                                    mesh, rules)[0]
  def init():
    return nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))['params'])
  shapes = jax.eval_shape(init)
  single = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single),
                      shapes)


def restore_params(params_dir: str, model, device=None, *, mesh=None, rules=None):
  """The main model's parameters from an export's param-only checkpoint, on one device or
  straight into their shardings over a serving mesh."""
  device = device if device is not None else jax.devices()[0]
  target = abstract_params(model, device, mesh=mesh, rules=rules)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(paths.abspath(params_dir), target)
  except Exception as e:  # orbax raises many kinds for a tree or shape mismatch
    raise ValueError(f'{params_dir} does not hold this model\'s parameters ({type(e).__name__}:'
                     f' {str(e)[:300]}); re-run --mode=export.') from e


def mesh_rules(config: model_lib.ModelConfig, mesh) -> tuple:
  """The training rules (sharding.DEFAULT_RULES: heads, MLP and vocab over `tensor`) for a
  serving mesh; ValueError when the mesh is not tensor-only or the model does not split."""
  sizes = dict(mesh.shape)
  n = sizes.get('tensor', 0)
  if set(sizes) != set(sharding.MESH_AXES) or sizes['data'] * sizes['fsdp'] != 1:
    raise ValueError(f'serving mesh {sizes}: serving shards over the tensor axis only; build '
                     'it with sharding.serving_mesh("tensor:N").')
  for what, size in (('attention heads', config.num_heads), ('MLP units', config.mlp_dim)):
    if size % n:
      raise ValueError(f'--mesh=tensor:{n}: the model has {size} {what}, not divisible by {n}; '
                       f'use a tensor size that divides {config.num_heads} heads and '
                       f'{config.mlp_dim} MLP units.')
  rules = []
  for name, axes in sharding.DEFAULT_RULES:
    if name == 'vocab' and config.vocab_size % n:
      logging.info('vocab %d does not divide over tensor=%d: embeddings and logits replicated '
                   'along the vocab.', config.vocab_size, n)
      axes = None
    rules.append((name, axes))
  return tuple(rules)


# ----------------------------------------------------------------------------- reading


def _mismatch(what, path, got, want):
  return ValueError(f'{path} is {what} {str(got)[:12]}… but the table was exported with '
                    f'{str(want)[:12]}…: the pieces of this export do not belong together; '
                    'put back the export\'s own file or re-run --mode=export.')


@dataclasses.dataclass
class Export:
  """The pieces of an export, checked to belong together."""
  meta: dict
  model_json: dict
  model_config: model_lib.ModelConfig     # f-grams disabled: serving never builds A_fgram
  params: object
  table: Table
  fgram_set: fgrams_lib.FGramSet
  tokenizer: object


def _check_pieces(export_dir: str, meta: dict):
  """(tokenizer, f-gram set, model json) after checking their fingerprints against meta."""
  path = lambda name: paths.join(export_dir, name)
  tokenizer_file = path(meta.get('tokenizer_file', table_lib.TOKENIZER_FILE))
  tokenizer = tokenizer_lib.load(tokenizer_file, meta.get('tokenizer_kind', 'sentencepiece'),
                                 meta.get('tokenizer_special_ids'))
  if tokenizer.fingerprint != meta['tokenizer_fingerprint']:
    raise _mismatch('tokenizer', tokenizer_file, tokenizer.fingerprint,
                    meta['tokenizer_fingerprint'])
  fgram_set = fgrams_lib.FGramSet.load(path(table_lib.FGRAMS_FILE))
  if fgram_set.fingerprint != meta['fgram_fingerprint']:
    raise ValueError(f'the table was exported for f-gram set {meta["fgram_fingerprint"][:12]}…'
                     f' but {path(table_lib.FGRAMS_FILE)} is f-gram set '
                     f'{fgram_set.fingerprint[:12]}…; put back the export\'s own fgrams.npz or '
                     're-run --mode=export for this f-gram set.')
  mc_digest = table_lib.file_digest(path(table_lib.MODEL_CONFIG_FILE))
  if mc_digest != meta['model_config_sha256']:
    raise _mismatch('model config', path(table_lib.MODEL_CONFIG_FILE), mc_digest,
                    meta['model_config_sha256'])
  params_digest = table_lib.file_tree_digest(path(table_lib.PARAMS_DIR))
  if params_digest != meta['params_sha256']:
    raise _mismatch('parameter checkpoint', path(table_lib.PARAMS_DIR), params_digest,
                    meta['params_sha256'])
  return tokenizer, fgram_set, table_lib.read_json(path(table_lib.MODEL_CONFIG_FILE))


def _open_store(table_dir: str, meta: dict, layout, cache_bytes: int):
  """The tensorstore of the table after checking shard sizes, shape and dtype."""
  for s in range(layout.num_shards):
    f = layout.shard_file(table_dir, s)
    size = paths.getsize(f) if paths.isfile(f) else -1
    if size != meta['shard_bytes'][s]:
      raise ValueError(f'table shard file {f} has {size if size >= 0 else "no"} bytes, the '
                       f'export wrote {meta["shard_bytes"][s]}: the table is truncated or '
                       'incomplete; re-run --mode=export.')
  try:
    store = table_lib.open_table(table_dir, cache_bytes=cache_bytes)
  except ValueError as e:
    raise ValueError(f'cannot open the table {table_dir} ({e}); re-run --mode=export.') from e
  want_shape = (layout.num_rows, layout.dim)
  if tuple(store.shape) != want_shape or np.dtype(store.dtype.numpy_dtype) != np.dtype(
      jnp.dtype(layout.dtype)):
    raise ValueError(f'table {table_dir} is {tuple(store.shape)} {store.dtype} but the export '
                     f'recorded {want_shape} {layout.dtype}; re-run --mode=export.')
  return store


def _read_table(export_dir, meta, layout, table_storage, table_dtype, *, cache_rows, verify,
                mmap_path, device, mesh) -> Table:
  """The table in `table_storage` (see serving.load for the storages and options)."""
  table_dir = paths.join(export_dir, table_lib.TABLE_DIR)
  itemsize = np.dtype(jnp.dtype(layout.dtype)).itemsize
  cache_bytes = cache_rows * layout.dim * itemsize if table_storage == 'tensorstore' else 0
  store = _open_store(table_dir, meta, layout, cache_bytes)
  if verify is None:
    verify = table_storage != 'tensorstore'
  if table_storage in ('ram',) + IN_STEP_STORAGES:
    rows, scales = table_lib.read_table(store, meta, table_dtype, verify=verify, what=table_dir)
    return place_table(rows, table_storage, device, mesh, scales)
  if table_storage == 'mmap':
    mmap_path = mmap_path or paths.join(export_dir, MMAP_FILE if table_dtype == layout.dtype
                                        else f'table.{table_dtype}.npy')
    try:
      rows, scales = table_lib.mmap_table(store, meta, mmap_path, verify, table_dir,
                                          table_dtype)
    except OSError as e:
      raise OSError(f'cannot write the memory-mapped copy of the table at {mmap_path} ({e}); '
                    'pass load(..., mmap_path=A_WRITABLE_FILE) or use table_storage=ram.') from e
    return Table(rows, storage='mmap', scales=scales)
  if verify:
    table_lib.read_shards(store, meta, verify=True, what=table_dir)
  return Table(store=store, storage='tensorstore', table_dtype=table_dtype,
               cache_bytes=cache_bytes)


def read(export_dir: str, table_storage: str = DEFAULT_STORAGE, *, cache_rows: int = 1 << 16,
         verify: Optional[bool] = None, mmap_path: Optional[str] = None, device=None,
         mesh=None, table_dtype: Optional[str] = None) -> Export:
  """The checked pieces of an export directory written by `export.export`, the table in
  `table_storage` and the parameters on `device` or over `mesh` (see serving.load)."""
  if table_storage not in STORAGES:
    raise ValueError(f'table_storage={table_storage!r}; use one of {", ".join(STORAGES)}.')
  table_lib.check_table_dtype(table_dtype)
  export_dir = paths.abspath(export_dir)
  meta = table_lib.read_metadata(export_dir)
  tokenizer, fgram_set, model_json = _check_pieces(export_dir, meta)
  full_config = model_lib.ModelConfig(**model_json['model'])
  rules = mesh_rules(full_config, mesh) if mesh is not None else None  # before the table read
  layout = table_lib.TableLayout(**meta['layout'])
  if layout.num_rows != len(fgram_set) or layout.dim != full_config.d_model:
    raise ValueError(f'{export_dir}: table layout {layout} does not fit {len(fgram_set)} '
                     f'f-grams of width {full_config.d_model}; re-run --mode=export.')
  table = _read_table(export_dir, meta, layout, table_storage, table_dtype or layout.dtype,
                      cache_rows=cache_rows, verify=verify, mmap_path=mmap_path, device=device,
                      mesh=mesh)
  model_config = dataclasses.replace(full_config, fgrams_enabled=False)
  params = restore_params(paths.join(export_dir, table_lib.PARAMS_DIR),
                          model_lib.SconeLM(model_config), device, mesh=mesh, rules=rules)
  return Export(meta, model_json, model_config, params, table, fgram_set, tokenizer)
