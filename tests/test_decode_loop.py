"""The on-device decode loop: tokens do not depend on how many steps run per dispatch nor on
where the table lives, and the host-synced loop of before gives the same tokens."""
from flax import linen as nn
import jax
import numpy as np
import pytest

from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import serving

VOCAB = 12


@pytest.fixture(scope='module')
def parts():
  mc = model_lib.ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2,
                             head_dim=8, mlp_dim=32, dtype='float32')
  model = model_lib.SconeLM(mc)
  params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(3), np.zeros(
      (1, 1), np.int32))['params']))
  rng = np.random.default_rng(0)
  grams = sorted({tuple(rng.integers(2, 6, int(rng.integers(2, 4))).tolist())
                  for _ in range(40)})  # a 4-token alphabet: most positions match
  fs = fgrams.FGramSet.from_ngrams(grams, max_len=3)
  # Rows far from the token embeddings, so a wrong or missing row changes the tokens.
  table = (rng.standard_normal((len(fs), 16)) * 3).astype(np.float32)
  prompts = [[2, 3, 4, 5, 2, 3], [], [4, 4], [5, 2, 3, 3, 4, 2, 5, 5, 2, 3, 4]]
  return mc, params, fs, table, prompts


def _gen(parts, storage='ram', use_table=True):
  mc, params, fs, table, _ = parts
  if storage == 'mmap':  # a memmap is a host lookup like ram, through the same path
    t = serving.Table(table, storage='mmap')
  elif storage == 'tensorstore':
    return None
  else:
    t = serving.place_table(table, storage)
  return serving.Generator(mc, params, t if use_table else None, fs if use_table else None,
                           use_table=use_table, seq_len=32, max_len=64)


def test_tokens_per_dispatch_does_not_change_the_tokens(parts):
  gen, prompts = _gen(parts, 'device'), parts[4]
  kw = dict(max_new_tokens=20, stop_tokens=())
  one = gen.generate(prompts, tokens_per_dispatch=1, **kw)
  assert gen.last_stats['dispatches'] == 19
  sixteen = gen.generate(prompts, tokens_per_dispatch=16, **kw)
  assert gen.last_stats['dispatches'] == 2 and sixteen == one
  assert gen.generate(prompts, tokens_per_dispatch=7, **kw) == one
  # Sampling too: one rng split per step, wherever the dispatch boundaries fall.
  kw.update(temperature=1.0, seed=4)
  assert (gen.generate(prompts, tokens_per_dispatch=16, **kw)
          == gen.generate(prompts, tokens_per_dispatch=3, **kw))
  # Stop tokens end rows mid-chunk; the others go on.
  stop = one[0][4]
  outs = gen.generate(prompts, max_new_tokens=20, stop_tokens=(stop,), tokens_per_dispatch=16)
  for full, out in zip(one, outs):
    assert out == (full[:full.index(stop) + 1] if stop in full else full)


@pytest.mark.parametrize('storage', ['host', 'ram', 'mmap'])
def test_every_storage_gives_the_same_tokens(parts, storage):
  prompts = parts[4]
  kw = dict(max_new_tokens=12, stop_tokens=())
  want = _gen(parts, 'device').generate(prompts, **kw)
  gen = _gen(parts, storage)
  assert gen.generate(prompts, **kw) == want
  # The table matters: the baseline (same weights, no rows) decodes otherwise.
  assert _gen(parts, use_table=False).generate(prompts, **kw) != want


def test_loop_matches_the_host_matched_reference(parts):
  """Step by step with the host matcher (DecodeLookup: advance_matches + gather) and the
  one-token step, as serving decoded before the loop moved onto the device."""
  gen, prompts = _gen(parts, 'ram'), parts[4]
  want = gen.generate(prompts, max_new_tokens=10, stop_tokens=())
  batch, lens = len(prompts), np.array([len(p) + 1 for p in prompts])
  tok, cache, rng = gen._prefill([np.array(p, np.int64) for p in prompts], lens, True, 10,  # pylint: disable=protected-access
                                 (True, 0, False), np.array([1e-6, 1.0], np.float32), 0)
  lookup = serving.DecodeLookup(gen.table, gen.fgram_set, batch, 16)
  lookup.reset([np.array(p) for p in prompts], lens)
  step = gen._step_fn(True, 0, False)  # pylint: disable=protected-access
  got = [np.asarray(tok)]
  for _ in range(9):
    rows, ints = lookup.advance(got[-1])
    tok, cache, rng = step(gen.params, cache, rows[:, None], ints[:, None], rng,
                           np.array([1e-6, 1.0], np.float32))
    got.append(np.asarray(tok))
  assert np.stack(got, 1).tolist() == want
