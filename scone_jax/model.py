"""Flax model: the main decoder-only LM, the f-gram model A_fgram, and SCONE's input embedding.

Parameter tree (top level names are an API shared with train/export/serving):
  token_embed  T [vocab, d], the input embedding; also read by A_fgram.
  decoder      the main decoder blocks, final norm, learned positions (if any).
  lm_head      [d, vocab], untied from T.
  fgram_model  everything of A_fgram (K position embeddings, blocks, final norm); absent in the
               baseline. Serving drops it: `embed_inputs` without f-grams and `backbone` never
               touch it.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and key
activations carry `nn.with_logical_constraint`; `sharding.py` maps the names onto the mesh.
"""
import dataclasses
import functools
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp

# Finite instead of -inf so a fully masked row (padding queries) gives a uniform softmax,
# not NaN; exp(_NEG_INF - max) is exactly 0 next to any unmasked logit.
_NEG_INF = float(jnp.finfo(jnp.float32).min)
_NORM_EPS = 1e-6
_ROPE_MAX_WAVELENGTH = 10_000.0
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters (hashable, so a Flax module attribute)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = 'gelu'   # 'gelu' | 'swiglu'
  position: str = 'rope'         # 'rope' | 'learned'
  max_seq_len: int = 128         # rows of the learned position table
  dropout_rate: float = 0.0
  dtype: str = 'bfloat16'        # compute dtype
  param_dtype: str = 'float32'
  fgrams_enabled: bool = False
  fgram_max_len: int = 5         # K: f-gram windows and A_fgram's position table
  fgram_num_layers: int = 2
  fgram_num_heads: int = 4
  fgram_head_dim: int = 64
  fgram_mlp_dim: int = 1024
  remat: bool = False            # rematerialise each block in the backward pass
  scan_layers: bool = False      # nn.scan over blocks (params get a leading 'layers' axis)
  attention: str = 'auto'        # 'auto' | 'xla' | 'cudnn' | 'einsum' (see `attend`)

  def __post_init__(self):
    if self.mlp_activation not in ('gelu', 'swiglu'):
      raise ValueError(f'model.mlp_activation={self.mlp_activation!r}; use gelu or swiglu.')
    if self.position not in ('rope', 'learned'):
      raise ValueError(f'model.position={self.position!r}; use rope or learned.')
    if self.position == 'rope' and self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even for rope positions.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f'model.{name}={getattr(self, name)!r}; use float32, bfloat16 or '
                         'float16.')
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'model.attention={self.attention!r}; use '
                       f'{", ".join(ATTENTION_IMPLEMENTATIONS)}.')
    if self.fgrams_enabled and self.fgram_max_len < 1:
      raise ValueError(f'fgrams.max_len={self.fgram_max_len} must be positive.')

  @classmethod
  def from_config(cls, cfg, vocab_size: int) -> 'ModelConfig':
    """From the run config (cfg.model, cfg.fgram_model, cfg.fgrams, cfg.seq_len)."""
    m, f = cfg.model, cfg.fgram_model
    return cls(
        vocab_size=int(vocab_size), num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim,
        mlp_activation=m.mlp_activation, position=m.position, max_seq_len=cfg.seq_len,
        dropout_rate=float(m.dropout_rate), dtype=m.dtype, param_dtype=m.param_dtype,
        fgrams_enabled=bool(cfg.fgrams.enabled), fgram_max_len=cfg.fgrams.max_len,
        fgram_num_layers=f.num_layers, fgram_num_heads=f.num_heads, fgram_head_dim=f.head_dim,
        fgram_mlp_dim=f.mlp_dim, remat=bool(m.remat), scan_layers=bool(m.scan_layers),
        attention=m.attention)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """What one decoder block needs; the main model and A_fgram differ only in these."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str
  use_rope: bool
  dropout_rate: float
  dtype: Any
  param_dtype: Any
  batch_axis: str = 'batch'      # logical names of the activations' leading axes
  length_axis: str = 'length'
  attention: str = 'auto'


def _dense_init(names, in_axis=-2, out_axis=-1):
  return nn.with_logical_partitioning(
      nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis), names)


class Projection(nn.Module):
  """y = einsum(equation, x, W) with W of a given multi-axis shape, created unflattened.

  (nn.DenseGeneral creates its kernel flat and reshapes it, which breaks logical partitioning
  of kernels with more than two axes.)
  """
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple
  in_axis: Any
  out_axis: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _dense_init(self.kernel_axes, self.in_axis, self.out_axis),
                        self.kernel_shape, self.param_dtype)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
  """RMS normalisation with statistics in float32, output in the compute dtype."""
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _NORM_EPS)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x_BxLxHxK, positions_BxL):
  """Rotary position embedding (half-split form), computed in float32."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_H = _ROPE_MAX_WAVELENGTH ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xH = (positions_BxL.astype(jnp.float32)[..., None] * freq_H)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xH), jnp.cos(angle_BxLx1xH)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def attention_implementation(name: str, dtype, head_dim: int, length: int = 0) -> str:
  """'auto' -> 'cudnn' on a GPU where cuDNN's fused attention takes the shapes, else 'xla'.

  length: the rows' query/key length where known. jax's cuDNN path turns the mask into a
  bias, and cuDNN trains with a bias only over even lengths (jax raises otherwise), so an
  odd length (e.g. fgram_model.pack_len=5) falls back to 'xla'.
  """
  if name != 'auto':
    return name
  fused = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0)
  return 'cudnn' if fused else 'xla'


def attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS, *, implementation: str, dtype):
  """Causal attention within mask_Bx1xLxS (True = may attend; causality is added here).

  'einsum': explicit logits, mask and softmax in float32; 'xla' / 'cudnn':
  `jax.nn.dot_product_attention` with is_causal (cuDNN's fused kernel takes the causal
  mask natively and the segment / valid-key mask as a bias).
  """
  head_dim = q_BxLxHxK.shape[-1]
  if implementation == 'einsum':
    length, slots = q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]
    causal_LxS = jnp.tril(jnp.ones((length, slots), jnp.bool_))
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(head_dim ** -0.5, q_BxLxHxK.dtype)
    logits_BxHxLxS = jnp.einsum('blhk,bshk->bhls', q_BxLxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32)
    logits_BxHxLxS = jnp.where(mask_Bx1xLxS & causal_LxS, logits_BxHxLxS, _NEG_INF)
    probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(dtype)
    return jnp.einsum('bhls,bshk->blhk', probs_BxHxLxS, v_BxSxHxK.astype(dtype))
  return jax.nn.dot_product_attention(
      q_BxLxHxK.astype(dtype), k_BxSxHxK.astype(dtype), v_BxSxHxK.astype(dtype),
      mask=jnp.broadcast_to(mask_Bx1xLxS, (q_BxLxHxK.shape[0], 1) + mask_Bx1xLxS.shape[2:]),
      is_causal=True, scale=head_dim ** -0.5, implementation=implementation)


class Attention(nn.Module):
  """Multi-head self-attention with an optional flax-style KV cache ('cache' collection).

  mask_Bx1xLxL says which keys each query may see besides causality (same segment, valid
  key); causality is applied in `attend`. A filled decode cache builds its own full mask
  and attends with the einsum path (keys of other slots, not a square causal block).
  """
  cfg: BlockConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, valid_BxL, decode):
    c = self.cfg
    act = (c.batch_axis, c.length_axis, 'heads', 'kv')
    proj = functools.partial(Projection, 'bld,dhk->blhk',
                             (x_BxLxD.shape[-1], c.num_heads, c.head_dim),
                             ('embed', 'heads', 'kv'), 0, (1, 2), c.dtype, c.param_dtype)
    q_BxLxHxK = nn.with_logical_constraint(proj(name='query')(x_BxLxD), act)
    k_BxLxHxK = nn.with_logical_constraint(proj(name='key')(x_BxLxD), act)
    v_BxLxHxK = nn.with_logical_constraint(proj(name='value')(x_BxLxD), act)
    if c.use_rope:
      q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL)
      k_BxLxHxK = apply_rope(k_BxLxHxK, positions_BxL)

    from_cache = decode and self.has_variable('cache', 'cached_key')
    mask = mask_Bx1xLxL
    if decode:
      # Keys are cached after rope, so a cached entry never needs its position again.
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_BxLxHxK.shape,
                                 k_BxLxHxK.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_BxLxHxK.shape,
                                   v_BxLxHxK.dtype)
      cached_valid = self.variable('cache', 'cached_valid', jnp.zeros, valid_BxL.shape,
                                   jnp.bool_)
      # One index per row: rows of a batch may join a decode at different times (a server's
      # slots), each with its own fill level.
      cache_index = self.variable('cache', 'cache_index', jnp.zeros, valid_BxL.shape[:1],
                                  jnp.int32)
      if initialized:
        # Write each row's T new entries at its own index, then attend to every valid cached
        # entry at or before each query's slot.
        num_slots, num_new = cached_key.value.shape[1], x_BxLxD.shape[1]
        if num_new > num_slots:
          raise ValueError(f'decoding {num_new} tokens at once but the cache holds '
                           f'{num_slots}; init the cache with a longer input.')
        index_B = cache_index.value
        write = jax.vmap(lambda cache, new, i: jax.lax.dynamic_update_slice_in_dim(
            cache, new.astype(cache.dtype), i, axis=0))
        k_BxSxHxK = write(cached_key.value, k_BxLxHxK, index_B)
        v_BxSxHxK = write(cached_value.value, v_BxLxHxK, index_B)
        valid_BxS = write(cached_valid.value, valid_BxL, index_B)
        cached_key.value, cached_value.value = k_BxSxHxK, v_BxSxHxK
        cached_valid.value = valid_BxS
        cache_index.value = index_B + num_new
        query_slot_BxL = index_B[:, None] + jnp.arange(num_new)
        causal_BxLxS = jnp.arange(num_slots)[None, None, :] <= query_slot_BxL[:, :, None]
        mask = causal_BxLxS[:, None] & valid_BxS[:, None, None, :]
        k_BxLxHxK, v_BxLxHxK = k_BxSxHxK, v_BxSxHxK

    if from_cache:
      q_BxLxHxK = q_BxLxHxK * jnp.asarray(c.head_dim ** -0.5, q_BxLxHxK.dtype)
      logits_BxHxLxS = jnp.einsum('blhk,bshk->bhls', q_BxLxHxK, k_BxLxHxK,
                                  preferred_element_type=jnp.float32)
      logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, _NEG_INF)
      probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(c.dtype)
      out_BxLxHxK = jnp.einsum('bhls,bshk->blhk', probs_BxHxLxS, v_BxLxHxK.astype(c.dtype))
    else:
      out_BxLxHxK = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask, dtype=c.dtype,
                           implementation=attention_implementation(
                               c.attention, c.dtype, c.head_dim,
                               # cuDNN needs both lengths even: pass an odd one if any.
                               q_BxLxHxK.shape[1] if q_BxLxHxK.shape[1] % 2
                               else k_BxLxHxK.shape[1]))
    out_BxLxHxK = nn.with_logical_constraint(out_BxLxHxK, act)
    return Projection('blhk,hkd->bld', (c.num_heads, c.head_dim, x_BxLxD.shape[-1]),
                      ('heads', 'kv', 'embed'), (0, 1), 2, c.dtype, c.param_dtype,
                      name='out')(out_BxLxHxK)


class Mlp(nn.Module):
  """Feed-forward: gelu (wi → gelu → wo) or swiglu (silu(wi_gate) · wi_up → wo)."""
  cfg: BlockConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
    hidden_axes = (c.batch_axis, c.length_axis, 'mlp')
    if c.mlp_activation == 'swiglu':
      gate = dense(c.mlp_dim, kernel_init=_dense_init(('embed', 'mlp')), name='wi_gate')(x_BxLxD)
      up = dense(c.mlp_dim, kernel_init=_dense_init(('embed', 'mlp')), name='wi_up')(x_BxLxD)
      h_BxLxM = nn.silu(gate) * up
    else:
      h_BxLxM = nn.gelu(dense(c.mlp_dim, kernel_init=_dense_init(('embed', 'mlp')),
                              name='wi')(x_BxLxD))
    h_BxLxM = nn.with_logical_constraint(h_BxLxM, hidden_axes)
    return dense(x_BxLxD.shape[-1], kernel_init=_dense_init(('mlp', 'embed')), name='wo')(h_BxLxM)


class DecoderBlock(nn.Module):
  """Pre-norm transformer block; the main model and A_fgram are both stacks of these."""
  cfg: BlockConfig
  scanned: bool = False  # under nn.scan: return (carry, None)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, valid_BxL, deterministic, decode):
    c = self.cfg
    h = RMSNorm(c.dtype, c.param_dtype, name='attn_norm')(x_BxLxD)
    h = Attention(c, name='attention')(h, positions_BxL, mask_Bx1xLxL, valid_BxL, decode)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = RMSNorm(c.dtype, c.param_dtype, name='mlp_norm')(x_BxLxD)
    h = Mlp(c, name='mlp')(h)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, (c.batch_axis, c.length_axis, 'embed'))
    return (x_BxLxD, None) if self.scanned else x_BxLxD


def _run_blocks(block_cfg: BlockConfig, num_layers: int, *, scan: bool, remat: bool,
                x_BxLxD, positions_BxL, mask_Bx1xLxL, valid_BxL, deterministic, decode):
  """Applies `num_layers` blocks inside the calling module's compact scope.

  Unscanned blocks are named layers_0..N-1; scanned ones share the name `layers` and their
  parameters (and cache) get a leading axis of size N, logical name 'layers'.
  """
  block_cls = DecoderBlock
  if remat:
    # self=0, x=1, positions=2, mask=3, valid=4: deterministic and decode stay Python bools.
    block_cls = nn.remat(block_cls, prevent_cse=not scan, static_argnums=(5, 6))
  args = (positions_BxL, mask_Bx1xLxL, valid_BxL, deterministic, decode)
  if scan:
    stack = nn.scan(block_cls, variable_axes={'params': 0, 'cache': 0},
                    split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BxLxD, _ = stack(block_cfg, scanned=True, name='layers')(x_BxLxD, *args)
    return x_BxLxD
  for i in range(num_layers):
    x_BxLxD = block_cls(block_cfg, name=f'layers_{i}')(x_BxLxD, *args)
  return x_BxLxD


def _dtype(name):
  return jnp.dtype(name)


class Decoder(nn.Module):
  """The main model's blocks, optional learned positions and the final norm."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, valid_BxL, deterministic, decode):
    c = self.config
    dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
    block_cfg = BlockConfig(c.num_heads, c.head_dim, c.mlp_dim, c.mlp_activation,
                            c.position == 'rope', c.dropout_rate, dtype, param_dtype,
                            attention=c.attention)
    x_BxLxD = x_BxLxD.astype(dtype)
    if c.position == 'learned':
      pos_embed = nn.Embed(c.max_seq_len, c.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ('length', 'embed')),
                           name='pos_embed')
      x_BxLxD = x_BxLxD + pos_embed(positions_BxL)
    x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))
    # Same segment (0 = padding attends only to padding, so no row is empty) and only valid
    # keys; Attention adds causality. Under decode with a filled cache it builds its own mask.
    seg_BxL = segment_ids_BxL
    same_segment_Bx1xLxL = seg_BxL[:, None, :, None] == seg_BxL[:, None, None, :]
    mask_Bx1xLxL = same_segment_Bx1xLxL & valid_BxL[:, None, None, :]
    x_BxLxD = _run_blocks(block_cfg, c.num_layers, scan=c.scan_layers, remat=c.remat,
                          x_BxLxD=x_BxLxD, positions_BxL=positions_BxL,
                          mask_Bx1xLxL=mask_Bx1xLxL, valid_BxL=valid_BxL,
                          deterministic=deterministic, decode=decode)
    return RMSNorm(dtype, param_dtype, name='final_norm')(x_BxLxD)


class FGramModel(nn.Module):
  """A_fgram: causal blocks of width d over f-gram windows packed into rows, K learned positions.

  A row of P slots holds several windows back to back; positions_RxP restart at 0 at each
  window's first token, so a window is the run of slots from a 0 to the next 0. Attention is
  causal within a window only (block-diagonal), so a window's outputs are those it would
  get alone in a row of K slots. Slots no window uses hold position 0 (one-slot windows of
  their own, never read).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_RxPxD, positions_RxP, select_N, deterministic):
    """Normalised outputs at the flat slots select_N (row * P + slot), shape select_N + [d]."""
    c = self.config
    dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
    block_cfg = BlockConfig(c.fgram_num_heads, c.fgram_head_dim, c.fgram_mlp_dim,
                            c.mlp_activation, False, c.dropout_rate, dtype, param_dtype,
                            batch_axis='fgram_batch', length_axis='fgram_len',
                            attention=c.attention)
    pos_embed = nn.Embed(c.fgram_max_len, c.d_model, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ('fgram_len', 'embed')),
                         name='pos_embed')
    x_RxPxD = x_RxPxD.astype(dtype) + pos_embed(positions_RxP)
    x_RxPxD = nn.Dropout(c.dropout_rate)(x_RxPxD, deterministic=deterministic)
    x_RxPxD = nn.with_logical_constraint(x_RxPxD, ('fgram_batch', 'fgram_len', 'embed'))
    num_rows, num_slots = positions_RxP.shape
    # The windows as segment ids: block-diagonal; Attention adds causality.
    segments_RxP = jnp.cumsum(positions_RxP == 0, axis=1)
    mask_Rx1xPxP = segments_RxP[:, None, :, None] == segments_RxP[:, None, None, :]
    x_RxPxD = _run_blocks(block_cfg, c.fgram_num_layers, scan=c.scan_layers, remat=c.remat,
                          x_BxLxD=x_RxPxD, positions_BxL=positions_RxP,
                          mask_Bx1xLxL=mask_Rx1xPxP,
                          valid_BxL=jnp.ones((num_rows, num_slots), jnp.bool_),
                          deterministic=deterministic, decode=False)
    x_SxD = x_RxPxD.reshape(num_rows * num_slots, -1)
    # The norm is per position, so normalising only the selected slots is the same and cheaper.
    # Gathered in float32 (the norm's own precision): the backward pass adds every position's
    # gradient into its window's row, and a float32 scatter-add neither rounds each addition
    # to bf16 nor runs as a compare-and-swap loop on a GPU. An index past the last slot (an
    # unmatched position) reads zeros and its gradient is dropped, not added to a real row.
    x_NxD = jnp.take(x_SxD.astype(jnp.float32), select_N, axis=0, mode='fill', fill_value=0)
    return RMSNorm(dtype, param_dtype, name='final_norm')(x_NxD)


class SconeLM(nn.Module):
  """Main LM whose input embedding of matched positions comes from A_fgram (SCONE)."""
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
    self.token_embed = nn.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                                embedding_init=nn.with_logical_partitioning(
                                    nn.initializers.normal(1.0), ('vocab', 'embed')))
    self.decoder = Decoder(c)
    self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                            kernel_init=_dense_init(('embed', 'vocab')))
    if c.fgrams_enabled:
      self.fgram_model = FGramModel(c)

  def __call__(self, inputs_BxL, *, positions_BxL=None, segment_ids_BxL=None,
               fgram_index_BxL=None, fgram_tokens_RxP=None, fgram_positions_RxP=None,
               deterministic=True, decode=False):
    """Token ids [B, L] → float32 logits [B, L, vocab]."""
    x_BxLxD = self.embed_inputs(inputs_BxL, fgram_index_BxL, fgram_tokens_RxP,
                                fgram_positions_RxP, deterministic=deterministic)
    return self.backbone(x_BxLxD, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                         deterministic=deterministic, decode=decode)

  def embed_inputs(self, inputs_BxL, fgram_index_BxL=None, fgram_tokens_RxP=None,
                   fgram_positions_RxP=None, *, deterministic=True):
    """Input vectors: A_fgram(T[window]) where fgram_index >= 0, else T[token].

    The windows come packed (`FGramModel`): fgram_tokens_RxP and fgram_positions_RxP, and
    fgram_index_BxL is the flat slot (row * P + slot) of the last token of the position's
    window, -1 where nothing matched.
    """
    c = self.config
    x_BxLxD = self._embed(inputs_BxL)
    if c.fgrams_enabled and self.is_initializing() and fgram_index_BxL is None:
      # Create A_fgram's parameters even when init is given no f-gram inputs.
      self.fgram_embed(jnp.zeros((1, c.fgram_max_len), jnp.int32), jnp.ones((1,), jnp.int32))
    if fgram_index_BxL is None:
      return nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))
    if not c.fgrams_enabled:
      raise ValueError('fgram_index_BxL was given to a model built with fgrams_enabled=False; '
                       'build it from a config with fgrams.enabled=True or drop the f-gram '
                       'inputs.')
    if fgram_tokens_RxP is None or fgram_positions_RxP is None:
      raise ValueError('fgram_index_BxL needs fgram_tokens_RxP and fgram_positions_RxP.')
    matched_BxL = fgram_index_BxL >= 0
    # Unmatched positions point past the last slot: nothing is gathered or scattered for them
    # (pointing them all at slot 0 made every one add its zero gradient to that one row).
    num_slots = fgram_tokens_RxP.shape[0] * fgram_tokens_RxP.shape[1]
    emb_BxLxD = self.fgram_model(self._embed(fgram_tokens_RxP), fgram_positions_RxP,
                                 jnp.where(matched_BxL, fgram_index_BxL, num_slots),
                                 deterministic)
    x_BxLxD = jnp.where(matched_BxL[..., None], emb_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)
    return nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))

  def _embed(self, ids):
    """T[ids] in the compute dtype, gathered from the float32 table.

    Same values as nn.Embed (which casts the whole table, then gathers), but the backward
    pass adds the rows' gradients into T in float32: many positions share a token (Zipf), and
    a bf16 scatter-add rounds each addition and runs as compare-and-swap loops on a GPU.
    """
    table = self.token_embed.embedding
    return jnp.take(table, ids, axis=0).astype(_dtype(self.config.dtype))

  def fgram_embed(self, fgram_tokens_UxK, fgram_lengths_U, deterministic=True):
    """A_fgram's output rows for left-aligned windows [U, K] (0-padded) of the given lengths.

    One window per row: the packed computation with P = K, each row's slots after its window
    being one-slot padding windows.
    """
    c = self.config
    if not c.fgrams_enabled:
      raise ValueError('fgram_embed called on a model built with fgrams_enabled=False.')
    num_rows, width = fgram_tokens_UxK.shape
    if width > c.fgram_max_len:
      raise ValueError(f'f-gram windows have {width} tokens but the f-gram model has '
                       f'{c.fgram_max_len} positions (fgrams.max_len); rebuild the windows with '
                       'the run\'s f-gram set.')
    slot_K = jnp.arange(width)
    lengths_U = jnp.clip(fgram_lengths_U, 1, width)
    positions_UxK = jnp.where(slot_K < lengths_U[:, None], slot_K, 0)
    last_U = jnp.arange(num_rows) * width + lengths_U - 1
    emb_UxD = self.fgram_model(self._embed(fgram_tokens_UxK), positions_UxK, last_U,
                               deterministic)
    return nn.with_logical_constraint(emb_UxD, ('fgram_batch', 'embed'))

  def backbone(self, x_BxLxD, *, positions_BxL=None, segment_ids_BxL=None, deterministic=True,
               decode=False, valid_BxL=None):
    """Input vectors [B, L, d] → float32 logits; the whole inference-time model.

    decode=True uses the 'cache' collection (init it with `init(..., decode=True)` on a
    [B, max_decode_len] input; apply with mutable=['cache']): each row's L new entries are
    written at that row's cache index (`cache_index` [B]; rows may be reset one at a time),
    `valid_BxL` is stored with them, and each query attends to the valid cached entries at
    or before its slot. positions_BxL are then required.
    """
    batch, length = x_BxLxD.shape[:2]
    if positions_BxL is None:
      if decode and not self.is_initializing():
        raise ValueError('backbone(decode=True) needs positions_BxL (each example\'s position '
                         'of the new tokens).')
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    elif decode:
      raise ValueError('segment_ids_BxL (packing) is not supported with decode=True; use '
                       'valid_BxL for padding.')
    if valid_BxL is None:
      valid_BxL = jnp.ones((batch, length), jnp.bool_)
    h_BxLxD = self.decoder(x_BxLxD, positions_BxL, segment_ids_BxL, valid_BxL.astype(jnp.bool_),
                           deterministic, decode)
    logits_BxLxV = self.lm_head(h_BxLxD).astype(jnp.float32)
    return nn.with_logical_constraint(logits_BxLxV, ('batch', 'length', 'vocab'))
