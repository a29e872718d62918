"""The paper's OLMo-style scale: a 1B main model with a 0.6B or 1.8B f-gram model, for TPU.

  python -m scone_jax.main --mode=compile --config=experiments/configs/olmo1b.py:0.6b
  python -m scone_jax.main --mode=compile --config=experiments/configs/olmo1b.py:1.8b

Main model as OLMo-1B: d=2048, 16 layers, 16 heads of 128, SwiGLU 8192, rope, vocab 50280,
2048-token rows (1.28B parameters with the untied embedding and head). F-gram model: the
main model's blocks, 9 of them (0.60B, with 10M f-grams) or 27 (1.81B, with 1B f-grams),
as the paper's two OLMo points. bf16 compute, float32 parameters and AdamW state, FSDP
over every chip, each block rematerialised and scanned (one block's program, compiled once).
Targets (config.compile.topology; `--mode=compile` proves the fit, README lists the
figures): 0.6b → v5e:4x4 (16 chips, 16 GiB each); 1.8b → v5p:2x2x1 (4 chips, 95 GB each).
Batch: 256 rows × 2048 tokens (0.5M tokens) per step in 16 micro-batches.
"""
from scone_jax import config

_FGRAM_MODELS = {
    # f-gram model layers, f-grams, target topology
    '0.6b': (9, 10_000_000, 'v5e:4x4'),
    '1.8b': (27, 1_000_000_000, 'v5p:2x2x1'),
}


def get_config(fgram_model='0.6b'):
  if fgram_model not in _FGRAM_MODELS:
    raise ValueError(f'olmo1b.py:{fgram_model}: choose one of {", ".join(_FGRAM_MODELS)}.')
  layers, num_fgrams, topology = _FGRAM_MODELS[fgram_model]
  c = config.default_config()
  c.tokenizer.vocab_size = 50280
  c.seq_len = 2048
  c.model.num_layers = 16
  c.model.d_model = 2048
  c.model.num_heads = 16
  c.model.head_dim = 128
  c.model.mlp_dim = 8192
  c.model.mlp_activation = 'swiglu'
  c.model.position = 'rope'
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = True
  c.model.scan_layers = True
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = num_fgrams
  c.fgrams.max_len = 5
  c.fgram_model.num_layers = layers
  c.fgram_model.num_heads = 16
  c.fgram_model.head_dim = 128
  c.fgram_model.mlp_dim = 8192
  # Packed f-gram rows come in multiples of this; it must divide over the batch shards (16
  # on v5e:4x4).
  c.fgram_model.pack_bucket = 64
  c.batch_size = 256
  c.grad_accum_steps = 16
  c.learning_rate = 4e-4
  c.warmup_steps = 2000
  c.num_train_steps = 100_000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.export.dtype = 'bfloat16'
  c.export.batch_size = 65536
  c.compile.topology = topology
  c.compile.decode_batch = 16
  c.compile.decode_len = 2048
  return c
