"""The SCONE model itself: what replaces what, causality, packing, the KV cache, axis names."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import step_batch

VOCAB = 50
K = 4
P = 8  # packed row slots


def _config(**overrides):
  kw = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
            max_seq_len=24, dtype='float32', fgrams_enabled=True, fgram_max_len=K,
            fgram_num_layers=2, fgram_num_heads=2, fgram_head_dim=16, fgram_mlp_dim=48)
  kw.update(overrides)
  return model_lib.ModelConfig(**kw)


def _fgram_set(rng):
  """Random f-grams of lengths 2..K over the vocab (ids by rank, no duplicates)."""
  grams = set()
  while len(grams) < 40:
    n = int(rng.integers(2, K + 1))
    grams.add(tuple(int(t) for t in rng.integers(1, 5, size=n)))
  grams = sorted(grams)
  return fgrams.FGramSet.from_ngrams(grams, np.arange(len(grams), 0, -1), max_len=K)


def _batch(fgram_set, rng, batch=3, length=24, dedupe=True):
  """Rows of small-alphabet tokens (so f-grams match often) with their matches, deduped."""
  tokens_BxL = rng.integers(1, 5, size=(batch, length)).astype(np.int32)
  ids, lens = zip(*(fgram_set.match(row) for row in tokens_BxL))
  b = {'inputs': tokens_BxL, 'fgram_ids': np.stack(ids), 'fgram_lengths': np.stack(lens)}
  return step_batch.dedupe_fgrams(b, fgram_set, pack_len=P, bucket=4, dedupe=dedupe)


def _scone_kwargs(b):
  return dict(fgram_index_BxL=jnp.asarray(b['fgram_index']),
              fgram_tokens_RxP=jnp.asarray(b['fgram_tokens']),
              fgram_positions_RxP=jnp.asarray(b['fgram_positions']))


class PaddedFGramModel(nn.Module):
  """A_fgram as it ran before packing: one window per row of K slots, 0-padded after it,
  causal only, its output read at index length - 1. The reference the packed rows must match."""
  config: model_lib.ModelConfig

  @nn.compact
  def __call__(self, x_UxKxD, lengths_U):
    c = self.config
    block_cfg = model_lib.BlockConfig(c.fgram_num_heads, c.fgram_head_dim, c.fgram_mlp_dim,
                                      c.mlp_activation, False, 0.0, jnp.dtype(c.dtype),
                                      jnp.dtype(c.param_dtype), batch_axis='fgram_batch',
                                      length_axis='fgram_len')
    num_rows, num_pos = x_UxKxD.shape[:2]
    pos_embed = nn.Embed(c.fgram_max_len, c.d_model, dtype=jnp.dtype(c.dtype), name='pos_embed')
    x_UxKxD = x_UxKxD.astype(c.dtype) + pos_embed(jnp.arange(num_pos))[None]
    x_UxKxD = model_lib._run_blocks(  # pylint: disable=protected-access
        block_cfg, c.fgram_num_layers, scan=c.scan_layers, remat=False, x_BxLxD=x_UxKxD,
        positions_BxL=jnp.broadcast_to(jnp.arange(num_pos), (num_rows, num_pos)),
        mask_Bx1xLxL=jnp.tril(jnp.ones((num_pos, num_pos), jnp.bool_))[None, None],
        valid_BxL=jnp.ones((num_rows, num_pos), jnp.bool_), deterministic=True, decode=False)
    last_UxD = jnp.take_along_axis(x_UxKxD, (lengths_U - 1)[:, None, None], axis=1)[:, 0]
    return model_lib.RMSNorm(jnp.dtype(c.dtype), jnp.dtype(c.param_dtype),
                             name='final_norm')(last_UxD)


@pytest.fixture(scope='module')
def setup():
  rng = np.random.default_rng(0)
  fs = _fgram_set(rng)
  model = model_lib.SconeLM(_config())
  b = _batch(fs, rng)
  params = model.init({'params': jax.random.PRNGKey(1)}, jnp.asarray(b['inputs']),
                      **_scone_kwargs(b))['params']
  return fs, model, nn.unbox(params), b


def test_matches_really_happen(setup):
  fs, _, _, b = setup
  matched = b['fgram_index'] >= 0
  assert 0.2 < matched.mean() < 0.95
  assert b['fgram_num_unique'] < matched.sum()  # dedupe has something to save


def test_no_fgrams_equals_baseline(setup):
  """SCONE with every position unmatched is the baseline, parameter for parameter."""
  _, scone, params, b = setup
  base = model_lib.SconeLM(_config(fgrams_enabled=False))
  base_params = nn.unbox(base.init({'params': jax.random.PRNGKey(1)},
                                   jnp.asarray(b['inputs']))['params'])
  shared = {k: v for k, v in params.items() if k != 'fgram_model'}
  jax.tree.map(np.testing.assert_array_equal, shared, base_params)
  inputs = jnp.asarray(b['inputs'])
  unmatched = dict(_scone_kwargs(b), fgram_index_BxL=jnp.full(inputs.shape, -1, jnp.int32))
  got = scone.apply({'params': params}, inputs, **unmatched)
  want = base.apply({'params': base_params}, inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_matched_input_is_fgram_model_output_on_its_window(setup):
  """x[i] = A_fgram(T[window ending at i]) where an f-gram matches, T[token] elsewhere."""
  fs, model, params, b = setup
  x = np.asarray(model.apply({'params': params}, jnp.asarray(b['inputs']),
                             *(_scone_kwargs(b).values()), method=model_lib.SconeLM.embed_inputs))
  table = np.asarray(params['token_embed']['embedding'])
  ids_BxL = b['fgram_ids']
  for r, c in zip(*np.nonzero(ids_BxL >= 0)):
    n = int(b['fgram_lengths'][r, c])
    window = b['inputs'][r, c - n + 1:c + 1]
    assert tuple(window) == fs.ngram(int(ids_BxL[r, c]))
    padded = np.zeros((1, K), np.int32)
    padded[0, :n] = window
    want = model.apply({'params': params}, jnp.asarray(padded), jnp.asarray([n]),
                       method=model_lib.SconeLM.fgram_embed)
    np.testing.assert_allclose(x[r, c], np.asarray(want)[0], rtol=1e-5, atol=1e-6)
  unmatched = ids_BxL < 0
  np.testing.assert_array_equal(x[unmatched], table[b['inputs'][unmatched]])


def test_fgram_output_ignores_window_padding(setup):
  """Windows are causal and left-aligned: what pads a short window never reaches its row."""
  _, model, params, _ = setup
  toks = np.array([[3, 5, 0, 0], [3, 5, 7, 9]], np.int32)
  out = model.apply({'params': params}, jnp.asarray(toks), jnp.asarray([2, 2]),
                    method=model_lib.SconeLM.fgram_embed)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(out[1]), rtol=1e-6, atol=1e-6)


def _padded_reference(model, params, ids_W, fgram_set):
  """Today's-before-packing outputs of windows ids_W: the PaddedFGramModel over [W, K]."""
  x_WxKxD = jnp.take(params['token_embed']['embedding'],
                     jnp.asarray(fgram_set.tokens_padded[ids_W]), axis=0)
  return np.asarray(PaddedFGramModel(model.config).apply(
      {'params': params['fgram_model']}, x_WxKxD, jnp.asarray(fgram_set.lengths[ids_W])))


@pytest.mark.parametrize('pack_len,dedupe', [(K, True), (P, True), (P, False), (13, True)])
def test_packed_windows_equal_the_padded_computation(setup, pack_len, dedupe):
  """Several windows to a row, block-diagonal attention: each window's output is what it got
  alone in a row of K slots, with the same parameters."""
  _, model, params, _ = setup
  rng = np.random.default_rng(11)
  grams = sorted({tuple(int(t) for t in rng.integers(1, VOCAB, size=n))
                  for n in rng.integers(2, K + 1, size=200)})
  fs = fgrams.FGramSet.from_ngrams(grams, np.arange(len(grams), 0, -1), max_len=K)
  ids_BxL = rng.integers(-len(grams) // 2, len(grams), size=(3, 40)).astype(np.int32)
  ids_BxL[ids_BxL < 0] = -1
  raw = {'inputs': np.zeros(ids_BxL.shape, np.int32), 'fgram_ids': ids_BxL}
  b = step_batch.dedupe_fgrams(raw, fs, pack_len=pack_len, bucket=4, dedupe=dedupe)
  assert b['fgram_tokens'].shape[0] * pack_len < 1.25 * int(b['fgram_useful']) + 4 * pack_len
  x = np.asarray(model.apply({'params': params}, jnp.asarray(raw['inputs']),
                             *(_scone_kwargs(b).values()), method=model_lib.SconeLM.embed_inputs))
  matched = ids_BxL >= 0
  lengths = np.asarray(fs.lengths)[ids_BxL[matched]]
  assert set(lengths.tolist()) == set(range(2, K + 1))
  want = _padded_reference(model, params, ids_BxL[matched], fs)
  np.testing.assert_allclose(x[matched], want, rtol=1e-5, atol=1e-5)
  # The export path (one padded window per row) is the same computation.
  got = model.apply({'params': params}, jnp.asarray(fs.tokens_padded),
                    jnp.asarray(fs.lengths), method=model_lib.SconeLM.fgram_embed)
  np.testing.assert_allclose(np.asarray(got), _padded_reference(model, params,
                                                                np.arange(len(fs)), fs),
                             rtol=1e-5, atol=1e-5)


def test_dedupe_does_not_change_logits(setup):
  fs, model, params, _ = setup
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, 5, size=(2, 24)).astype(np.int32)
  ids, lens = zip(*(fs.match(row) for row in tokens))
  raw = {'inputs': tokens, 'fgram_ids': np.stack(ids), 'fgram_lengths': np.stack(lens)}
  outs = []
  for dedupe in (True, False):
    b = step_batch.dedupe_fgrams(raw, fs, pack_len=P, bucket=4, dedupe=dedupe)
    outs.append(np.asarray(model.apply({'params': params}, jnp.asarray(tokens),
                                       **_scone_kwargs(b))))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_fgram_model_and_the_shared_table(setup):
  _, model, params, b = setup
  inputs = jnp.asarray(b['inputs'])

  def loss(p):
    logits = model.apply({'params': p}, inputs, **_scone_kwargs(b))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(inputs, -1, 1)[..., None], -1)[..., 0])

  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads['fgram_model']):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  # T rows of tokens seen only inside f-gram windows still get gradient through A_fgram.
  assert float(jnp.abs(grads['token_embed']['embedding']).sum()) > 0


def test_causal_and_packed_segments_are_isolated(setup):
  fs, model, params, _ = setup
  rng = np.random.default_rng(7)
  tokens = rng.integers(1, VOCAB, size=(1, 24)).astype(np.int32)
  seg = np.array([[1] * 10 + [2] * 14], np.int32)
  pos = np.concatenate([np.arange(10), np.arange(14)])[None].astype(np.int32)
  run = lambda t: np.asarray(model.apply(
      {'params': params}, jnp.asarray(t), positions_BxL=jnp.asarray(pos),
      segment_ids_BxL=jnp.asarray(seg)))
  base = run(tokens)
  future = tokens.copy()
  future[0, 15:] = (future[0, 15:] + 1) % VOCAB
  np.testing.assert_array_equal(run(future)[0, :15], base[0, :15])   # causal
  first = tokens.copy()
  first[0, :10] = (first[0, :10] + 3) % VOCAB
  np.testing.assert_allclose(run(first)[0, 10:], base[0, 10:], rtol=1e-5, atol=1e-5)  # packed
  alone = np.asarray(model.apply({'params': params}, jnp.asarray(tokens[:, 10:])))
  np.testing.assert_allclose(base[0, 10:], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('position', ['rope', 'learned'])
def test_kv_cache_decode_equals_full_forward(position):
  cfg = _config(fgrams_enabled=False, position=position)
  model = model_lib.SconeLM(cfg)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, VOCAB, size=(2, 12)).astype(np.int32))
  params = nn.unbox(model.init({'params': jax.random.PRNGKey(0)}, tokens)['params'])
  full = np.asarray(model.apply({'params': params}, tokens))
  x = model.apply({'params': params}, tokens, method=model_lib.SconeLM.embed_inputs)
  cache = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((2, 16, 32), jnp.float32),
                     decode=True, method=model_lib.SconeLM.backbone)['cache']
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  # Prefill 5 tokens in one call, then one token per call.
  logits, vs = model.apply({'params': params, 'cache': cache}, x[:, :5], positions_BxL=pos[:, :5],
                           decode=True, mutable=['cache'], method=model_lib.SconeLM.backbone)
  steps = [np.asarray(logits)]
  cache = vs['cache']
  for i in range(5, 12):
    logits, vs = model.apply({'params': params, 'cache': cache}, x[:, i:i + 1],
                             positions_BxL=pos[:, i:i + 1], decode=True, mutable=['cache'],
                             method=model_lib.SconeLM.backbone)
    cache = vs['cache']
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_kv_cache_rows_at_different_fill_levels(scan_layers):
  """Rows prefilled apart (a server's slots joining at different times) and then decoded
  together each equal their own full forward: the cache index is per row."""
  cfg = _config(fgrams_enabled=False, scan_layers=scan_layers)
  model = model_lib.SconeLM(cfg)
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(1, VOCAB, size=(2, 12)).astype(np.int32))
  params = nn.unbox(model.init({'params': jax.random.PRNGKey(0)}, tokens)['params'])
  full = np.asarray(model.apply({'params': params}, tokens))
  x = model.apply({'params': params}, tokens, method=model_lib.SconeLM.embed_inputs)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  decode = dict(decode=True, mutable=['cache'], method=model_lib.SconeLM.backbone)
  empty = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 16, 32), jnp.float32),
                     decode=True, method=model_lib.SconeLM.backbone)['cache']
  # Row 0 prefills 6 tokens, row 1 prefills 3 tokens after one padding entry; then the rows
  # are stacked into one batch cache and decode together.
  prefill = [6, 3]
  logits0, c0 = model.apply({'params': params, 'cache': empty}, x[:1, :6],
                            positions_BxL=pos[:1, :6], **decode)
  x1 = jnp.concatenate([jnp.zeros_like(x[1:, :1]), x[1:, :3]], axis=1)
  logits1, c1 = model.apply({'params': params, 'cache': empty}, x1,
                            positions_BxL=jnp.concatenate([pos[1:, :1], pos[1:, :3]], 1),
                            valid_BxL=jnp.array([[False, True, True, True]]), **decode)
  axis = 1 if scan_layers else 0
  cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis), c0['cache'], c1['cache'])
  got = [[np.asarray(logits0[0])], [np.asarray(logits1[0, 1:])]]
  for i in range(6):
    ids = [prefill[0] + i, prefill[1] + i]
    step_x = jnp.stack([x[0, ids[0]], x[1, ids[1]]])[:, None]
    logits, vs = model.apply({'params': params, 'cache': cache}, step_x,
                             positions_BxL=jnp.array(ids, jnp.int32)[:, None], **decode)
    cache = vs['cache']
    got[0].append(np.asarray(logits[0]))
    got[1].append(np.asarray(logits[1]))
  np.testing.assert_allclose(np.concatenate(got[0]), full[0, :12], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.concatenate(got[1]), full[1, :9], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_parameter_has_logical_axes(scan_layers):
  model = model_lib.SconeLM(_config(scan_layers=scan_layers, mlp_activation='swiglu'))
  boxed = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)},
                                            jnp.zeros((2, 8), jnp.int32))['params'])
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert 'fgram_model' in boxed
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f'{jax.tree_util.keystr(path)} has no axis names'
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
  if scan_layers:
    kernel = boxed['decoder']['layers']['attention']['query']['kernel']
    assert kernel.names[0] == 'layers' and kernel.value.shape[0] == 2


def test_mixed_precision_keeps_fp32_params_and_logits():
  cfg = _config(dtype='bfloat16', param_dtype='float32')
  model = model_lib.SconeLM(cfg)
  rng = np.random.default_rng(0)
  fs = _fgram_set(rng)
  b = _batch(fs, rng)
  params = nn.unbox(model.init({'params': jax.random.PRNGKey(1)}, jnp.asarray(b['inputs']),
                               **_scone_kwargs(b))['params'])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = model.apply({'params': params}, jnp.asarray(b['inputs']), **_scone_kwargs(b))
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='mlp_activation'):
    _config(mlp_activation='relu6')
  with pytest.raises(ValueError, match='head_dim'):
    _config(head_dim=15)
  base = model_lib.SconeLM(_config(fgrams_enabled=False))
  toks = jnp.zeros((1, 8), jnp.int32)
  params = base.init({'params': jax.random.PRNGKey(0)}, toks)
  with pytest.raises(ValueError, match='fgrams_enabled=False'):
    base.apply(params, toks, fgram_index_BxL=toks, fgram_tokens_RxP=jnp.zeros((1, P), jnp.int32),
               fgram_positions_RxP=jnp.zeros((1, P), jnp.int32))


@pytest.mark.parametrize('implementation', ['xla', 'auto'])
def test_dot_product_attention_equals_the_einsum_path(setup, implementation):
  """jax.nn.dot_product_attention (causal flag + segment mask, main model and packed f-gram
  rows) gives today's einsum logits and gradients in float32, packed documents included."""
  _, _, params, b = setup
  inputs = jnp.asarray(b['inputs'])
  seg = np.ones(inputs.shape, np.int32)
  seg[0, 10:] = 2          # two packed documents in row 0
  seg[1, 20:] = 0          # padding at the end of row 1
  pos = np.where(seg[0] == 2, np.arange(24) - 10, np.arange(24))
  positions = np.stack([pos] + [np.arange(24)] * 2).astype(np.int32)
  kw = dict(_scone_kwargs(b), segment_ids_BxL=jnp.asarray(seg),
            positions_BxL=jnp.asarray(positions))

  def loss(p, attention):
    model = model_lib.SconeLM(_config(attention=attention))
    return jnp.sum(jnp.square(model.apply({'params': p}, inputs, **kw)))

  want, want_grads = jax.value_and_grad(loss)(params, 'einsum')
  got, got_grads = jax.value_and_grad(loss)(params, implementation)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  # float32 sums in another order: equal to ~1e-5 of each gradient's scale.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(w)))), got_grads, want_grads)
  # The f-gram model's packed rows alone, block-diagonal windows included.
  embed = lambda attention: model_lib.SconeLM(_config(attention=attention)).apply(
      {'params': params}, inputs, *(_scone_kwargs(b).values()),
      method=model_lib.SconeLM.embed_inputs)
  np.testing.assert_allclose(embed(implementation), embed('einsum'), rtol=1e-5, atol=1e-6)


def test_attention_implementation_choice():
  assert model_lib.attention_implementation('auto', jnp.bfloat16, 64) == (
      'cudnn' if jax.default_backend() == 'gpu' else 'xla')
  assert model_lib.attention_implementation('auto', jnp.float32, 64) == 'xla'
  assert model_lib.attention_implementation('einsum', jnp.bfloat16, 64) == 'einsum'
  # cuDNN trains with the mask-as-bias only over even lengths: odd rows stay on XLA.
  assert model_lib.attention_implementation('auto', jnp.bfloat16, 64, 5) == 'xla'
  with pytest.raises(ValueError, match='model.attention'):
    _config(attention='flash')
