"""--mesh: the main model tensor-parallel over 8 (fake CPU) devices decodes, token for token,
what one device decodes, through Generator.generate, the Engine and the HTTP server; its
parameters and KV cache are really split, the table stays one copy in its storage."""
# pylint: disable=protected-access
import os
import subprocess
import sys

from flax import linen as nn
import jax
import numpy as np
import openai
import pytest

from scone_jax import decode
from scone_jax import engine as engine_lib
from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import serving
from scone_jax import sharding
from scone_jax import table as table_lib
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, DIM, HEADS = 16, 32, 8
PROMPTS = [[2, 3, 4, 5, 2, 3], [], [4, 4], [5, 2, 3, 3, 4, 2, 5, 5, 2, 3, 4]]
NEW = 12


@pytest.fixture(scope='module')
def parts():
  # 8 heads and scanned layers: the cache carries a leading layer axis, the heads are third.
  mc = model_lib.ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=DIM, num_heads=HEADS,
                             head_dim=4, mlp_dim=64, dtype='float32', scan_layers=True)
  model = model_lib.SconeLM(mc)
  params = jax.device_get(jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(3), np.zeros(
      (1, 1), np.int32))['params']))())
  rng = np.random.default_rng(0)
  grams = sorted({tuple(rng.integers(2, 6, int(rng.integers(2, 4))).tolist())
                  for _ in range(40)})  # a 4-token alphabet: most positions match
  fs = fgrams.FGramSet.from_ngrams(grams, max_len=3)
  # Rows far from the token embeddings, so a wrong or missing row changes the tokens.
  table = (rng.standard_normal((len(fs), DIM)) * 3).astype(np.float32)
  return mc, params, fs, table


@pytest.fixture(scope='module')
def mesh():
  return sharding.serving_mesh('tensor:8')


def _gen(parts, storage, mesh=None):
  """storage None: the baseline (same weights, no table)."""
  mc, params, fs, table = parts
  t = serving.place_table(table, storage) if storage else None
  return serving.Generator(mc, params, t, fs if storage else None, use_table=bool(storage),
                           seq_len=32, max_len=64, mesh=mesh)


@pytest.fixture(scope='module')
def one_device(parts):
  """Greedy tokens on one device: {'scone': ..., 'baseline': ...}."""
  kw = dict(max_new_tokens=NEW, stop_tokens=())
  return {'scone': _gen(parts, 'device').generate(PROMPTS, **kw),
          'baseline': _gen(parts, None).generate(PROMPTS, **kw)}


def _split_on(array, axis: int, parts: int = 8):
  """The array is split `parts` ways along `axis` (each device a 1/parts slice), not copied."""
  assert not array.sharding.is_fully_replicated, array.sharding
  shapes = {s.data.shape for s in array.addressable_shards}
  want = list(array.shape)
  want[axis] //= parts
  assert shapes == {tuple(want)}, (shapes, array.shape, array.sharding)


def _assert_params_split(params):
  layer = params['decoder']['layers']  # scanned: [layers, ...]
  _split_on(layer['attention']['query']['kernel'], 2)   # [L, d, heads, kv]
  _split_on(layer['attention']['out']['kernel'], 1)     # [L, heads, kv, d]
  _split_on(layer['mlp']['wi']['kernel'], 2)            # [L, d, mlp]
  _split_on(layer['mlp']['wo']['kernel'], 1)            # [L, mlp, d]
  _split_on(params['lm_head']['kernel'], 1)             # [d, vocab]: 16 divides over 8


def _assert_cache_split(cache):
  attention = cache['decoder']['layers']['attention']
  for name in ('cached_key', 'cached_value'):  # [L, B, S, heads, kv]
    _split_on(attention[name], 3)


# ----------------------------------------------------------------------------- the flag


def test_mesh_flag_and_refusals(parts):
  assert sharding.serving_mesh('') is None
  assert dict(sharding.serving_mesh('tensor:4').shape) == {'data': 1, 'fsdp': 1, 'tensor': 4}
  assert sharding.serving_mesh('2').shape['tensor'] == 2
  assert sharding.serving_mesh('tensor:-1').shape['tensor'] == len(jax.local_devices())
  for bad, match in (('data:2', 'tensor axis only'), ('tensor:x', 'expected tensor:N'),
                     ('0', 'expected tensor:N'), ('tensor:16', 'needs 16 devices but this '
                                                                'host has 8')):
    with pytest.raises(ValueError, match=match):
      sharding.serving_mesh(bad)
  mc, params, _, _ = parts
  with pytest.raises(ValueError, match='8 attention heads, not divisible by 3'):
    serving.Generator(mc, params, None, None, use_table=False, seq_len=32,
                      mesh=sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 3},
                                              jax.devices()[:3]))
  # A vocab that does not divide is replicated along the vocab, not refused.
  rules = dict(serving.mesh_rules(model_lib.ModelConfig(
      vocab_size=12, num_layers=1, d_model=DIM, num_heads=HEADS, head_dim=4, mlp_dim=64),
      sharding.serving_mesh('tensor:8')))
  assert rules['vocab'] is None and rules['heads'] == rules['mlp'] == 'tensor'
  # Training has its own mesh (config.mesh): --mesh there is a usage error, not ignored.
  out = subprocess.run([sys.executable, '-m', 'scone_jax.main', '--mode=train', '--mesh=8'],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2 and 'error: --mesh is for serve, generate and eval' in out.stderr


# ----------------------------------------------------------------------------- Generator


@pytest.mark.parametrize('storage', ['host', pytest.param('ram', marks=pytest.mark.slow),
                                     pytest.param(None, marks=pytest.mark.slow)])
def test_generate_on_8_devices_equals_one_device(parts, mesh, one_device, storage):
  gen = _gen(parts, storage, mesh)
  got = gen.generate(PROMPTS, max_new_tokens=NEW, stop_tokens=())
  assert got == one_device['scone' if storage else 'baseline']
  _assert_params_split(gen.params)
  if storage is None:
    # Sampling too: the same keys (seed, token index), and the random bits do not depend on the sharding.
    kw = dict(max_new_tokens=NEW, stop_tokens=(), temperature=1.0, top_k=8, seed=4)
    assert gen.generate(PROMPTS, **kw) == _gen(parts, None).generate(PROMPTS, **kw)
  if storage == 'host':
    assert one_device['scone'] != one_device['baseline']  # the table's rows change the tokens
    # Host memory still, one copy in all: each device holds d/8 columns of every row.
    rows = gen.table.device_rows
    assert rows.sharding.memory_kind == 'pinned_host'
    _split_on(rows, 1)
    # The prompt's cache after prefill is split on heads too (the loop keeps it so: the
    # engine test below checks the cache after decode chunks).
    n = len(PROMPTS)
    batch = gen.prompt_batch([np.array(p, np.int64) for p in PROMPTS], [True] * n, [NEW] * n,
                             decode.PREFILL_BUCKET)
    _, state = gen.prefill_fn(decode.CACHE_BUCKET, decode.Flags())(
        gen.params, gen.table_operand, gen.matcher, batch,
        decode.make_options(n, gen.config.vocab_size), gen.stop_mask(()))
    _assert_cache_split(state.cache)


@pytest.mark.slow
def test_eval_on_8_devices_equals_one_device(parts, mesh):
  """The eval step (evaluate's per-batch loss) sharded: the same NLL to float32 rounding."""
  rng = np.random.default_rng(1)
  ids = rng.integers(2, 6, (2, 16)).astype(np.int32)
  fid = np.where(rng.random((2, 16)) < 0.5, rng.integers(0, len(parts[2]), (2, 16)), -1)
  ints = np.stack([ids, np.tile(np.arange(16), (2, 1)), fid, np.ones_like(ids)],
                  -1).astype(np.int32)
  segments, mask = np.ones((2, 16), np.int32), np.ones((2, 16), np.int32)
  targets = np.roll(ids, -1, axis=1)
  out = []
  for m in (None, mesh):
    gen = _gen(parts, 'host', m)
    rows = gen.rows_for(fid)
    out.append(jax.device_get(gen._eval_step()(gen.params, rows, ints, segments, targets,
                                               mask)))
  np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-5, atol=1e-5)
  assert abs(float(out[1][0]) - float(out[0][0])) < 1e-4


# ----------------------------------------------------------------------------- Engine


@pytest.mark.parametrize('storage', ['host', pytest.param('device', marks=pytest.mark.slow),
                                     pytest.param('ram', marks=pytest.mark.slow)])
def test_int8_table_on_8_devices_equals_one_device(parts, mesh, storage):
  """--table_dtype=int8 with --mesh: rows split along d like a float table, per-row scales
  on every device, tokens equal one device's."""
  mc, params, fs, table = parts
  q, s = table_lib.quantize_rows(table)
  kw = dict(max_new_tokens=12, stop_tokens=())

  def gen(m, placed_on=None):
    placed = serving.place_table(q, storage, mesh=placed_on, scales_S=s)
    return serving.Generator(mc, params, placed, fs, seq_len=32, max_len=64, mesh=m)

  one = gen(None).generate(PROMPTS, **kw)
  eight = gen(mesh, placed_on=mesh)
  assert eight.generate(PROMPTS, **kw) == one
  if storage != 'ram':
    assert not eight.table.device_rows.sharding.is_fully_replicated
    assert eight.table.scales.sharding.is_fully_replicated
  # A one-device int8 table handed to a mesh Generator is moved there, scales too.
  assert gen(mesh).generate(PROMPTS, **kw) == one


def _engine_run(gen):
  """The PROMPTS through an Engine of 2 slots (slots reused): tokens and logprobs each."""
  engine = engine_lib.Engine(gen, 2, tokens_per_dispatch=4)
  toks = {i: [] for i in range(len(PROMPTS))}
  lps = {i: [] for i in range(len(PROMPTS))}

  def on_event(i):
    def f(kind, *a):
      if kind == 'token':
        toks[i].append(a[0])
        lps[i].append(np.concatenate([[a[1]['logprob']], a[1]['top_logprob']]))
      assert kind != 'error', a
    return f

  for i, p in enumerate(PROMPTS):
    engine.submit(engine_lib.Request(np.array(p, np.int64), NEW, on_event(i), ignore_eos=True,
                                     logprobs=3))
  while engine.load()['pending'] or engine.load()['active']:
    engine.iterate()
  assert engine.stats['shared_steps'] > 0
  return ([toks[i] for i in range(len(PROMPTS))], [np.stack(lps[i]) for i in range(len(PROMPTS))],
          engine)


@pytest.mark.slow
def test_engine_on_8_devices_equals_one_device(parts, mesh, one_device):
  """The server's path: requests joining and leaving slots of a sharded cache."""
  toks, lps, engine = _engine_run(_gen(parts, 'host', mesh))
  assert toks == one_device['scone']
  _assert_cache_split(engine.state.cache)  # after prefills into slots and decode chunks
  _, want_lps, _ = _engine_run(_gen(parts, 'host'))
  for got, want in zip(lps, want_lps):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the CLI server


def _build_export(root: str) -> str:
  """test_server's tiny SCONE export (untrained weights) with 8 heads of 4."""
  return tiny.untrained_export(root, model={'num_heads': HEADS, 'head_dim': 4})[0]


@pytest.mark.slow
def test_server_with_mesh_answers_as_one_device(tmp_path):
  """--mode=serve --mesh=tensor:8 (8 fake CPU devices) over an export with 8 heads: the
  openai client's greedy completions equal serving.load(export).generate on one device."""
  export_dir = _build_export(str(tmp_path))
  gen = serving.load(export_dir)
  assert gen.config.num_heads == HEADS
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  bad = subprocess.run([sys.executable, '-m', 'scone_jax.main', '--mode=generate',
                        f'--export_dir={export_dir}', '--prompt=x', '--mesh=tensor:3'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      'error: --mesh=tensor:3: the model has 8 attention heads'), bad.stderr[-2000:]
  log_path = str(tmp_path / 'server.log')
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'scone_jax.main', '--mode=serve', f'--export_dir={export_dir}',
         '--port=0', '--max_batch=2', '--mesh=tensor:8', '--warmup=shortest'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
      line = proc.stdout.readline()  # the server's first line says where it listens
      assert line.startswith('serving on '), open(log_path).read()[-3000:]
      client = openai.OpenAI(base_url=line.split()[-1] + '/v1', api_key='none', max_retries=0,
                             timeout=120)
      for prompt in ('The nation must protect', '', 'Our people will build'):
        got = client.completions.create(model='export', prompt=prompt, max_tokens=10,
                                        temperature=0)
        ids = gen.tokenizer.encode(prompt).tolist()
        want = [t for t in gen.generate([ids], max_new_tokens=10)[0]
                if t != gen.tokenizer.eos_id]
        assert got.choices[0].text == gen.tokenizer.decode(want), prompt
    finally:
      proc.kill()
      proc.wait()
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 8}" in open(log_path).read()
