"""The continuous-batching Engine without HTTP: batched prefill and seeded sampling.

Requests that join together are prefilled in one call per prompt width; each must get what
it gets prefilled alone (and what Generator.generate gives it, greedy). Seeded sampling
follows the decode core's one sampler (a request's key for its i-th token is fold_in(seed,
i), so its tokens never depend on the requests beside it), as Generator.generate does.
"""
from flax import linen as nn
import jax
import numpy as np
import pytest

from scone_jax import decode
from scone_jax import engine as engine_lib
from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import serving

VOCAB = 48
MAX_BATCH = 8


@pytest.fixture(scope='module')
def gen():
  """A tiny SCONE Generator (random weights; table rows far from the token embeddings, so a
  row in the wrong place changes the tokens) whose f-grams match most positions."""
  mc = model_lib.ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=16, num_heads=2,
                             head_dim=8, mlp_dim=32, dtype='float32')
  model = model_lib.SconeLM(mc)
  params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(3), np.zeros(
      (1, 1), np.int32))['params']))
  rng = np.random.default_rng(0)
  grams = sorted({tuple(rng.integers(2, 8, int(rng.integers(2, 4))).tolist())
                  for _ in range(60)})
  fs = fgrams.FGramSet.from_ngrams(grams, max_len=3)
  table = (rng.standard_normal((len(fs), 16)) * 3).astype(np.float32)
  return serving.Generator(mc, params, serving.place_table(table, 'ram'), fs, seq_len=32,
                           max_len=96)


@pytest.fixture(scope='module')
def fns(gen):
  """Compiled programs shared by the engines of these tests (fewer compiles)."""
  return engine_lib.Engine(gen, MAX_BATCH).fns


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, 8, n) for n in lengths]  # the f-grams' alphabet: many matches


def _run(engine, requests: list) -> list:
  """Submits every request before the engine runs (they join in the same step), runs it
  to the end; per request: {'tokens', 'lp' (per token), 'prompt' (echo logprobs)}."""
  outs = []
  for kw in requests:
    out = {'tokens': [], 'lp': [], 'prompt': None, 'end': None}

    def on_event(kind, *a, out=out):
      if kind == 'token':
        out['tokens'].append(a[0])
        out['lp'].append(a[1])
      elif kind == 'prompt':
        out['prompt'] = a[0]
      else:
        out['end'] = (kind,) + a
    engine.submit(engine_lib.Request(on_event=on_event, ignore_eos=True, **kw))
    outs.append(out)
  while engine.load()['pending'] or engine.load()['active']:
    engine.iterate()
  assert all(o['end'] == ('done', 'length') for o in outs), [o['end'] for o in outs]
  return outs


def _same(a: dict, b: dict):
  """Equal tokens; logprobs equal up to float rounding (a batch of rows may round
  differently from one row)."""
  assert a['tokens'] == b['tokens']
  for x, y in zip(a['lp'] + [a['prompt']], b['lp'] + [b['prompt']]):
    assert (x is None) == (y is None)
    if x is not None:
      np.testing.assert_array_equal(x['top_id'], y['top_id'])
      for k in ('logprob', 'top_logprob'):
        np.testing.assert_allclose(x[k], y[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_batched_prefill_equals_one_by_one_and_generate(gen, fns):
  """Six prompts of three widths joining at once: three prefill calls (padded to 4, 2 and 1
  rows) instead of six, and every request's first token, logprobs (echoed prompt too) and
  greedy continuation as when prefilled alone and as Generator.generate."""
  lengths = (3, 20, 0, 9, 25, 40)  # with BOS: widths 16, 32, 16, 16, 32, 48
  prompts = _prompts(lengths)
  reqs = [dict(prompt_ids=p, max_tokens=7, logprobs=3, echo=True) for p in prompts]
  batched = engine_lib.Engine(gen, MAX_BATCH, functions=fns)
  one_by_one = engine_lib.Engine(gen, MAX_BATCH, functions=fns, batch_prefill=False)
  got, want = _run(batched, reqs), _run(one_by_one, reqs)
  assert batched.stats['prefill_calls'] == 3 and one_by_one.stats['prefill_calls'] == 6
  assert batched.stats['prefill_tokens'] == sum(lengths) + len(lengths)
  generated = gen.generate(prompts, max_new_tokens=7, stop_tokens=())
  for p, a, b, tokens in zip(prompts, got, want, generated):
    _same(a, b)
    assert a['tokens'] == tokens
    assert len(a['prompt']['logprob']) == p.size  # BOS is not scored
  assert {k[:2] for k in batched.fns.prefill_shapes} >= {(16, 4), (32, 2), (48, 1)}


@pytest.mark.slow
def test_a_mixed_group_gives_each_request_what_it_gets_alone(gen, fns):
  """One width, one call: greedy and sampled rows (own seeds, temperatures, top_k/top_p),
  logprobs on and off, with and without BOS; each equals the request prefilled alone (its
  seeded samples too; decoding beside others changes no row: see the sampling test)."""
  prompts = _prompts((5, 11, 2, 8, 14, 6), seed=1)
  reqs = [dict(prompt_ids=prompts[0], max_tokens=6),
          dict(prompt_ids=prompts[1], max_tokens=9, temperature=1.0, seed=3, logprobs=2),
          dict(prompt_ids=prompts[2], max_tokens=5, add_bos=False, logprobs=1, echo=True),
          dict(prompt_ids=prompts[3], max_tokens=8, temperature=0.8, top_k=10, seed=5),
          dict(prompt_ids=prompts[4], max_tokens=6, temperature=1.2, top_p=0.9, seed=3,
               add_bos=False),
          dict(prompt_ids=prompts[5], max_tokens=4, logprobs=2, echo=True)]
  engine = engine_lib.Engine(gen, MAX_BATCH, functions=fns)
  together = _run(engine, reqs)
  assert engine.stats['prefill_calls'] == 1
  alone = engine_lib.Engine(gen, MAX_BATCH, functions=fns, batch_prefill=False)
  for got, want in zip(together, _run(alone, reqs)):
    _same(got, want)
  assert alone.stats['prefill_calls'] == len(reqs)
  assert together[0]['tokens'] == gen.generate([prompts[0]], max_new_tokens=6,
                                               stop_tokens=())[0]
  assert together[2]['tokens'] == gen.generate([prompts[2]], max_new_tokens=5,
                                               stop_tokens=(), add_bos=False)[0]


def test_compiled_prefill_shapes_stay_bounded(gen, fns):
  """Groups of 1..8 requests of one width compile 4 prefill programs (1, 2, 4 and 8 rows)."""
  engine = engine_lib.Engine(gen, MAX_BATCH, functions=fns)
  for n in range(1, MAX_BATCH + 1):
    _run(engine, [dict(prompt_ids=p, max_tokens=1) for p in _prompts([4] * n, seed=n)])
  assert engine.stats['prefill_calls'] == MAX_BATCH
  assert sorted(k[1] for k in fns.prefill_shapes if k[0] == 16 and not k[2]) == [1, 2, 4, 8]
  # warmup() compiles every row count of a width (with and without logprobs) without writing
  # a slot; more joiners than
  # slots get one slot each, the rest join as slots free up; max_batch caps the rows.
  small = engine_lib.Engine(gen, 3)
  small.warmup(widths=(16,))
  assert sorted(k[1] for k in small.fns.prefill_shapes if k[0] == 16) == [1, 1, 2, 2, 3, 3]
  prompts = _prompts([4] * 7, seed=9)
  outs = _run(small, [dict(prompt_ids=p, max_tokens=2) for p in prompts])
  assert small.stats['prefill_calls'] == 3 and len(small.fns.prefill_shapes) == 6
  assert [o['tokens'] for o in outs] == gen.generate(prompts, max_new_tokens=2, stop_tokens=())


def _reference_samples(gen, prompt, n, seed, temperature, top_k=0, top_p=1.0):
  """The engine's sampling design, computed without the engine: token i is drawn with key
  fold_in(PRNGKey(seed), i) from a full forward pass (no cache) over BOS, prompt and the
  tokens before it (right-padded to one width: causal, so the padding changes nothing)."""
  width = prompt.size + n
  forward = jax.jit(lambda rows, ints: gen.model.apply(
      {'params': gen.params}, gen.input_vectors(gen.params, rows, ints),
      positions_BxL=ints[..., 1], method=model_lib.SconeLM.backbone))
  sample_rows = jax.jit(decode.sample_rows, static_argnames='sampling')
  toks = []
  for i in range(n):
    seq = np.concatenate([prompt, np.array(toks, np.int64)])
    ints = np.zeros((1, width, 4), np.int32)
    ints[..., 2] = -1
    ints[:, :seq.size + 1] = gen.prompt_batch([seq], [True], [1], seq.size + 1).ints_NxWx4
    logits = forward(gen.rows_for(ints[..., 2]), ints)
    keys = decode.row_keys(np.array([seed], np.int32), np.array([i], np.int32))
    toks.append(int(sample_rows(logits[:, seq.size], np.array([temperature], np.float32),
                                np.array([top_p], np.float32), np.array([top_k], np.int32),
                                keys, sampling=True)[0]))
  return toks


def test_seeded_sampling_follows_the_seed_alone(gen, fns):
  """A sampled request's i-th token uses fold_in(seed, i) (the prefill's token is i = 0,
  the decode loop's count goes on from 1), alone or beside other requests; same seed, same
  tokens; another seed, other tokens; Generator.generate samples the same."""
  prompt = _prompts([6], seed=4)[0]
  kw = dict(prompt_ids=prompt, max_tokens=12, temperature=1.5, seed=11)
  engine = engine_lib.Engine(gen, MAX_BATCH, functions=fns)  # 8 tokens per chunk: two
  alone = _run(engine, [kw])[0]['tokens']
  assert alone == _reference_samples(gen, prompt, 12, 11, 1.5)
  assert gen.generate([prompt], max_new_tokens=12, temperature=1.5, seed=11,
                      stop_tokens=())[0] == alone
  assert _run(engine, [kw])[0]['tokens'] == alone
  assert _run(engine, [dict(kw, seed=12)])[0]['tokens'] != alone
  # Beside others (greedy and sampled with other seeds), in another slot: the same tokens.
  others = [dict(prompt_ids=p, max_tokens=5, temperature=1.0, seed=s)
            for s, p in enumerate(_prompts((3, 9), seed=5))]
  outs = _run(engine, others + [kw])
  assert outs[-1]['tokens'] == alone
  top = dict(kw, temperature=0.9, top_k=8, top_p=0.95, seed=2)
  assert _run(engine, [top])[0]['tokens'] == _reference_samples(gen, prompt, 12, 2, 0.9, 8,
                                                                  0.95)
