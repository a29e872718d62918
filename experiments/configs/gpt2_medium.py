"""A GPT-2-medium-like main model with a 13-layer f-gram model, for TPU (the paper's
WikiText-103 scale: ~0.4B main model + ~0.17B f-gram model).

  python -m scone_jax.main --mode=compile --config=experiments/configs/gpt2_medium.py

Main model: d=1024, 24 layers, 16 heads of 64, GELU 4096, learned positions over 1024
tokens, vocab 50257 (0.41B parameters with the untied embedding and head). F-gram model: 13
blocks of the same width (0.16B), 10M f-grams. bf16 compute, float32 parameters and AdamW
state, FSDP over the chips, blocks rematerialised and scanned.
Target (config.compile.topology): v5e:2x2 (4 chips, 16 GiB each).
Batch: 128 rows × 1024 tokens per step in 4 micro-batches.
"""
from scone_jax import config


def get_config():
  c = config.default_config()
  c.tokenizer.vocab_size = 50257
  c.seq_len = 1024
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.mlp_dim = 4096
  c.model.mlp_activation = 'gelu'
  c.model.position = 'learned'
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = True
  c.model.scan_layers = True
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = 10_000_000
  c.fgrams.max_len = 5
  c.fgram_model.num_layers = 13
  c.fgram_model.num_heads = 16
  c.fgram_model.head_dim = 64
  c.fgram_model.mlp_dim = 4096
  c.batch_size = 128
  c.grad_accum_steps = 4
  c.learning_rate = 3e-4
  c.warmup_steps = 1000
  c.num_train_steps = 50_000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.export.dtype = 'bfloat16'
  c.export.batch_size = 65536
  c.compile.topology = 'v5e:2x2'
  c.compile.decode_batch = 16
  c.compile.decode_len = 1024
  return c
