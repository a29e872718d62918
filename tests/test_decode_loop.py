"""The decode core's on-device loop: every table storage x matcher storage x tokens per
dispatch gives the tokens of the host-matched reference, on a model and prompts where most
decode positions have competing f-gram matches of several lengths."""
from flax import linen as nn
import jax
import numpy as np
import pytest

from scone_jax import decode
from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import serving

VOCAB = 5            # 0 BOS, 1 EOS, the alphabet 2..4
K = 4
NEW = 24
# Keeps every decoded token in the f-gram alphabet, so decode positions have matches.
NO_SPECIALS = {0: -100.0, 1: -100.0}


@pytest.fixture(scope='module')
def parts():
  mc = model_lib.ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2,
                             head_dim=8, mlp_dim=32, dtype='float32')
  model = model_lib.SconeLM(mc)
  params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(3), np.zeros(
      (1, 1), np.int32))['params']))
  rng = np.random.default_rng(0)
  alphabet = [2, 3, 4]
  every = [tuple(int(t) for t in g) for n in range(2, K + 1)
           for g in np.array(np.meshgrid(*[alphabet] * n)).reshape(n, -1).T]
  # Every 2-gram and most longer ones: a position usually matches at 2, 3 and 4 tokens.
  grams = [g for g in every if len(g) == 2 or rng.random() < 0.85]
  fs = fgrams.FGramSet.from_ngrams(sorted(grams), max_len=K)
  # Rows far from the token embeddings, so a wrong or missing row changes the tokens.
  table = (rng.standard_normal((len(fs), 16)) * 3).astype(np.float32)
  prompts = [[2, 3, 4, 2, 2, 3], [], [4, 4], [3, 2, 3, 3, 4, 2, 4, 4, 2, 3, 4]]
  return mc, params, fs, table, prompts


def _gen(parts, storage='ram', matcher_storage=None, use_table=True):
  mc, params, fs, table, _ = parts
  t = (serving.Table(table, storage='mmap') if storage == 'mmap'  # a host lookup like ram
       else serving.place_table(table, storage))
  return serving.Generator(mc, params, t if use_table else None, fs if use_table else None,
                           use_table=use_table, seq_len=32, max_len=64,
                           matcher_storage=matcher_storage)


def _reference(gen, prompts, seed=0, temperature=0.0):
  """Step by step with the host matcher (DecodeLookup: advance_matches + the table's host
  lookup) and one KV-cached step of the model, sampled by the same sampler."""
  n = len(prompts)
  ids = [np.array(p, np.int64) for p in prompts]
  width = decode.bucket(max(p.size for p in ids) + 1, decode.PREFILL_BUCKET)
  cache_len = decode.bucket(width + NEW, decode.CACHE_BUCKET)
  opts = decode.make_options(n, VOCAB, seed=seed, temperature=temperature,
                             logit_bias=[NO_SPECIALS] * n)
  flags = decode.Flags(sample=temperature > 0, adjust=True)
  is_stop = gen.stop_mask(())
  _, state = gen.prefill_fn(cache_len, flags)(
      gen.params, gen.table_operand, gen.matcher,
      gen.prompt_batch(ids, [True] * n, [NEW] * n, width), opts, is_stop)
  lookup = serving.DecodeLookup(gen.table, gen.fgram_set, n, 16)
  lookup.reset(ids, [p.size + 1 for p in ids])

  @jax.jit
  def step(params, cache, rows, ints, count, counts):
    logits, cache = decode.apply_cached(gen.model, params, cache, rows[:, None], ints[:, None])
    return decode.next_tokens(logits[:, 0], opts, count, counts, flags), cache

  tok, cache, counts = np.asarray(state.tok), state.cache, np.array(state.counts_BxV)
  got, fids = [tok], []
  for i in range(1, NEW):
    rows, ints = lookup.advance(tok)
    fids.append(ints[:, 2].copy())
    tok, cache = step(gen.params, cache, rows, ints, np.full(n, i, np.int32), counts)
    tok = np.asarray(tok)
    counts[np.arange(n), tok] += 1
    got.append(tok)
  return np.stack(got, 1).tolist(), np.stack(fids, 1)


def _competing(fs, prompts, outs) -> tuple:
  """(decode positions, those where f-grams of two or more lengths end)."""
  grams = {tuple(g[:n]) for g, n in zip(np.asarray(fs.tokens_padded).tolist(), fs.lengths)}
  total = several = 0
  for p, out in zip(prompts, outs):
    doc = list(p) + out
    for end in range(len(p) + 1, len(doc)):  # the fed-back tokens (the last is not fed)
      lengths = [n for n in range(2, K + 1) if end >= n and tuple(doc[end - n:end]) in grams]
      total += 1
      several += len(lengths) >= 2
  return total, several


@pytest.fixture(scope='module')
def reference(parts):
  return _reference(_gen(parts, 'ram', 'host'), parts[4])


def test_the_reference_meets_competing_matches(parts, reference):
  outs, fids = reference
  total, several = _competing(parts[2], parts[4], outs)
  assert total == len(parts[4]) * (NEW - 1) and several >= 0.6 * total, (total, several)
  assert (fids >= 0).mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize('matcher_storage', ['device', 'host'])
@pytest.mark.parametrize('storage', ['device', 'host', 'ram', 'mmap'])
def test_every_storage_and_chunking_equals_the_reference(parts, reference, storage,
                                                          matcher_storage):
  gen = _gen(parts, storage, matcher_storage)
  kw = dict(max_new_tokens=NEW, stop_tokens=(), logit_bias=NO_SPECIALS)
  for per_dispatch in (1, 16):
    assert gen.generate(parts[4], tokens_per_dispatch=per_dispatch, **kw) == reference[0], (
        storage, matcher_storage, per_dispatch)
    assert gen.last_stats['dispatches'] == -(-(NEW - 1) // per_dispatch)


def test_sampled_tokens_follow_the_seed_not_the_chunking(parts):
  gen = _gen(parts, 'device', 'device')
  kw = dict(max_new_tokens=NEW, stop_tokens=(), logit_bias=NO_SPECIALS, temperature=1.0,
            seed=4)
  want, _ = _reference(gen, parts[4], seed=4, temperature=1.0)
  assert gen.generate(parts[4], tokens_per_dispatch=16, **kw) == want
  assert gen.generate(parts[4], tokens_per_dispatch=3, **kw) == want
  # Alone or batched: row b of a batch samples what it samples alone.
  assert gen.generate(parts[4][3:], tokens_per_dispatch=5, **kw) == want[3:]


def test_stop_tokens_end_rows_mid_chunk(parts):
  gen = _gen(parts, 'device')
  kw = dict(max_new_tokens=NEW, logit_bias=NO_SPECIALS, tokens_per_dispatch=16)
  full = gen.generate(parts[4], stop_tokens=(), **kw)
  stop = full[0][4]
  outs = gen.generate(parts[4], stop_tokens=(stop,), **kw)
  for f, out in zip(full, outs):
    assert out == (f[:f.index(stop) + 1] if stop in f else f)


def test_the_table_matters(parts, reference):
  kw = dict(max_new_tokens=NEW, stop_tokens=(), logit_bias=NO_SPECIALS)
  assert _gen(parts, use_table=False).generate(parts[4], **kw) != reference[0]


def test_one_tokens_per_dispatch_default():
  """The CLI flag, the server, the engine and generate decode the same chunk by default."""
  import inspect  # pylint: disable=g-import-not-at-top
  from scone_jax import engine, main, server  # pylint: disable=g-import-not-at-top
  want = decode.DEFAULT_TOKENS_PER_DISPATCH
  assert main._TOKENS_PER_DISPATCH.default == want  # pylint: disable=protected-access
  assert inspect.signature(server.run).parameters['tokens_per_dispatch'].default == want
  assert engine.DEFAULT_TOKENS_PER_DISPATCH == serving.DEFAULT_TOKENS_PER_DISPATCH == want
  assert (inspect.signature(serving.Generator.generate).parameters['tokens_per_dispatch']
          .default == want)


def test_prompts_are_matched_like_the_fgram_set_without_its_hash_table(parts):
  """Generator.prompt_batch's f-gram ids equal FGramSet.match on each prompt (BOS-less), at
  every position: near the start (less context than K), and never across BOS, even for
  f-grams that start with BOS's id (a prompt may hold that id as a token). Matched by the
  step's own arrays on the host: the set's hash table stays unbuilt."""
  mc, params, fs, _, prompts = parts
  grams = {tuple(g[:n]) for g, n in zip(np.asarray(fs.tokens_padded).tolist(), fs.lengths)}
  grams |= {(decode.BOS_ID, 2), (decode.BOS_ID, 2, 3), (2, decode.BOS_ID, 4)}
  fresh = fgrams.FGramSet.from_ngrams(sorted(grams), max_len=K)
  table = np.random.default_rng(1).standard_normal((len(fresh), 16)).astype(np.float32)
  gen = serving.Generator(mc, params, serving.place_table(table, 'ram'), fresh, seq_len=32,
                          max_len=64)
  ids = [np.array(p, np.int64) for p in prompts + [[2, 3, 4, 2], [0, 2, 3], [2, 0, 4, 4, 3]]]
  width, n = 16, len(ids)
  got = {bos: np.asarray(gen.prompt_batch(ids, [bos] * n, [4] * n, width).ints_NxWx4)
         for bos in (True, False)}
  assert fresh._table is None  # pylint: disable=protected-access
  for bos, ints in got.items():
    for b, p in enumerate(ids):
      want = np.full(width, -1, np.int32)
      if p.size:
        want[width - p.size:] = fresh.match(p)[0]
      np.testing.assert_array_equal(ints[b, :, decode.FID], want, err_msg=f'bos={bos} {p}')
  assert (got[True][:, :, decode.FID] >= 0).sum() > 10
