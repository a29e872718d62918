"""Serving: the main model with a KV cache; f-gram input vectors come from the exported table.

The f-gram model is gone at this point. The prompt is matched on the host (the f-gram
set's compiled matcher) and prefilled; then `make_decode_loop` runs up to N decode steps
per compiled call: per row and step it matches the longest f-gram ending at the new token
on the device (`device_match`), reads that row of the table (gathered by the step itself
for the `device` and `host` storages, through a host callback for `ram`, `mmap` and
`tensorstore`), uses `where(matched, row, T[token])` as the input vector, runs one
KV-cached step of the main model and samples. So decoding costs the main model plus a
match and a row read, with no Python between tokens.

  gen = serving.load('runs/scone/export')            # table in host memory, checksum verified
  gen.generate_text(['The nation'], max_new_tokens=32)
  gen.evaluate(docs)                                 # == train.eval_documents, via the table

`load` refuses an export whose pieces do not belong together (f-gram set, tokenizer, params,
model config fingerprints), a truncated or corrupt table, a missing piece, and an export
that never completed; each message says what to do.

`load(..., mesh=sharding.serving_mesh('tensor:8'))` (`--mesh`) splits the main model over
local devices as training's rules do (heads, MLP units, vocab over `tensor`), the KV cache on
heads, and a device/host table along d (one copy in all); tokens equal one device's.

Length (~910 lines): table placement, `load` (the export's consistency checks), the mesh
placement, the decode loop and the `Generator` (prefill, chunked decode, evaluation through
the table) share the input layout and the jitted step; continuous batching and HTTP live in `engine.py`
and `server.py`. `DecodeLookup` is the host-side match and gather of one step, kept as the
reference the on-device loop is tested against and for benchmarks.
"""
import dataclasses
import functools
import logging
import time
from typing import Optional, Sequence

from flax import linen as nn
import jax
from jax.experimental.compute_on import compute_on
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scone_jax import corpus
from scone_jax import device_match
from scone_jax import tokenizer as tokenizer_lib
from scone_jax import packing
from scone_jax import paths
from scone_jax import fgrams as fgrams_lib
from scone_jax import model as model_lib
from scone_jax import metrics
from scone_jax import sharding
from scone_jax import table as table_lib
from scone_jax.table import Table

STORAGES = ('device', 'host', 'ram', 'mmap', 'tensorstore')
DEFAULT_STORAGE = 'host'
# Gathered by the compiled step itself; the others are host lookups called from the step.
IN_STEP_STORAGES = ('device', 'host')
DEFAULT_TOKENS_PER_DISPATCH = 16
MMAP_FILE = table_lib.MMAP_FILE
BOS_ID = packing.BOS_ID
_PREFILL_BUCKET = 16
_CACHE_BUCKET = 64
_DEFAULT_ROPE_MAX_LEN_FACTOR = 8   # rope: decode up to 8 × the training seq_len by default
# Columns of the int inputs the step takes: token id, position, f-gram id (-1 = none), valid.
_TOK, _POS, _FID, _VALID = range(4)


# ----------------------------------------------------------------------------- host kernels


# ----------------------------------------------------------------------------- decode lookups


class DecodeLookup:
  """The host side of one decode step for a batch: match the f-gram ending at each row's new
  token and gather its table row, into buffers the jitted step reads.

  `reset(docs)` starts from each row's document so far; `advance(tokens_B)` pushes one token
  per row and returns (rows [B, d] in the table dtype, ints [B, 4] int32 = token, position,
  f-gram id or -1, valid). Both outputs are the same buffers every step. With table=None
  (or fgram_set=None) nothing is matched: the baseline's inputs.
  """

  def __init__(self, table: Optional['Table'], fgram_set: Optional[fgrams_lib.FGramSet],
               batch: int, dim: int):
    self.table = table
    self.fgram_set = fgram_set if table is not None else None
    self.k = self.fgram_set.max_len if self.fgram_set is not None else 2
    self.state = np.zeros((batch, self.k + 2), np.int64)
    self.rows = np.zeros((batch, dim), table.row_dtype if table is not None else np.float32)
    self.ints = np.zeros((batch, 4), np.int32)
    # An int8 table's rows need their scales: read through table.lookup like tensorstore.
    self._in_ram = table is not None and table.array is not None and not table.quantized
    rows_bits = table_lib.as_bits(self.rows)
    table_bits = table_lib.as_bits(table.array) if self._in_ram else np.zeros((0, dim), rows_bits.dtype)
    if self.fgram_set is not None:
      mt = self.fgram_set.table
      match = (mt.flat, mt.width, mt.shift, self.fgram_set.max_len)
    else:
      match = (np.zeros(8, np.int32), 8, np.uint64(61), 0)
    self._args = match + (table_bits, rows_bits, self.ints)
    self._read_rows = table is not None and not self._in_ram

  def reset(self, docs: Sequence[np.ndarray], positions: Sequence[int]):
    """Each row's document tokens so far (BOS excluded) and the position of its next input."""
    for b, (doc, pos) in enumerate(zip(docs, positions)):
      self.reset_row(b, doc, pos)

  def reset_row(self, b: int, doc: np.ndarray, position: int):
    """Row b alone starts over (a server slot taking a new request); the others keep going."""
    k = self.k
    self.state[b] = 0
    tail = np.asarray(doc)[-k:]
    self.state[b, k - tail.size:k] = tail
    self.state[b, k] = len(doc)
    self.state[b, k + 1] = position

  def advance(self, tokens_B: np.ndarray):
    """Pushes one token per row; returns the (rows, ints) buffers for the next step."""
    fgrams_lib.advance_matches(self.state, tokens_B, *self._args)
    if self._read_rows:  # tensorstore: read the matched rows
      matched = self.ints[:, _FID] >= 0
      if matched.any():
        self.rows[matched] = self.table.lookup(self.ints[matched, _FID])
    return self.rows, self.ints


# ----------------------------------------------------------------------------- table placement


def _host_memory_kind(device) -> str:
  kinds = {m.kind for m in device.addressable_memories()}
  if 'pinned_host' not in kinds:
    raise ValueError(f'{device.platform} device {device} has no pinned_host memory '
                     f'(memories: {sorted(kinds)}); use table_storage=device or ram.')
  return 'pinned_host'


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


_gather_jit = jax.jit(gather_in_step, static_argnames='host')


def place_table(rows_SxD: np.ndarray, storage: str, device=None, mesh=None,
                scales_S=None) -> Table:
  """A Table of numpy rows (int8 ones with their per-row scales) in `storage`: 'ram' (as
  given), 'device' (accelerator memory) or 'host' (host memory the compiled step addresses:
  a pinned_host memory kind).

  With a serving mesh (`--mesh`) the device and host tables are split over the tensor axis
  along d (`table_sharding`): still one copy in all, each device gathering its columns of
  the matched rows (an int8 table's scales, [S], are replicated beside them)."""
  if storage == 'ram':
    return Table(rows_SxD, storage='ram', scales=scales_S)
  if storage not in IN_STEP_STORAGES:
    raise ValueError(f'place_table(storage={storage!r}); use ram, device or host.')
  if mesh is not None:
    placement = table_sharding(mesh, rows_SxD.shape[1], storage)
    scale_placement = scales_sharding(placement)
  else:
    device = device if device is not None else jax.devices()[0]
    kind = _host_memory_kind(device) if storage == 'host' else 'device'
    placement = scale_placement = jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
  placed = jax.device_put(rows_SxD, placement)
  scales = jax.device_put(scales_S, scale_placement) if scales_S is not None else None
  return Table(device_rows=placed, storage=storage, scales=scales,
               device_gather=functools.partial(_gather_jit, host=storage == 'host'))


def table_sharding(mesh, dim: int, storage: str) -> jax.sharding.NamedSharding:
  """A device/host table on a serving mesh: columns split over `tensor` (replicated when d
  does not divide). Split rather than replicated: a replicated pinned_host table would be
  one copy per device in the host's memory; split, each device gathers [B, d/N] of the B
  matched rows locally and only those cross between devices."""
  kind = _host_memory_kind(mesh.devices.flat[0]) if storage == 'host' else 'device'
  split = dim % mesh.shape['tensor'] == 0
  spec = jax.sharding.PartitionSpec(None, 'tensor' if split else None)
  return jax.sharding.NamedSharding(mesh, spec, memory_kind=kind)


def scales_sharding(table_placement: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  """An int8 table's scales [S] beside its rows on a mesh: replicated, same memory kind."""
  return jax.sharding.NamedSharding(table_placement.mesh, jax.sharding.PartitionSpec(None),
                                    memory_kind=table_placement.memory_kind)


def host_gather(table: Table, fid_B: np.ndarray) -> np.ndarray:
  """Rows [B, d] of ids through a host lookup (ram, mmap, tensorstore); zeros where -1."""
  t0 = time.perf_counter()
  fid_B = np.asarray(fid_B)
  rows = np.zeros((fid_B.size, table.dim), table.row_dtype)
  matched = fid_B >= 0
  if matched.any():
    rows[matched] = table.lookup(fid_B[matched])
  table.host_lookup_seconds += time.perf_counter() - t0
  return rows


def callback_gather(table: Table):
  """gather(operand, fid_B) for host-lookup storages: a host callback from the compiled
  step (the row depends on the token sampled just before, so nothing can run ahead)."""
  def gather(_, fid_B):
    shape = jax.ShapeDtypeStruct((fid_B.shape[0], table.dim), table.row_dtype)
    return jax.pure_callback(lambda f: host_gather(table, f), shape, fid_B)
  return gather


# ----------------------------------------------------------------------------- loading


def _mismatch(what, path, got, want):
  return ValueError(f'{path} is {what} {str(got)[:12]}… but the table was exported with '
                    f'{str(want)[:12]}…: the pieces of this export do not belong together; '
                    'put back the export\'s own file or re-run --mode=export.')


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


# The cache's logical axes (model.Attention's variables; a scanned stack adds 'layers' first),
# sharded as MaxText shards its decode cache: the heads over `tensor`.
_CACHE_AXES = {'cached_key': ('batch', 'length', 'heads', 'kv'),
               'cached_value': ('batch', 'length', 'heads', 'kv'),
               'cached_valid': ('batch', 'length'), 'cache_index': ('batch',)}


def cache_shardings(cache, mesh, rules):
  """NamedShardings of a KV cache tree (arrays or ShapeDtypeStructs) over a serving mesh."""
  def one(path, leaf):
    axes = _CACHE_AXES[path[-1].key]
    axes = ('layers',) * (len(leaf.shape) - len(axes)) + axes
    return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))
  return jax.tree_util.tree_map_with_path(one, cache)


def load(export_dir: str, table_storage: str = DEFAULT_STORAGE, *, cache_rows: int = 1 << 16,
         verify: Optional[bool] = None, mmap_path: Optional[str] = None,
         max_len: Optional[int] = None, device=None, mesh=None,
         table_dtype: Optional[str] = None) -> 'Generator':
  """A Generator over an export directory written by `export.export`.

  table_storage: where the table lives and who reads it. Gathered by the compiled decode
  step: 'device' (accelerator memory; tables that fit there) and 'host' (host memory in a
  pinned_host memory kind, gathered by XLA host compute; on a CPU backend this is plain
  host memory). Host lookups called from the step: 'ram' (whole table in host RAM), 'mmap'
  (a raw copy of the table next to it, `table.npy`, made once and memory-mapped) or
  'tensorstore' (rows read on demand through a cache of about `cache_rows` rows: for
  tables bigger than RAM). Every storage gives the same tokens.
  verify: check the table's sha256 (default: yes for ram/mmap; for tensorstore only the
  shape, dtype and shard file sizes unless verify=True, which reads the whole table).
  max_len: longest prompt + generation (rope models; learned positions are capped at the
  training seq_len).
  mesh: a serving mesh (`sharding.serving_mesh('tensor:N')`, `--mesh`): parameters restored
  straight into their tensor-parallel shardings, the KV cache split on heads, a device or
  host table split along d over the same devices (see `Generator`).
  table_dtype: the table as held (default: the export's dtype): float32, float16, bfloat16,
  or int8 with a float32 scale per row (about half of float16's memory; rows dequantized in
  the gather). Converted shard by shard as it is read; tensorstore converts rows per read,
  and mmap makes its copy (`table.<dtype>.npy`) in this dtype.
  """
  if table_storage not in STORAGES:
    raise ValueError(f'table_storage={table_storage!r}; use one of {", ".join(STORAGES)}.')
  table_lib.check_table_dtype(table_dtype)
  t0 = time.time()
  export_dir = paths.abspath(export_dir)
  meta = table_lib.read_metadata(export_dir)

  def path(name):
    return paths.join(export_dir, name)

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
  model_json = table_lib.read_json(path(table_lib.MODEL_CONFIG_FILE))
  full_config = model_lib.ModelConfig(**model_json['model'])
  rules = mesh_rules(full_config, mesh) if mesh is not None else None  # before the table read

  table_dir = path(table_lib.TABLE_DIR)
  layout = table_lib.TableLayout(**meta['layout'])
  if layout.num_rows != len(fgram_set) or layout.dim != full_config.d_model:
    raise ValueError(f'{export_dir}: table layout {layout} does not fit {len(fgram_set)} '
                     f'f-grams of width {full_config.d_model}; re-run --mode=export.')
  for s in range(layout.num_shards):
    f = layout.shard_file(table_dir, s)
    size = paths.getsize(f) if paths.isfile(f) else -1
    if size != meta['shard_bytes'][s]:
      raise ValueError(f'table shard file {f} has {size if size >= 0 else "no"} bytes, the '
                       f'export wrote {meta["shard_bytes"][s]}: the table is truncated or '
                       'incomplete; re-run --mode=export.')
  itemsize = np.dtype(jnp.dtype(layout.dtype)).itemsize
  cache_bytes = cache_rows * layout.dim * itemsize if table_storage == 'tensorstore' else 0
  try:
    store = table_lib.open_table(table_dir, cache_bytes=cache_bytes)
  except ValueError as e:
    raise ValueError(f'cannot open the table {table_dir} ({e}); re-run --mode=export.') from e
  want_shape = (layout.num_rows, layout.dim)
  if tuple(store.shape) != want_shape or np.dtype(store.dtype.numpy_dtype) != np.dtype(
      jnp.dtype(layout.dtype)):
    raise ValueError(f'table {table_dir} is {tuple(store.shape)} {store.dtype} but the export '
                     f'recorded {want_shape} {layout.dtype}; re-run --mode=export.')
  if verify is None:
    verify = table_storage != 'tensorstore'
  table_dtype = table_dtype or layout.dtype
  if table_storage in ('ram',) + IN_STEP_STORAGES:
    rows, scales = table_lib.read_table(store, meta, table_dtype, verify=verify, what=table_dir)
    table = place_table(rows, table_storage, device, mesh, scales)
    del rows, scales
  elif table_storage == 'mmap':
    mmap_path = mmap_path or path(MMAP_FILE if table_dtype == layout.dtype
                                  else f'table.{table_dtype}.npy')
    try:
      rows, scales = table_lib.mmap_table(store, meta, mmap_path, verify, table_dir,
                                          table_dtype)
    except OSError as e:
      raise OSError(f'cannot write the memory-mapped copy of the table at {mmap_path} ({e}); '
                    'pass load(..., mmap_path=A_WRITABLE_FILE) or use table_storage=ram.') from e
    table = Table(rows, storage='mmap', scales=scales)
  else:
    if verify:
      table_lib.read_shards(store, meta, verify=True, what=table_dir)
    table = Table(store=store, storage='tensorstore', table_dtype=table_dtype)

  model_config = dataclasses.replace(full_config, fgrams_enabled=False)
  model = model_lib.SconeLM(model_config)
  params = restore_params(path(table_lib.PARAMS_DIR), model, device, mesh=mesh, rules=rules)
  gen = Generator(model_config, params, table, fgram_set, tokenizer,
                  seq_len=model_json['seq_len'], batch_size=model_json['batch_size'],
                  max_len=max_len, device=device, mesh=mesh)
  gen.metadata = meta
  logging.info('loaded export %s (step %d, %d f-grams, d=%d, %s table held as %s, %.1f MB, in '
               '%s%s) in %.1fs', export_dir, meta['step'], layout.num_rows, layout.dim,
               layout.dtype, table_dtype, table.nbytes / 1e6, table_storage,
               f', mesh {dict(mesh.shape)}' if mesh is not None else '', time.time() - t0)
  return gen


# ----------------------------------------------------------------------------- the model


def _token_embed(module, ids):
  return module.token_embed(ids)


def _sample(logits_BxV, key, temperature, top_p, *, greedy, top_k, use_top_p):
  """Greedy, or temperature sampling restricted to the top-k and/or top-p (nucleus) tokens."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  neg = jnp.finfo(logits_BxV.dtype).min
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
  if use_top_p:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    kept_BxV = before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, neg, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def input_vectors(model, params, rows_BxLxD, ints_BxLx4):
  """where(matched, table row, T[token]): SCONE's input embedding, f-gram model-free."""
  x_BxLxD = model.apply({'params': params}, ints_BxLx4[..., _TOK], method=_token_embed)
  if rows_BxLxD is None:  # the baseline: no table
    return x_BxLxD
  matched_BxL = ints_BxLx4[..., _FID] >= 0
  return jnp.where(matched_BxL[..., None], rows_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)


def make_decode_step(model, *, greedy: bool, top_k: int, use_top_p: bool):
  """The KV-cached step (not jitted): (params, cache, rows [B, L, d] or None, ints [B, L, 4],
  rng, sampling [temperature, top_p]) -> (next tokens [B], cache, rng).

  L new positions per row: the prompt at prefill, 1 per decode step.
  """
  def step(params, cache, rows_BxLxD, ints_BxLx4, rng, sampling):
    x_BxLxD = input_vectors(model, params, rows_BxLxD, ints_BxLx4)
    logits_BxLxV, state = model.apply(
        {'params': params, 'cache': cache}, x_BxLxD, positions_BxL=ints_BxLx4[..., _POS],
        valid_BxL=ints_BxLx4[..., _VALID] > 0, decode=True,
        method=model_lib.SconeLM.backbone, mutable=['cache'])
    rng, sub = jax.random.split(rng)
    tokens_B = _sample(logits_BxLxV[:, -1], sub, sampling[0], sampling[1], greedy=greedy,
                       top_k=top_k, use_top_p=use_top_p)
    return tokens_B, state['cache'], rng
  return step


def apply_cached(model, params, cache, rows_BxLxD, ints_BxLx4):
  """One KV-cached forward pass of L new positions per row -> (logits [B, L, V], cache)."""
  x_BxLxD = input_vectors(model, params, rows_BxLxD, ints_BxLx4)
  logits_BxLxV, state = model.apply(
      {'params': params, 'cache': cache}, x_BxLxD, positions_BxL=ints_BxLx4[..., _POS],
      valid_BxL=ints_BxLx4[..., _VALID] > 0, decode=True,
      method=model_lib.SconeLM.backbone, mutable=['cache'])
  return logits_BxLxV, state['cache']


def make_decode_loop(model, num_steps: int, sample, gather=None, outputs=None):
  """Up to `num_steps` decode steps in one compiled call (a `lax.while_loop`; not jitted):
  (params, cache, table, matcher, carry, sampling, is_stop_V) -> (carry, cache, outs).

  Per step and row, on the device: push the row's last token into its match window, match
  the longest f-gram ending there (`device_match`), gather its table row (`gather(table,
  fid_B)`; None = the baseline, no table), run the KV-cached step, sample. carry (arrays
  [B] unless noted): tok (the token fed next), ctx [B, K] and doc_len (match windows), pos,
  done, left (tokens a row may still emit), count (tokens emitted), honor_stop (whether
  is_stop_V ends the row), and whatever `sample(logits_BxV, carry, sampling) -> (tok_B,
  carry)` keeps (an rng key). Done rows compute but emit nothing; the loop ends early when
  every row is done. outs: tokens [B, num_steps] (-1 = not emitted) and, if `outputs` is
  given, `outputs(logits_BxV, tok_B)`'s arrays stacked on axis 1; steps: steps run.
  """
  def body(state):
    i, c, cache, outs, (params, table, matcher, sampling, is_stop_V) = state
    c = dict(c)
    live_B = ~c['done']
    ctx, doc_len = device_match.push(c['ctx'], c['doc_len'], c['tok'], live_B)
    fid_B = jnp.full_like(c['tok'], -1)
    rows_Bx1xD = None
    if gather is not None:
      fid_B = device_match.match_last(matcher, ctx, doc_len)
      rows_Bx1xD = gather(table, fid_B)[:, None]
    ints_Bx1x4 = jnp.stack([c['tok'], c['pos'], fid_B, live_B.astype(jnp.int32)], -1)[:, None]
    logits_Bx1xV, cache = apply_cached(model, params, cache, rows_Bx1xD, ints_Bx1x4)
    tok_B, c = sample(logits_Bx1xV[:, 0], c, sampling)
    outs = dict(outs, tokens=outs['tokens'].at[:, i].set(jnp.where(live_B, tok_B, -1)))
    if outputs is not None:
      for k, v in outputs(logits_Bx1xV[:, 0], tok_B).items():
        outs[k] = outs[k].at[:, i].set(v)
    left = c['left'] - live_B
    stop_B = live_B & ((is_stop_V[tok_B] & c['honor_stop']) | (left <= 0))
    c.update(ctx=ctx, doc_len=doc_len, tok=jnp.where(live_B, tok_B, c['tok']),
             pos=c['pos'] + live_B, left=left, count=c['count'] + live_B,
             done=c['done'] | stop_B)
    return i + 1, c, cache, outs, state[4]

  def run(params, cache, table, matcher, carry, sampling, is_stop_V):
    batch = carry['tok'].shape[0]
    outs = {'tokens': jnp.full((batch, num_steps), -1, jnp.int32)}
    if outputs is not None:
      shapes = jax.eval_shape(outputs, jnp.zeros((batch, model.config.vocab_size)),
                              jnp.zeros((batch,), jnp.int32))
      outs.update({k: jnp.zeros((batch, num_steps) + v.shape[1:], v.dtype)
                   for k, v in shapes.items()})
    state = (jnp.int32(0), carry, cache, outs, (params, table, matcher, sampling, is_stop_V))
    steps, carry, cache, outs, _ = jax.lax.while_loop(
        lambda st: (st[0] < num_steps) & ~jnp.all(st[1]['done']), body, state)
    return carry, cache, dict(outs, steps=steps)
  return run


def cache_shapes(model, batch: int, length: int):
  """ShapeDtypeStructs of an empty KV cache of `length` slots for `batch` rows."""
  def init():
    x = jnp.zeros((batch, length, model.config.d_model), jnp.float32)
    return model.init(jax.random.PRNGKey(0), x, decode=True,
                      method=model_lib.SconeLM.backbone)['cache']
  return jax.eval_shape(init)


def jit_on_mesh(fn, mesh, rules, *, donate_argnums=(), cache_out: Optional[int] = None):
  """jax.jit(fn), called (and `.lower`ed) under a serving mesh and its logical rules, so the
  model's activation constraints take effect. With `cache_out`, output `cache_out` (the KV
  cache) is pinned to `cache_shardings`: a donated cache comes back as it went in and the
  next call reuses the compiled program."""
  def pinned(*args):
    out = fn(*args)
    if cache_out is None:
      return out
    out = list(out)
    out[cache_out] = jax.lax.with_sharding_constraint(
        out[cache_out], cache_shardings(out[cache_out], mesh, rules))
    return tuple(out)

  return sharding.under_mesh(jax.jit(pinned, donate_argnums=donate_argnums), mesh, rules)


def _on_mesh(table: Optional[Table], mesh) -> Optional[Table]:
  """`table` as the compiled steps over `mesh` read it: a device or host table placed
  elsewhere (e.g. on one device) is moved to `table_sharding`; the others are unchanged."""
  if table is None or table.device_rows is None:
    return table
  want = table_sharding(mesh, table.dim, table.storage)
  if table.device_rows.sharding.is_equivalent_to(want, 2):
    return table
  scales = (jax.device_put(table.scales, scales_sharding(want)) if table.scales is not None
            else None)
  return Table(device_rows=jax.device_put(table.device_rows, want), storage=table.storage,
               scales=scales,
               device_gather=functools.partial(_gather_jit, host=table.storage == 'host'))


def _bucket(n, size):
  return max(size, -(-n // size) * size)


class Generator:
  """The main model (no f-gram model) under jit with a KV cache, plus the f-gram table.

  Attributes: config (ModelConfig, fgrams disabled), params (token_embed, decoder, lm_head),
  table (Table), fgram_set, tokenizer, seq_len, batch_size (eval), max_len, last_stats (timing
  of the latest generate call).
  use_table=False turns the lookups off (every position gets T[token]): the baseline cost of
  the same main model, for benchmarks.
  mesh: a serving mesh (`sharding.serving_mesh('tensor:N')`): tensor parallelism as in
  training (sharding.DEFAULT_RULES: attention heads, MLP units and, where it divides, the
  vocab split over `tensor`), the KV cache split on heads, a device or host table split
  along d (`table_sharding`; a table given on one device is moved there), host-lookup
  tables (ram, mmap, tensorstore) and the matcher arrays as before; every compiled step
  traces under the mesh and its rules. None: one device.
  """

  def __init__(self, model_config: model_lib.ModelConfig, params, table: Optional[Table],
               fgram_set: Optional[fgrams_lib.FGramSet], tokenizer=None, *, seq_len: int,
               batch_size: int = 16, max_len: Optional[int] = None, device=None,
               use_table: bool = True, mesh=None):
    if model_config.fgrams_enabled:
      # Serving never builds (or reads) the f-gram model.
      model_config = dataclasses.replace(model_config, fgrams_enabled=False)
    if 'fgram_model' in params:
      raise ValueError('params include the f-gram model; serving takes the main model only '
                       '(token_embed, decoder, lm_head), as export writes it.')
    if use_table:
      if table is None or fgram_set is None:
        raise ValueError('use_table=True needs the table and the f-gram set.')
      if table.num_rows != len(fgram_set) or table.dim != model_config.d_model:
        raise ValueError(f'table [{table.num_rows}, {table.dim}] does not fit {len(fgram_set)} '
                         f'f-grams of width {model_config.d_model}.')
    self.config = model_config
    self.model = model_lib.SconeLM(model_config)
    self.mesh = mesh
    if mesh is not None:
      self.rules = mesh_rules(model_config, mesh)
      self.device = mesh.devices.flat[0]
      self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      param_shardings = jax.tree.map(lambda s: s.sharding, abstract_params(
          self.model, self.device, mesh=mesh, rules=self.rules))
      table = _on_mesh(table, mesh)
    else:
      self.rules = None
      self.device = device if device is not None else jax.devices()[0]
      self.replicated = jax.sharding.SingleDeviceSharding(self.device)
      param_shardings = self.replicated
    self.params = jax.device_put(params, param_shardings)
    self.table = table
    self.fgram_set = fgram_set
    self.tokenizer = tokenizer
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.use_table = bool(use_table)
    if model_config.position == 'learned':
      if max_len is not None and max_len > model_config.max_seq_len:
        raise ValueError(f'max_len={max_len} exceeds the {model_config.max_seq_len} learned '
                         'positions of this model.')
      self.max_len = int(max_len or model_config.max_seq_len)
    else:
      self.max_len = int(max_len or _DEFAULT_ROPE_MAX_LEN_FACTOR * self.seq_len)
    self.metadata = {}
    self.last_stats = {}
    self._row_dtype = table.row_dtype if table is not None else np.dtype(np.float32)
    self._steps = {}
    self._caches = {}
    self._eval_fn = None
    self._matcher_arrays = None

  # -- jitted pieces -------------------------------------------------------

  def _input_vectors(self, params, rows_BxLxD, ints_BxLx4):
    return input_vectors(self.model, params, rows_BxLxD, ints_BxLx4)

  def jit(self, fn, *, donate_argnums=(), cache_out: Optional[int] = None):
    """jax.jit(fn) for this Generator's placement (`jit_on_mesh` over its mesh, if any)."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums)
    return jit_on_mesh(fn, self.mesh, self.rules, donate_argnums=donate_argnums,
                       cache_out=cache_out)

  def cache_shardings(self, cache):
    """The shardings of a KV cache tree: split on heads over a mesh, else this device."""
    if self.mesh is None:
      return jax.tree.map(lambda _: self.replicated, cache)
    return cache_shardings(cache, self.mesh, self.rules)

  def _step_fn(self, greedy: bool, top_k: int, use_top_p: bool):
    key = (greedy, top_k, use_top_p)
    if key not in self._steps:
      self._steps[key] = self.jit(
          make_decode_step(self.model, greedy=greedy, top_k=top_k, use_top_p=use_top_p),
          donate_argnums=(1,), cache_out=1)
    return self._steps[key]

  def _empty_cache(self, batch: int, length: int):
    key = (batch, length)
    if key not in self._caches:
      shapes = cache_shapes(self.model, batch, length)
      self._caches[key] = jax.jit(
          lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
          out_shardings=self.cache_shardings(shapes))
    return self._caches[key]()

  # -- lookups -------------------------------------------------------------

  def lookup(self, ids) -> np.ndarray:
    """Table rows [n, d] of f-gram ids."""
    return self.table.lookup(ids)

  def _rows_for(self, fgram_ids: np.ndarray) -> np.ndarray:
    """[..., d] rows for an id array (-1 = unmatched: zeros or row 0, unused by the model).
    A table the step reads (device, host) is gathered at the array's own (bucketed) shape,
    so prompts of one width bucket share one compiled gather."""
    if self.use_table and self.table.device_rows is not None:
      ids = jnp.asarray(np.asarray(fgram_ids, np.int32).reshape(-1))
      return _gather_jit(self.table.operand, ids, host=self.table.storage == 'host'
                         ).reshape(fgram_ids.shape + (self.config.d_model,))
    rows = np.zeros(fgram_ids.shape + (self.config.d_model,), self._row_dtype)
    if self.use_table:
      matched = fgram_ids >= 0
      if matched.any():
        rows[matched] = self.table.lookup(fgram_ids[matched])
    return rows

  # -- generation ----------------------------------------------------------

  def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_tokens: Optional[Sequence[int]] = (corpus.EOS_ID,),
               add_bos: bool = True,
               tokens_per_dispatch: int = DEFAULT_TOKENS_PER_DISPATCH) -> list:
    """Continues each prompt (a batch of token id lists of any lengths).

    Greedy when temperature == 0, else sampling at that temperature from the top_k tokens
    (0 = all) within the top_p mass (1 = all), reproducible for a seed. A row stops after
    it emits one of stop_tokens (included in its output) or after max_new_tokens. Each
    prompt starts a document: BOS first (as in training), f-grams matched within it.
    Decoding runs `tokens_per_dispatch` steps per compiled call (match, gather, step and
    sampling all on the device); the tokens do not depend on it.
    """
    prompts, lens = self._check_request(prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                        add_bos, tokens_per_dispatch)
    if not prompts:
      return []
    vocab = self.config.vocab_size
    greedy = temperature == 0.0
    kind = (greedy, min(int(top_k), vocab) if not greedy else 0, (not greedy) and top_p < 1.0)
    t_start = time.perf_counter()
    sampling = jax.device_put(np.array([max(temperature, 1e-6), top_p], np.float32),
                              self.replicated)
    tok, cache, rng = self._prefill(prompts, lens, add_bos, max_new_tokens, kind, sampling,
                                    seed)
    is_stop_V = np.zeros(vocab, bool)
    is_stop_V[[int(x) for x in (stop_tokens or ()) if 0 <= int(x) < vocab]] = True
    carry = self._start_carry(prompts, lens, tok, rng, max_new_tokens, is_stop_V)
    t_decode = time.perf_counter()
    loop = self._loop_fn(int(tokens_per_dispatch), *kind)
    table, matcher = self._table_operand(), self._matcher()
    pieces, steps, dispatches = [carry['tok'][:, None]], 0, 0
    while not carry['done'].all():
      carry, cache, outs = loop(self.params, cache, table, matcher, carry, sampling, is_stop_V)
      outs, carry = jax.device_get((outs, carry))
      pieces.append(outs['tokens'][:, :int(outs['steps'])])
      steps += int(outs['steps'])
      dispatches += 1
    self.last_stats = {
        'batch': len(prompts), 'prefill_s': t_decode - t_start, 'decode_steps': steps,
        'decode_s': time.perf_counter() - t_decode, 'tokens': steps * len(prompts),
        'dispatches': dispatches, 'tokens_per_dispatch': int(tokens_per_dispatch),
    }
    out = np.concatenate(pieces, axis=1)
    return [[int(t) for t in row[:(row < 0).argmax() if (row < 0).any() else row.size]]
            for row in out]

  def _check_request(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, add_bos,
                     tokens_per_dispatch):
    """The prompts as int64 arrays and their lengths with BOS; ValueError when out of range."""
    if max_new_tokens < 1 or tokens_per_dispatch < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} and tokens_per_dispatch='
                       f'{tokens_per_dispatch} must be at least 1.')
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f'temperature={temperature} (>= 0), top_k={top_k} (>= 0), '
                       f'top_p={top_p} (in (0, 1]) out of range.')
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
    vocab = self.config.vocab_size
    for i, p in enumerate(prompts):
      if p.size and (p.min() < 0 or p.max() >= vocab):
        raise ValueError(f'prompt {i} has token ids outside [0, {vocab}).')
      if p.size + int(add_bos) == 0:
        raise ValueError(f'prompt {i} is empty and add_bos=False: nothing to condition on.')
    lens = np.array([p.size + int(add_bos) for p in prompts], np.int64)
    # Positions 0 .. needed-1: the last generated token is returned, never fed back.
    needed = int(lens.max()) + max_new_tokens - 1 if prompts else 0
    if needed > self.max_len:
      what = ('learned positions' if self.config.position == 'learned' else 'max_len')
      raise ValueError(f'a prompt of {int(lens.max())} tokens (with BOS) + {max_new_tokens} new '
                       f'tokens needs {needed} positions but this model allows '
                       f'{self.max_len} ({what}); shorten the prompt or max_new_tokens'
                       + ('' if self.config.position == 'learned' else
                          ', or load(..., max_len=N)') + '.')
    return prompts, lens

  def _prefill(self, prompts, lens, add_bos, max_new_tokens, kind, sampling, seed):
    """The prompts through the model into a fresh cache -> (first tokens, cache, rng)."""
    width = _bucket(int(lens.max()), _PREFILL_BUCKET)
    cache_len = _bucket(width + max_new_tokens - 1, _CACHE_BUCKET)
    ints = self._prefill_inputs(prompts, lens, width, add_bos)
    rows = self._rows_for(ints[..., _FID]) if self.use_table else None
    rng = jax.device_put(jax.random.PRNGKey(seed), self.replicated)
    cache = self._empty_cache(len(prompts), cache_len)
    return self._step_fn(*kind)(self.params, cache, rows, ints, rng, sampling)

  def _start_carry(self, prompts, lens, tok, rng, max_new_tokens, is_stop_V) -> dict:
    """The decode loop's state after the prompt (see make_decode_loop), on the host."""
    tok = np.asarray(tok).astype(np.int32)
    k = self.fgram_set.max_len if (self.use_table and self.fgram_set is not None) else 2
    ctx, doc_len = device_match.window(prompts, k)
    batch = len(prompts)
    return {'tok': tok, 'ctx': ctx, 'doc_len': doc_len, 'pos': lens.astype(np.int32),
            'done': is_stop_V[tok] | (max_new_tokens <= 1),
            'left': np.full(batch, max_new_tokens - 1, np.int32),
            'count': np.ones(batch, np.int32), 'honor_stop': np.ones(batch, bool), 'rng': rng}

  def _loop_fn(self, num_steps: int, greedy: bool, top_k: int, use_top_p: bool):
    key = ('loop', num_steps, greedy, top_k, use_top_p)
    if key not in self._steps:
      def sample(logits_BxV, c, sampling):
        rng, sub = jax.random.split(c['rng'])
        tok_B = _sample(logits_BxV, sub, sampling[0], sampling[1], greedy=greedy, top_k=top_k,
                        use_top_p=use_top_p)
        return tok_B, dict(c, rng=rng)
      self._steps[key] = self.jit(
          make_decode_loop(self.model, num_steps, sample, self.row_gather()),
          donate_argnums=(1,), cache_out=1)
    return self._steps[key]

  # -- the table and matcher as the compiled step reads them ---------------

  def row_gather(self):
    """gather(table operand, fid_B) -> rows for make_decode_loop; None for the baseline."""
    if not self.use_table:
      return None
    if self.table.storage in IN_STEP_STORAGES:
      return functools.partial(gather_in_step, host=self.table.storage == 'host')
    return callback_gather(self.table)

  def _table_operand(self):
    return self.table.operand if self.use_table else None

  def _matcher(self):
    """The f-gram set as device_match arrays on this Generator's device, or replicated over
    its mesh (built once)."""
    if not self.use_table:
      return None
    if self._matcher_arrays is None:
      self._matcher_arrays = jax.device_put(device_match.build(self.fgram_set),
                                            self.replicated)
    return self._matcher_arrays

  def _prefill_inputs(self, prompts, lens, width, add_bos):
    """Int inputs [B, width, 4] of the prompts, left-padded so that every row's next token
    takes the same cache slot."""
    ints = np.zeros((len(prompts), width, 4), np.int32)
    ints[..., _FID] = -1
    for b, p in enumerate(prompts):
      off = width - lens[b]
      ints[b, off:, _TOK] = np.concatenate([[BOS_ID], p]) if add_bos else p
      ints[b, off:, _POS] = np.arange(lens[b])
      ints[b, off:, _VALID] = 1
      if self.use_table and p.size:
        ints[b, width - p.size:, _FID] = self.fgram_set.match(p)[0]
    return ints

  def generate_text(self, prompts: Sequence[str], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> list:
    """Continuations (text) of text prompts; EOS stops a row."""
    if self.tokenizer is None:
      raise ValueError('this Generator has no tokenizer; use generate() with token ids.')
    ids = [self.tokenizer.encode(p) for p in prompts]
    eos = self.tokenizer.eos_id
    outs = self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, stop_tokens=(eos,))
    return [self.tokenizer.decode([t for t in o if t != eos]) for o in outs]

  # -- evaluation ----------------------------------------------------------

  def _eval_step(self):
    if self._eval_fn is None:
      def fn(params, rows_BxLxD, ints_BxLx4, segment_ids_BxL, targets_BxL, loss_mask_BxL):
        x_BxLxD = self._input_vectors(params, rows_BxLxD, ints_BxLx4)
        logits_BxLxV = self.model.apply(
            {'params': params}, x_BxLxD, positions_BxL=ints_BxLx4[..., _POS],
            segment_ids_BxL=segment_ids_BxL, method=model_lib.SconeLM.backbone)
        nll_BxL = metrics.token_nll(logits_BxLxV, targets_BxL)
        mask_BxL = loss_mask_BxL.astype(jnp.float32)
        return jnp.sum(nll_BxL * mask_BxL), jnp.sum(mask_BxL), nll_BxL * mask_BxL
      self._eval_fn = self.jit(fn)
    return self._eval_fn

  def evaluate(self, docs, *, max_batches: int = 0, split_by=None) -> dict:
    """Loss, perplexity and bits per byte of documents, packed as train.eval_documents packs
    them, with matched positions' input vectors read from the table.

    split_by: an FGramSet; adds `by_match_length` = {n: {loss, tokens}}, the loss at the
    positions whose longest f-gram of that set (as the model would see it) has length n
    (1 = no match). Baselines and SCONE runs split by one set compare at the same positions.
    """
    if self.tokenizer is None:
      raise ValueError('evaluate needs the tokenizer; load the Generator with serving.load.')
    split = packing.prepare_split(docs, self.tokenizer,
                                  self.fgram_set if self.use_table else None)
    loader = packing.Loader(split, seq_len=self.seq_len, batch_size=self.batch_size, seed=0,
                            shuffle=False, eval_mode=True)
    ref_batches = None
    if split_by is not None:
      ref = packing.prepare_split(docs, self.tokenizer, split_by)
      ref_batches = iter(packing.Loader(ref, seq_len=self.seq_len, batch_size=self.batch_size,
                                        seed=0, shuffle=False, eval_mode=True))
      by_len_nll = np.zeros(split_by.max_len + 1)
      by_len_count = np.zeros(split_by.max_len + 1)
    fn = self._eval_step()
    nll, tokens, batches, matched = 0.0, 0.0, 0, 0
    for batch in loader:
      ids_BxL = batch['fgram_ids']
      ints = np.stack([batch['inputs'], batch['positions'], ids_BxL,
                       np.ones_like(ids_BxL)], axis=-1).astype(np.int32)
      rows = self._rows_for(ids_BxL) if self.use_table else None
      matched += int(((ids_BxL >= 0) & (batch['loss_mask'] > 0)).sum())
      l, n, nll_BxL = fn(self.params, rows, ints, batch['segment_ids'], batch['targets'],
                         batch['loss_mask'])
      nll += float(l)
      tokens += float(n)
      if ref_batches is not None:
        lengths = next(ref_batches)['fgram_lengths'].reshape(-1)
        mask = batch['loss_mask'].reshape(-1) > 0
        by_len_nll += np.bincount(lengths[mask], np.asarray(nll_BxL).reshape(-1)[mask],
                                  minlength=len(by_len_nll))
        by_len_count += np.bincount(lengths[mask], minlength=len(by_len_count))
      batches += 1
      if max_batches and batches >= max_batches:
        break
    out = dict(metrics.eval_metrics(nll, tokens, batches, loader),
               fgram_match_rate=matched / max(tokens, 1.0))
    if ref_batches is not None:
      out['by_match_length'] = {
          int(k): {'loss': float(by_len_nll[k] / by_len_count[k]), 'tokens': int(by_len_count[k])}
          for k in range(1, len(by_len_count)) if by_len_count[k]}
    return out
