"""Parameters and FLOPs per token of a SCONE run: what the fair comparison reports.

Counts are matmul FLOPs (2 per multiply-add), the usual transformer accounting: per token
a dense layer with P weights costs 2P forward and 6P forward+backward; causal attention
over a row of L tokens costs, per layer, 2 * 2 * (L / 2) * heads * head_dim forward (QK^T
and AV against the average L/2 earlier positions). Norms, softmax and the embedding
gather are left out. The f-gram model is trained on every executed slot (the bucketed
packed rows × pack_len, slots no window fills included), so its training cost per token
depends on the batch: pass the measured executed positions per token. Its attention runs
over a whole packed row (masked to each window), so a slot costs attention over pack_len / 2
slots, like the main model's L / 2. At inference the f-gram model is gone: a matched
position reads a table row, 0 FLOPs.
"""
from scone_jax import model as model_lib


def _block_params(d: int, heads: int, head_dim: int, mlp_dim: int, activation: str) -> int:
  attention = 4 * d * heads * head_dim
  mlp = (3 if activation == 'swiglu' else 2) * d * mlp_dim
  return attention + mlp + 2 * d  # two RMSNorm scales


def param_counts(c: model_lib.ModelConfig) -> dict:
  """Parameters by part: token embedding, main blocks, LM head, f-gram model."""
  blocks = c.num_layers * _block_params(c.d_model, c.num_heads, c.head_dim, c.mlp_dim,
                                        c.mlp_activation) + c.d_model
  if c.position == 'learned':
    blocks += c.max_seq_len * c.d_model
  fgram = 0
  if c.fgrams_enabled:
    fgram = (c.fgram_num_layers * _block_params(c.d_model, c.fgram_num_heads, c.fgram_head_dim,
                                                c.fgram_mlp_dim, c.mlp_activation)
             + c.fgram_max_len * c.d_model + c.d_model)
  embed = c.vocab_size * c.d_model
  head = c.d_model * c.vocab_size
  return {'token_embed': embed, 'main_blocks': blocks, 'lm_head': head, 'fgram_model': fgram,
          # What sits on the accelerator while serving: the main model only.
          'main_total': embed + blocks + head, 'train_total': embed + blocks + head + fgram}


def main_forward_flops_per_token(c: model_lib.ModelConfig, seq_len: int) -> float:
  dense = c.num_layers * (4 * c.d_model * c.num_heads * c.head_dim
                          + (3 if c.mlp_activation == 'swiglu' else 2) * c.d_model * c.mlp_dim)
  attention = c.num_layers * 2 * 2 * (seq_len / 2) * c.num_heads * c.head_dim
  return 2.0 * dense + attention + 2.0 * c.d_model * c.vocab_size


def fgram_forward_flops_per_position(c: model_lib.ModelConfig, row_len: int = 0) -> float:
  """Per executed slot of rows of row_len slots (fgram_model.pack_len; 0: fgram_max_len)."""
  if not c.fgrams_enabled:
    return 0.0
  row_len = row_len or c.fgram_max_len
  dense = c.fgram_num_layers * (4 * c.d_model * c.fgram_num_heads * c.fgram_head_dim
                                + (3 if c.mlp_activation == 'swiglu' else 2)
                                * c.d_model * c.fgram_mlp_dim)
  attention = c.fgram_num_layers * 2 * 2 * (row_len / 2) * c.fgram_num_heads \
      * c.fgram_head_dim
  return 2.0 * dense + attention


def costs(c: model_lib.ModelConfig, seq_len: int, *,
          fgram_positions_per_token: float = 0.0, fgram_row_len: int = 0, num_fgrams: int = 0,
          table_bytes_per_value: int = 4) -> dict:
  """Parameters, inference and training FLOPs per token, and the table's size.

  fgram_positions_per_token: f-gram model slots executed per training token (the trainer's
  fgram_positions_per_step / tokens per step); fgram_row_len: the slots of one of its rows
  (fgram_model.pack_len; 0: fgram_max_len, rows of one padded window as before packing).
  """
  params = param_counts(c)
  inference = main_forward_flops_per_token(c, seq_len)
  fgram_train = (3.0 * fgram_forward_flops_per_position(c, fgram_row_len)
                 * fgram_positions_per_token)
  return {
      'params_main': params['main_total'],
      'params_main_non_embedding': params['main_blocks'],
      'params_fgram_model': params['fgram_model'],
      'inference_flops_per_token': inference,
      'train_flops_per_token_main': 3.0 * inference,
      'train_flops_per_token_fgram': fgram_train,
      'train_flops_per_token': 3.0 * inference + fgram_train,
      'table_rows': int(num_fgrams),
      'table_bytes': int(num_fgrams) * c.d_model * table_bytes_per_value,
  }


# Peak dense bf16 FLOP/s of one chip, by jax's device_kind (first matching prefix wins;
# H100/H200 are the SXM parts). MFU = model FLOPs per token × tokens/s ÷ (peak × chips).
# No entry for CPUs: no MFU there. config.peak_flops_per_chip overrides the table (e.g.
# with a measured peak: the H200 reached 790e12 in a bf16 matmul).
PEAK_FLOPS = (
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),   # v5e
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),        # v5p reports 'TPU v5'
    ('TPU v6 lite', 918e12),   # v6e (Trillium)
    ('TPU v6e', 918e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA H100', 989e12),
    ('NVIDIA A100', 312e12),
)


def peak_flops(device_kind: str) -> float:
  """Peak FLOP/s of one chip of this jax device_kind; 0.0 when unknown (e.g. a CPU)."""
  for prefix, value in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return value
  return 0.0
