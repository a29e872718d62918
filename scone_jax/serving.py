"""Serving: the main model with a KV cache over an export; f-gram input vectors come from the
exported table.

The f-gram model is gone at this point. `load` reads and checks an export (`export_reader`)
and returns a `Generator`: the model, its parameters, the table and the f-gram matcher placed
where --table_storage / --matcher_storage say, and the jitted pieces of the decode core
(`decode`: prefill, insert, decode_chunk) that both the CLI (`Generator.generate`,
`evaluate`) and the server (`engine.Engine`) drive. A prompt is matched on the host (the
step's own matcher arrays in numpy, `device_match.HostMatcher`: serving never builds the
f-gram set's hash table) and prefilled; then each compiled decode chunk runs up to N
steps on the device: per row it matches the longest f-gram ending at the new token
(`device_match`, its arrays on the accelerator or in host memory), reads that row of the
table, runs one KV-cached step of the main model and samples.

  gen = serving.load('runs/scone/export')            # table and matcher in host memory
  gen.generate_text(['The nation'], max_new_tokens=32)
  gen.evaluate(docs)                                 # == train.eval_documents, via the table

`load(..., mesh=sharding.serving_mesh('tensor:8'))` (`--mesh`) splits the main model over
local devices as training's rules do (heads, MLP units, vocab over `tensor`), the KV cache on
heads, and a device/host table along d (one copy in all); tokens equal one device's.

`DecodeLookup` is the host-side match and gather of one step, kept as the reference the
on-device loop is tested against and for benchmarks.
"""
import dataclasses
import logging
import time
from typing import Optional, Sequence, Union

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import corpus
from scone_jax import decode
from scone_jax import device_match
from scone_jax import export_reader
from scone_jax import fgrams as fgrams_lib
from scone_jax import metrics
from scone_jax import model as model_lib
from scone_jax import packing
from scone_jax import sharding
from scone_jax import table as table_lib
from scone_jax.table import Table

# The names serving has always offered, now defined where they belong.
STORAGES = export_reader.STORAGES
DEFAULT_STORAGE = export_reader.DEFAULT_STORAGE
IN_STEP_STORAGES = export_reader.IN_STEP_STORAGES
MATCHER_STORAGES = export_reader.MATCHER_STORAGES
MMAP_FILE = export_reader.MMAP_FILE
DEFAULT_TOKENS_PER_DISPATCH = decode.DEFAULT_TOKENS_PER_DISPATCH
BOS_ID = packing.BOS_ID
place_table = export_reader.place_table
table_sharding = export_reader.table_sharding
gather_in_step = export_reader.gather_in_step
abstract_params = export_reader.abstract_params
restore_params = export_reader.restore_params
mesh_rules = export_reader.mesh_rules
cache_shapes = decode.cache_shapes
apply_cached = decode.apply_cached
input_vectors = decode.input_vectors
_DEFAULT_ROPE_MAX_LEN_FACTOR = 8   # rope: decode up to 8 × the training seq_len by default
_TOK, _POS, _FID = decode.TOK, decode.POS, decode.FID


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


# ----------------------------------------------------------------------------- mesh placement


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


def state_shardings(state, mesh, rules):
  """Shardings of a DecodeState over a serving mesh: the cache split on heads, the rest
  (per-row scalars, windows, counts) replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rest = jax.tree.map(lambda _: replicated, state.replace(cache=None))
  return rest.replace(cache=cache_shardings(state.cache, mesh, rules))


def jit_on_mesh(fn, mesh, rules, *, donate_argnums=(), cache_out: Optional[int] = None):
  """jax.jit(fn), called (and `.lower`ed) under a serving mesh and its logical rules, so the
  model's activation constraints take effect. With `cache_out`, output `cache_out` (a KV
  cache or a DecodeState) is pinned to its mesh shardings: a donated cache comes back as it
  went in and the next call reuses the compiled program."""
  def pin(tree):
    want = (state_shardings(tree, mesh, rules) if isinstance(tree, decode.DecodeState)
            else cache_shardings(tree, mesh, rules))
    return jax.lax.with_sharding_constraint(tree, want)

  def pinned(*args):
    out = fn(*args)
    if cache_out is None:
      return out
    out = list(out)
    out[cache_out] = pin(out[cache_out])
    return tuple(out)

  return sharding.under_mesh(jax.jit(pinned, donate_argnums=donate_argnums), mesh, rules)


def decode_program(model, path: Optional[decode.FgramPath], num_steps: int,
                   flags: decode.Flags):
  """fn(params, table, matcher, state, is_stop_V, active_B) -> (outs, state), not jitted:
  rows not active retire (decode.retire), then decode.decode_chunk. The one decode program
  of Generator, Engine and --mode=compile (compile.lower_decode)."""
  chunk = decode.decode_chunk(model, path, num_steps, flags)

  def fn(params, table, matcher, state, is_stop_V, active_B):
    state, outs = chunk(params, table, matcher, decode.retire(state, ~active_B), is_stop_V)
    return outs, state
  return fn


# ----------------------------------------------------------------------------- loading


def load(export_dir: str, table_storage: str = DEFAULT_STORAGE, *, cache_rows: int = 1 << 16,
         verify: Optional[bool] = None, mmap_path: Optional[str] = None,
         max_len: Optional[int] = None, device=None, mesh=None,
         table_dtype: Optional[str] = None,
         matcher_storage: Optional[str] = None) -> 'Generator':
  """A Generator over an export directory written by `export.export`.

  table_storage: where the table lives and who reads it. Gathered by the compiled decode
  step: 'device' (accelerator memory; tables that fit there) and 'host' (host memory in a
  pinned_host memory kind, gathered by XLA host compute; on a CPU backend this is plain
  host memory). Host lookups called from the step: 'ram' (whole table in host RAM), 'mmap'
  (a raw copy of the table next to it, `table.npy`, made once and memory-mapped) or
  'tensorstore' (rows read on demand through a cache of about `cache_rows` rows: for
  tables bigger than RAM). Every storage gives the same tokens.
  matcher_storage: where the f-gram matcher's arrays live (~39 bytes per f-gram): 'device'
  (accelerator memory) or 'host' (host memory, matched by host compute inside the step);
  None: host unless table_storage is 'device'. Both give the same tokens.
  verify: check the table's sha256 (default: yes for ram/mmap; for tensorstore only the
  shape, dtype and shard file sizes unless verify=True, which reads the whole table).
  max_len: longest prompt + generation (rope models; learned positions are capped at the
  training seq_len).
  mesh: a serving mesh (`sharding.serving_mesh('tensor:N')`, `--mesh`): parameters restored
  straight into their tensor-parallel shardings, the KV cache split on heads, a device or
  host table split along d over the same devices, the matcher replicated.
  table_dtype: the table as held (default: the export's dtype): float32, float16, bfloat16,
  or int8 with a float32 scale per row (rows dequantized in the gather).
  """
  t0 = time.time()
  matcher_storage = export_reader.default_matcher_storage(table_storage, matcher_storage)
  ex = export_reader.read(export_dir, table_storage, cache_rows=cache_rows, verify=verify,
                          mmap_path=mmap_path, device=device, mesh=mesh,
                          table_dtype=table_dtype)
  gen = Generator(ex.model_config, ex.params, ex.table, ex.fgram_set, ex.tokenizer,
                  seq_len=ex.model_json['seq_len'], batch_size=ex.model_json['batch_size'],
                  max_len=max_len, device=device, mesh=mesh, matcher_storage=matcher_storage)
  gen.metadata = ex.meta
  used = gen.fgram_path_bytes()
  logging.info('loaded export %s (step %d, %d f-grams, d=%d, %s table held as %s, %.1f MB, in '
               '%s; matcher in %s%s) in %.1fs; f-gram path: %.1f MB accelerator, %.1f MB host',
               export_dir, ex.meta['step'], ex.table.num_rows, ex.table.dim,
               ex.meta['layout']['dtype'], table_dtype or ex.meta['layout']['dtype'],
               ex.table.nbytes / 1e6, table_storage, matcher_storage,
               f', mesh {dict(mesh.shape)}' if mesh is not None else '', time.time() - t0,
               used['accelerator'] / 1e6, used['host'] / 1e6)
  return gen


# ----------------------------------------------------------------------------- the generator


class Generator:
  """The main model (no f-gram model) under jit with a KV cache, plus the f-gram path: the
  driver of the decode core for the CLI (generate, evaluate) and the owner of the jitted
  pieces `engine.Engine` drives.

  Attributes: config (ModelConfig, fgrams disabled), params (token_embed, decoder, lm_head),
  table (Table), fgram_set, tokenizer, seq_len, batch_size (eval), max_len, matcher_storage,
  matcher (the step's placed matcher arrays), host_matcher (the same arrays in numpy: prompt
  and eval matching; the set's hash table is never built), path (decode.FgramPath; None
  without the table), last_stats (timing of the latest generate call).
  use_table=False turns the lookups off (every position gets T[token]): the baseline cost of
  the same main model, for benchmarks.
  mesh: a serving mesh (`sharding.serving_mesh('tensor:N')`): tensor parallelism as in
  training, the KV cache split on heads, a device or host table split along d (a table
  given on one device is moved there), the matcher replicated; every compiled step traces
  under the mesh and its rules. None: one device.
  """

  def __init__(self, model_config: model_lib.ModelConfig, params, table: Optional[Table],
               fgram_set: Optional[fgrams_lib.FGramSet], tokenizer=None, *, seq_len: int,
               batch_size: int = 16, max_len: Optional[int] = None, device=None,
               use_table: bool = True, mesh=None, matcher_storage: Optional[str] = None):
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
    self._place(params, table, device)
    self.fgram_set = fgram_set
    self.tokenizer = tokenizer
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.use_table = bool(use_table)
    self.max_len = self._max_len(max_len)
    self.matcher_storage = export_reader.default_matcher_storage(
        table.storage if table is not None else 'host', matcher_storage)
    self.path = None
    if use_table:
      callback = (None if self.table.storage in IN_STEP_STORAGES
                  else export_reader.callback_gather(self.table))
      self.path = export_reader.fgram_path(self.table.storage, self.matcher_storage, callback)
    self.k = fgram_set.max_len if use_table else 2
    self.matcher = self.host_matcher = None
    if use_table:
      arrays = device_match.build(fgram_set)
      # Prompts and eval documents are matched on the host with the step's own arrays, never
      # with the set's hash table (~170 B per f-gram on top of these ~39).
      self.host_matcher = device_match.HostMatcher(arrays, fgram_set)
      self.matcher = export_reader.place_matcher(arrays, self.matcher_storage, self.device,
                                                 mesh)
    self.metadata = {}
    self.last_stats = {}
    self._row_dtype = table.row_dtype if table is not None else np.dtype(np.float32)
    self._fns = {}

  def _place(self, params, table, device):
    """Parameters (and a device/host table over a mesh) where the compiled steps read them."""
    if self.mesh is not None:
      self.rules = mesh_rules(self.config, self.mesh)
      self.device = self.mesh.devices.flat[0]
      self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      param_shardings = jax.tree.map(lambda s: s.sharding, abstract_params(
          self.model, self.device, mesh=self.mesh, rules=self.rules))
      table = export_reader.table_on_mesh(table, self.mesh)
    else:
      self.rules = None
      self.device = device if device is not None else jax.devices()[0]
      self.replicated = jax.sharding.SingleDeviceSharding(self.device)
      param_shardings = self.replicated
    self.params = jax.device_put(params, param_shardings)
    self.table = table

  def _max_len(self, max_len: Optional[int]) -> int:
    if self.config.position == 'learned':
      if max_len is not None and max_len > self.config.max_seq_len:
        raise ValueError(f'max_len={max_len} exceeds the {self.config.max_seq_len} learned '
                         'positions of this model.')
      return int(max_len or self.config.max_seq_len)
    return int(max_len or _DEFAULT_ROPE_MAX_LEN_FACTOR * self.seq_len)

  # -- what the drivers read -----------------------------------------------

  @property
  def table_operand(self):
    """The table as the compiled step takes it (None for the baseline)."""
    return self.table.operand if self.use_table else None

  def fgram_path_bytes(self) -> dict:
    """{'accelerator', 'host'}: bytes of the table and matcher as placed."""
    return export_reader.fgram_path_bytes(self.table if self.use_table else None,
                                          self.matcher, self.matcher_storage)

  def check(self, prompt_ids, max_tokens: int, add_bos: bool = True) -> Optional[str]:
    """Why a prompt cannot be decoded here (None if it can): decode.check_prompt."""
    learned = self.config.position == 'learned'
    return decode.check_prompt(prompt_ids, max_tokens, add_bos, self.config.vocab_size,
                               self.max_len, ' (learned positions)' if learned else '',
                               '' if learned else ', or load(..., max_len=N)')

  def prompt_batch(self, ids: Sequence[np.ndarray], add_bos: Sequence[bool],
                   max_new: Sequence[int], width: int) -> decode.Prompts:
    """decode.Prompts of token id arrays, matched on the host by the step's matcher arrays."""
    match = self.host_matcher.match_ids if self.use_table else None
    return decode.make_prompts(ids, add_bos, max_new, width, self.k, match)

  def lookup(self, ids) -> np.ndarray:
    """Table rows [n, d] of f-gram ids."""
    return self.table.lookup(ids)

  def rows_for(self, fgram_ids: np.ndarray):
    """[..., d] rows for an id array (-1 = unmatched: zeros or row 0, unused by the model),
    gathered at the array's own (bucketed) shape."""
    if not self.use_table:
      return None
    if self.table.device_rows is not None:
      ids = jnp.asarray(np.asarray(fgram_ids, np.int32).reshape(-1))
      return export_reader.gather_jit(self.table.operand, ids, host=self.table.storage == 'host'
                                      ).reshape(fgram_ids.shape + (self.config.d_model,))
    rows = np.zeros(fgram_ids.shape + (self.config.d_model,), self._row_dtype)
    matched = fgram_ids >= 0
    if matched.any():
      rows[matched] = self.table.lookup(fgram_ids[matched])
    return rows

  def input_vectors(self, params, rows_BxLxD, ints_BxLx4):
    return decode.input_vectors(self.model, params, rows_BxLxD, ints_BxLx4)

  # -- the jitted core -----------------------------------------------------

  def jit(self, fn, *, donate_argnums=(), cache_out: Optional[int] = None):
    """jax.jit(fn) for this Generator's placement (`jit_on_mesh` over its mesh, if any)."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums)
    return jit_on_mesh(fn, self.mesh, self.rules, donate_argnums=donate_argnums,
                       cache_out=cache_out)

  def _memo(self, key, make):
    if key not in self._fns:
      self._fns[key] = make()
    return self._fns[key]

  def new_state(self, batch: int, cache_len: int) -> decode.DecodeState:
    """An empty DecodeState (every row free) placed as the decode chunk reads it."""
    fn = self._memo(('empty', batch, cache_len), lambda: self.jit(
        lambda: (decode.empty_state(self.model, batch, cache_len, self.k),), cache_out=0))
    return fn()[0]

  def prefill_fn(self, cache_len: int, flags: decode.Flags):
    """jitted fn(params, table, matcher, prompts, options, is_stop_V) -> (state, outs):
    decode.prefill into a fresh DecodeState of the prompts' rows."""
    def fn(params, table, matcher, batch, opts, is_stop_V):
      state, out = decode.prefill(self.model, self.path, params, table, batch, opts, is_stop_V,
                                  cache_len=cache_len, flags=flags)
      return out, state
    return self._memo(('prefill', cache_len, flags.logprobs),
                      lambda: self.jit(fn, cache_out=1))

  def prefill_insert_fn(self, cache_len: int, flags: decode.Flags):
    """jitted fn(params, table, matcher, state, prompts, options, is_stop_V, slots_N) ->
    (outs, state): decode.prefill then decode.insert at slots_N (state donated)."""
    def fn(params, table, matcher, state, batch, opts, is_stop_V, slots_N):
      rows, out = decode.prefill(self.model, self.path, params, table, batch, opts, is_stop_V,
                                 cache_len=cache_len, flags=flags)
      return out, decode.insert(self.model, state, rows, slots_N)
    return self._memo(('prefill_insert', cache_len, flags.logprobs),
                      lambda: self.jit(fn, donate_argnums=(3,), cache_out=1))

  def decode_fn(self, num_steps: int, flags: decode.Flags):
    """jitted `decode_program` (state donated): what the CLI and the server decode with."""
    return self._memo(('decode', num_steps, flags), lambda: self.jit(
        decode_program(self.model, self.path, num_steps, flags), donate_argnums=(3,),
        cache_out=1))

  def stop_mask(self, stop_tokens) -> np.ndarray:
    """bool [V]: the tokens that end a row."""
    is_stop_V = np.zeros(self.config.vocab_size, bool)
    is_stop_V[[int(x) for x in (stop_tokens or ()) if 0 <= int(x) < self.config.vocab_size]] = 1
    return is_stop_V

  # -- generation ----------------------------------------------------------

  def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: Union[int, Sequence[int]] = 0,
               stop_tokens: Optional[Sequence[int]] = (corpus.EOS_ID,),
               add_bos: bool = True,
               tokens_per_dispatch: int = DEFAULT_TOKENS_PER_DISPATCH,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: Optional[dict] = None) -> list:
    """Continues each prompt (a batch of token id lists of any lengths).

    Greedy when temperature == 0, else sampling at that temperature from the top_k tokens
    (0 = all) within the top_p mass (1 = all); token i of prompt b is drawn with the key
    (seed_b, i) (seed: one for all prompts or one each), so a prompt samples the same
    tokens alone, batched or from the server. Penalties and logit_bias ({token id: bias})
    as in OpenAI's API. A row stops after it emits one of stop_tokens (included in its
    output) or after max_new_tokens. Each prompt starts a document: BOS first (as in
    training), f-grams matched within it. Decoding runs `tokens_per_dispatch` steps per
    compiled call; the tokens do not depend on it.
    """
    if max_new_tokens < 1 or tokens_per_dispatch < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} and tokens_per_dispatch='
                       f'{tokens_per_dispatch} must be at least 1.')
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f'temperature={temperature} (>= 0), top_k={top_k} (>= 0), '
                       f'top_p={top_p} (in (0, 1]) out of range.')
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
    for i, p in enumerate(prompts):
      problem = self.check(p, max_new_tokens, add_bos)
      if problem:
        raise ValueError(f'prompt {i}: {problem}')
    if not prompts:
      return []
    n, t_start = len(prompts), time.perf_counter()
    width = decode.bucket(max(p.size for p in prompts) + int(add_bos), decode.PREFILL_BUCKET)
    cache_len = decode.bucket(width + max_new_tokens - 1, decode.CACHE_BUCKET)
    batch = self.prompt_batch(prompts, [add_bos] * n, [max_new_tokens] * n, width)
    opts = decode.make_options(
        n, self.config.vocab_size, seed=seed, temperature=temperature, top_p=top_p,
        top_k=top_k, presence=presence_penalty, frequency=frequency_penalty,
        logit_bias=[logit_bias] * n if logit_bias else None)
    flags = decode.Flags(sample=temperature > 0,
                         adjust=bool(presence_penalty or frequency_penalty or logit_bias))
    is_stop_V = self.stop_mask(stop_tokens)
    args = (self.params, self.table_operand, self.matcher)
    out, state = self.prefill_fn(cache_len, flags)(*args, batch, opts, is_stop_V)
    pieces, done = [np.asarray(out['token'])[:, None]], np.asarray(state.done)
    t_decode, steps, dispatches = time.perf_counter(), 0, 0
    chunk, active = self.decode_fn(int(tokens_per_dispatch), flags), np.ones(n, bool)
    while not done.all():
      outs, state = chunk(*args, state, is_stop_V, active)
      toks, ran, done = jax.device_get((outs['tokens'], outs['steps'], state.done))
      pieces.append(toks[:, :int(ran)])
      steps, dispatches = steps + int(ran), dispatches + 1
    self.last_stats = {
        'batch': n, 'prefill_s': t_decode - t_start, 'decode_steps': steps,
        'decode_s': time.perf_counter() - t_decode, 'tokens': steps * n,
        'dispatches': dispatches, 'tokens_per_dispatch': int(tokens_per_dispatch)}
    out = np.concatenate(pieces, axis=1)
    return [[int(t) for t in row[:(row < 0).argmax() if (row < 0).any() else row.size]]
            for row in out]

  def generate_text(self, prompts: Sequence[str], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0, **kw) -> list:
    """Continuations (text) of text prompts; EOS stops a row. kw: more generate options."""
    if self.tokenizer is None:
      raise ValueError('this Generator has no tokenizer; use generate() with token ids.')
    ids = [self.tokenizer.encode(p) for p in prompts]
    eos = self.tokenizer.eos_id
    outs = self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, stop_tokens=(eos,), **kw)
    return [self.tokenizer.decode([t for t in o if t != eos]) for o in outs]

  # -- evaluation ----------------------------------------------------------

  def _eval_step(self):
    def fn(params, rows_BxLxD, ints_BxLx4, segment_ids_BxL, targets_BxL, loss_mask_BxL):
      x_BxLxD = self.input_vectors(params, rows_BxLxD, ints_BxLx4)
      logits_BxLxV = self.model.apply(
          {'params': params}, x_BxLxD, positions_BxL=ints_BxLx4[..., _POS],
          segment_ids_BxL=segment_ids_BxL, method=model_lib.SconeLM.backbone)
      nll_BxL = metrics.token_nll(logits_BxLxV, targets_BxL)
      mask_BxL = loss_mask_BxL.astype(jnp.float32)
      return jnp.sum(nll_BxL * mask_BxL), jnp.sum(mask_BxL), nll_BxL * mask_BxL
    return self._memo('eval', lambda: self.jit(fn))

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
                                  self.host_matcher if self.use_table else None)
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
      rows = self.rows_for(ids_BxL)
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
