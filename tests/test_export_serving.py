"""Export and serving: table == A_fgram, eval/decode == the checkpoint's model, refusals, CLI."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

from flax import linen as nn
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scone_jax import artifacts
from scone_jax import packing
from scone_jax import export
from scone_jax import fgrams
from scone_jax import model as model_lib
from scone_jax import decode
from scone_jax import serving
from scone_jax import step_batch
from scone_jax import train
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNKS_PER_SHARD = 2  # 200 f-grams, 32 rows per chunk: 4 shard files
STEPS = 4


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny SCONE run trained for a few steps and checkpointed, and its float32 export."""
  root = tmp_path_factory.mktemp('export')
  corpus_dir = str(root / 'corpus')
  tiny.write_corpus(corpus_dir)
  cfg = tiny.tiny_config(corpus_dir, steps=STEPS)
  workdir = str(root / 'work')
  run = artifacts.prepare_run(cfg, workdir)
  cfg.tokenizer.path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  # The training loop's own pieces, without its eval and TensorBoard: seconds, not tens.
  trainer = train.create_trainer(cfg, workdir, run)
  loader, _ = train.make_loaders(cfg, workdir, run)
  for step in range(STEPS):
    sb, _ = step_batch.make_step_batch(loader.batch_at(step), run.fgram_set, cfg)
    trainer.state, _ = trainer.train_step(
        trainer.state, step_batch.device_put_batch(sb, trainer.batch_shardings),
        jax.random.PRNGKey(1))
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': STEPS})
  mngr.wait_until_finished()
  mngr.close()
  export_dir = str(root / 'export_f32')
  summary = export.export(cfg, workdir, run, export_dir, chunks_per_shard=CHUNKS_PER_SHARD)
  return types.SimpleNamespace(
      root=root, corpus_dir=corpus_dir, cfg=cfg, workdir=workdir, run=run, trainer=trainer,
      params=jax.device_get(trainer.state.params), export_dir=export_dir, summary=summary,
      gen=serving.load(export_dir))


@pytest.fixture(scope='module')
def bf16_export(setup):
  cfg = tiny.copy_config(setup.cfg)
  cfg.export.dtype = 'bfloat16'
  export_dir = str(setup.root / 'export_bf16')
  export.export(cfg, setup.workdir, setup.run, export_dir, chunks_per_shard=CHUNKS_PER_SHARD)
  return export_dir


def _reference_rows(setup):
  """A_fgram on each f-gram alone: windows exactly as long as the f-gram, no padding."""
  fs = setup.run.fgram_set
  rows = np.zeros((len(fs), setup.cfg.model.d_model), np.float32)
  for n in np.unique(fs.lengths):
    ids = np.flatnonzero(fs.lengths == n)
    toks = fs.tokens_padded[ids, :n]
    rows[ids] = setup.trainer.model.apply(
        {'params': setup.params}, toks, np.full(ids.size, n, np.int32),
        method=model_lib.SconeLM.fgram_embed)
  return rows


# ----------------------------------------------------------------------------- export


def test_table_rows_are_the_fgram_model_outputs(setup):
  ref = _reference_rows(setup)
  assert setup.summary['rows'] == len(setup.run.fgram_set) == 200
  assert setup.summary['step'] == STEPS and setup.summary['dtype'] == 'float32'
  table = export.open_table(os.path.join(setup.export_dir, export.TABLE_DIR))
  stored = table.read().result()
  assert stored.dtype == np.float32 and stored.shape == ref.shape
  np.testing.assert_allclose(stored, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(setup.gen.table.array, stored)
  meta = json.load(open(os.path.join(setup.export_dir, export.METADATA_FILE)))
  assert meta['fgram_fingerprint'] == setup.run.fgram_set.fingerprint
  assert meta['tokenizer_fingerprint'] == setup.run.tokenizer.fingerprint
  assert meta['step'] == STEPS and meta['layout']['chunks_per_shard'] == CHUNKS_PER_SHARD
  # The checksum is independent of the writer: per-shard sha256 of the rows, then of those.
  shard_rows = meta['layout']['rows_per_chunk'] * CHUNKS_PER_SHARD
  digests = [hashlib.sha256(stored[i:i + shard_rows].tobytes()).digest()
             for i in range(0, len(stored), shard_rows)]
  want = hashlib.sha256(b'scone_jax.table.v1' + b''.join(digests)).hexdigest()
  assert meta['table_sha256'] == want
  assert not os.path.exists(setup.export_dir + export.PARTIAL_SUFFIX)


def test_bf16_table_within_bf16_tolerance(setup, bf16_export):
  ref = _reference_rows(setup)
  gen = serving.load(bf16_export)
  rows = gen.table.array
  assert rows.dtype == ml_dtypes.bfloat16
  scale = np.abs(ref).max()
  np.testing.assert_allclose(rows.astype(np.float32), ref, rtol=1e-2, atol=1e-2 * scale)
  assert not np.array_equal(rows.astype(np.float32), ref)  # it really is rounded
  want = train.eval_documents(setup.trainer, setup.run.heldout_docs)
  got = gen.evaluate(setup.run.heldout_docs)
  assert got['tokens'] == want['tokens']
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=5e-3)


def test_export_refuses_to_overwrite_a_directory_that_is_not_an_export(setup, tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='is not an export'):
    export.export(setup.cfg, setup.workdir, setup.run, str(tmp_path))
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_export_is_kept_when_already_complete(setup):
  again = export.export(setup.cfg, setup.workdir, setup.run, setup.export_dir,
                        chunks_per_shard=CHUNKS_PER_SHARD)
  assert again['skipped'] and again['rows_computed'] == 0


# ----------------------------------------------------------------------------- serving


def test_eval_via_export_matches_checkpoint_eval(setup):
  want = train.eval_documents(setup.trainer, setup.run.heldout_docs)
  got = setup.gen.evaluate(setup.run.heldout_docs)
  assert got['tokens'] == want['tokens'] and got['batches'] == want['batches']
  # fp32 table and compute: equal to fp32 rounding (measured 2e-8 relative), not bitwise:
  # the f-gram model runs at other batch shapes here than inside the training graph.
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
  np.testing.assert_allclose(got['ppl'], want['ppl'], rtol=1e-5)
  np.testing.assert_allclose(got['bits_per_byte'], want['bits_per_byte'], rtol=1e-6)
  assert 0.2 < got['fgram_match_rate'] < 1.0  # the table is actually used
  for storage in ('device', 'ram', 'mmap', 'tensorstore'):
    other = serving.load(setup.export_dir, storage).evaluate(setup.run.heldout_docs)
    assert other['loss'] == got['loss'], storage


def test_table_storages_give_the_same_rows(setup):
  ids = np.array([0, 199, 5, 5, 64, 63, 128])
  want = setup.gen.table.array[ids]
  gens = {}
  for storage in serving.STORAGES:
    gens[storage] = serving.load(setup.export_dir, storage, cache_rows=40)
    np.testing.assert_array_equal(gens[storage].lookup(ids), want)
  assert os.path.isfile(os.path.join(setup.export_dir, serving.MMAP_FILE))
  # Decoding with rows gathered by the step (device, host) or read by host lookups called
  # from it (ram, mmap, tensorstore) gives the same tokens.
  prompts = _prompts(setup)
  want = setup.gen.generate(prompts, max_new_tokens=6, stop_tokens=())
  for storage, gen in gens.items():
    assert gen.generate(prompts, max_new_tokens=6, stop_tokens=()) == want, storage
  assert setup.gen.table.storage == serving.DEFAULT_STORAGE == 'host'


def test_one_and_sixteen_tokens_per_dispatch_agree(setup):
  prompts = _prompts(setup)
  kw = dict(max_new_tokens=12, stop_tokens=())
  assert (setup.gen.generate(prompts, tokens_per_dispatch=1, **kw)
          == setup.gen.generate(prompts, tokens_per_dispatch=16, **kw))


def _prompts(setup):
  tok = setup.run.tokenizer
  text = setup.run.heldout_docs[0].text
  return [tok.encode(text)[:11].tolist(), tok.encode(text[40:])[:4].tolist(), [],
          tok.encode('The congress will build')[:6].tolist()]


def _full_forward_logits(setup, prompt, generated):
  """Logits of the checkpoint's SCONE model (A_fgram, not the table) over the whole sequence."""
  doc = np.asarray(list(prompt) + list(generated[:-1]), np.int32)
  inputs = np.concatenate([[packing.BOS_ID], doc]).astype(np.int32)
  ids = np.full(inputs.size, -1, np.int32)
  if doc.size:
    ids[1:] = setup.run.fgram_set.match(doc)[0]
  length = 64  # right-padded; one shape for every row
  pad = length - inputs.size
  batch = {'fgram_ids': np.pad(ids, (0, pad), constant_values=-1)[None]}
  deduped = step_batch.dedupe_fgrams(batch, setup.run.fgram_set, pack_len=8, bucket=8)
  logits = setup.trainer.model.apply(
      {'params': setup.params}, np.pad(inputs, (0, pad))[None],
      positions_BxL=np.arange(length, dtype=np.int32)[None],
      segment_ids_BxL=(np.arange(length) < inputs.size).astype(np.int32)[None],
      fgram_index_BxL=deduped['fgram_index'],
      fgram_tokens_RxP=deduped['fgram_tokens'], fgram_positions_RxP=deduped['fgram_positions'])
  return np.asarray(logits[0, len(prompt):inputs.size])  # predictions of generated[0..]


def test_cached_greedy_decode_matches_full_recompute(setup):
  prompts = _prompts(setup)
  outs = setup.gen.generate(prompts, max_new_tokens=12, stop_tokens=())
  assert [len(o) for o in outs] == [12] * len(prompts)
  for prompt, out in zip(prompts, outs):
    logits = _full_forward_logits(setup, prompt, out)
    for t, token in enumerate(out):
      # The chosen token is the argmax (up to float ties) of the full recompute.
      assert logits[t, token] >= logits[t].max() - 1e-4, (prompt, t, token, logits[t].argmax())
  # Batch composition does not change a row's greedy continuation.
  alone = setup.gen.generate([prompts[1]], max_new_tokens=12, stop_tokens=())
  assert alone[0] == outs[1]


def test_sampling_is_reproducible_and_stop_tokens_stop(setup):
  gen, prompts = setup.gen, _prompts(setup)
  kw = dict(max_new_tokens=10, stop_tokens=())
  a = gen.generate(prompts, temperature=1.0, seed=7, **kw)
  assert gen.generate(prompts, temperature=1.0, seed=7, **kw) == a
  assert gen.generate(prompts, temperature=1.0, seed=8, **kw) != a
  greedy = gen.generate(prompts, **kw)
  assert gen.generate(prompts, temperature=0.7, top_k=1, seed=3, **kw) == greedy
  assert gen.generate(prompts, temperature=0.7, top_p=1e-6, seed=3, **kw) == greedy
  nucleus = gen.generate(prompts, temperature=1.0, top_k=5, top_p=0.9, seed=7, **kw)
  assert all(0 <= t < gen.config.vocab_size for row in nucleus for t in row)

  stop = greedy[0][3]
  outs = gen.generate(prompts, max_new_tokens=10, stop_tokens=(stop,))
  for full, out in zip(greedy, outs):
    want = full[:full.index(stop) + 1] if stop in full else full
    assert out == want


def test_too_long_generation_is_refused(setup):
  gen = serving.load(setup.export_dir, max_len=40)
  gen.generate([[5] * 20], max_new_tokens=20)  # 21 + 19 positions: fits exactly
  with pytest.raises(ValueError, match='positions'):
    gen.generate([[5] * 20], max_new_tokens=21)


def test_learned_positions_cap_the_length():
  mc = model_lib.ModelConfig(vocab_size=50, num_layers=1, d_model=16, num_heads=2, head_dim=8,
                             mlp_dim=32, position='learned', max_seq_len=24, dtype='float32')
  model = model_lib.SconeLM(mc)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))['params'])
  gen = serving.Generator(mc, params, None, None, use_table=False, seq_len=24)
  # BOS + 3 prompt tokens + 20 fed back = 24 positions: exactly the table.
  assert len(gen.generate([[3, 4, 5]], max_new_tokens=21, stop_tokens=())[0]) == 21
  with pytest.raises(ValueError, match='learned positions'):
    gen.generate([[3, 4, 5]], max_new_tokens=22)
  with pytest.raises(ValueError, match='learned positions'):
    serving.Generator(mc, params, None, None, use_table=False, seq_len=24, max_len=25)


def test_sampling_filters_keep_the_right_tokens():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = np.log(np.tile(probs, (4000, 1))).astype(np.float32)
  n = logits.shape[0]
  keys = decode.row_keys(np.arange(n, dtype=np.int32), np.zeros(n, np.int32))
  sample_rows = jax.jit(decode.sample_rows, static_argnames='sampling')
  sample = lambda top_p=1.0, top_k=0: np.asarray(sample_rows(
      logits, np.ones(n, np.float32), np.full(n, top_p, np.float32),
      np.full(n, top_k, np.int32), keys, sampling=True))
  counts = np.bincount(sample(top_p=0.8), minlength=4)
  assert counts[2] == counts[3] == 0  # {0, 1} is the smallest set with mass >= 0.8
  np.testing.assert_allclose(counts[0] / counts[:2].sum(), 0.5 / 0.8, atol=0.03)
  counts = np.bincount(sample(top_k=3), minlength=4)
  assert counts[3] == 0 and counts[2] > 0
  np.testing.assert_allclose(counts[:3] / counts.sum(), probs[:3] / 0.95, atol=0.03)


def test_the_smallest_top_p_keeps_the_most_probable_token():
  """top_p = 1e-38 (float32 flushes it to 0 on some backends) samples the top token, never
  token 0 for want of any kept token."""
  logits = np.log(np.tile([0.1, 0.2, 0.6, 0.1], (64, 1))).astype(np.float32)
  n = logits.shape[0]
  keys = decode.row_keys(np.arange(n, dtype=np.int32), np.zeros(n, np.int32))
  for top_p in (1e-38, 1e-45, 1e-6):
    got = decode.sample_rows(logits, np.ones(n, np.float32), np.full(n, top_p, np.float32),
                             np.zeros(n, np.int32), keys, sampling=True)
    assert (np.asarray(got) == 2).all(), top_p


def test_penalties_and_bias_follow_openai(setup):
  """logit_bias moves a token to the top (greedy too); a frequency penalty stops a repeat."""
  gen = setup.gen
  prompt = [gen.tokenizer.encode('The nation')]
  plain = gen.generate(prompt, max_new_tokens=6, stop_tokens=())[0]
  target = (plain[0] + 7) % gen.config.vocab_size
  biased = gen.generate(prompt, max_new_tokens=6, stop_tokens=(), logit_bias={target: 100.0})
  assert biased[0] == [target] * 6
  # Penalised: the token the bias pushes loses 200 per use, so it is never chosen twice.
  both = gen.generate(prompt, max_new_tokens=6, stop_tokens=(), logit_bias={target: 100.0},
                      frequency_penalty=2.0 * 100)
  assert both[0][0] == target and target not in both[0][1:]


def test_generate_text(setup):
  texts = setup.gen.generate_text(['The nation', 'Our people will'], max_new_tokens=8)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_serving_never_builds_the_fgram_set_hash_table(setup):
  """load + generate + evaluate match prompts and eval documents with the step's matcher
  arrays (device_match.HostMatcher): the f-gram set's host hash table (~170 B per f-gram,
  17 GB at 100M) is never built. Their results equal the hash table's by
  test_eval_via_export_matches_checkpoint_eval and
  test_decode_loop.test_prompts_are_matched_like_the_fgram_set_without_its_hash_table."""
  gen = serving.load(setup.export_dir)
  gen.generate_text(['The nation'], max_new_tokens=4)
  got = gen.evaluate(setup.run.heldout_docs)
  assert gen.fgram_set._table is None  # pylint: disable=protected-access
  assert got['fgram_match_rate'] > 0.2


def test_serving_never_touches_the_fgram_model(setup):
  params_dir = os.path.join(setup.export_dir, export.PARAMS_DIR)
  raw = ocp.StandardCheckpointer().restore(params_dir)
  assert set(raw) == {'token_embed', 'decoder', 'lm_head'}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw),
               {k: v for k, v in setup.params.items() if k != 'fgram_model'})
  gen = setup.gen
  assert not gen.config.fgrams_enabled and 'fgram_model' not in gen.params
  with pytest.raises(ValueError, match='f-gram model'):
    serving.Generator(gen.config, setup.params, gen.table, gen.fgram_set, seq_len=32)


# ----------------------------------------------------------------------------- refusals


def _broken_copy(setup, tmp_path):
  dst = str(tmp_path / 'export')
  shutil.copytree(setup.export_dir, dst, ignore=shutil.ignore_patterns(serving.MMAP_FILE + '*'))
  return dst


def test_table_from_another_fgram_set_is_refused(setup, tmp_path):
  broken = _broken_copy(setup, tmp_path)
  fs = setup.run.fgram_set
  other = fgrams.FGramSet.from_ngrams([fs.ngram(i) for i in range(len(fs) - 1, -1, -1)],
                                      max_len=fs.max_len)  # same f-grams, other order
  other.save(os.path.join(broken, export.FGRAMS_FILE))
  with pytest.raises(ValueError, match='exported for f-gram set'):
    serving.load(broken)


@pytest.mark.parametrize('damage', ['overwrite', 'truncate'])
def test_damaged_table_is_refused(setup, tmp_path, damage):
  broken = _broken_copy(setup, tmp_path)
  shard = os.path.join(broken, export.TABLE_DIR, 'c', '1', '0')
  if damage == 'overwrite':
    with open(shard, 'r+b') as f:
      f.seek(200)
      f.write(b'\x13\x37\xbe\xef' * 4)
    match = 'corrupt'
  else:
    with open(shard, 'r+b') as f:
      f.truncate(os.path.getsize(shard) // 2)
    match = 'truncated'
  for storage in ('ram', 'mmap'):
    with pytest.raises(ValueError, match=match):
      serving.load(broken, storage)
  if damage == 'overwrite':
    gen = serving.load(broken, 'tensorstore')  # shape and sizes are fine, rows are not read
    with pytest.raises(ValueError):
      gen.lookup([70])  # a row of shard 1: its chunk fails its crc32c
    with pytest.raises(ValueError, match='corrupt'):
      serving.load(broken, 'tensorstore', verify=True)


def test_damaged_mmap_copy_is_refused(setup, tmp_path):
  broken = _broken_copy(setup, tmp_path)
  serving.load(broken, 'mmap')
  path = os.path.join(broken, serving.MMAP_FILE)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) - 100)
    f.write(b'\x7f' * 8)
  with pytest.raises(ValueError, match='corrupt'):
    serving.load(broken, 'mmap')


@pytest.mark.parametrize('piece', [export.TOKENIZER_FILE, export.PARAMS_DIR,
                                   export.METADATA_FILE])
def test_missing_piece_is_refused(setup, tmp_path, piece):
  broken = _broken_copy(setup, tmp_path)
  path = os.path.join(broken, piece)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  err = ValueError if piece == export.METADATA_FILE else FileNotFoundError
  with pytest.raises(err, match='did not complete' if err is ValueError else piece):
    serving.load(broken)


def test_edited_pieces_are_refused(setup, tmp_path):
  broken = _broken_copy(setup, tmp_path)
  path = os.path.join(broken, export.MODEL_CONFIG_FILE)
  cfg = json.load(open(path))
  cfg['model']['num_layers'] = 1
  json.dump(cfg, open(path, 'w'))
  with pytest.raises(ValueError, match='model config'):
    serving.load(broken)
  shutil.copyfile(os.path.join(setup.export_dir, export.MODEL_CONFIG_FILE), path)
  params_file = sorted(os.path.join(r, f) for r, _, fs in os.walk(
      os.path.join(broken, export.PARAMS_DIR)) for f in fs)[-1]
  with open(params_file, 'ab') as f:
    f.write(b'x')
  with pytest.raises(ValueError, match='parameter checkpoint'):
    serving.load(broken)


def test_interrupted_export_is_refused_then_resumes(setup, tmp_path, monkeypatch):
  export_dir = str(tmp_path / 'export')
  real_write = export._write_shard  # pylint: disable=protected-access
  calls = []

  def crash_after(k):
    def write(store, lo, rows):
      calls.append(lo)
      if len(calls) > k:
        raise RuntimeError('simulated crash')
      return real_write(store, lo, rows)
    return write

  def run(chunks_per_shard):
    return export.export(setup.cfg, setup.workdir, setup.run, export_dir,
                         chunks_per_shard=chunks_per_shard)

  # A crash with another table layout first: its shards must not be reused below.
  monkeypatch.setattr(export, '_write_shard', crash_after(3))
  with pytest.raises(RuntimeError, match='simulated crash'):
    run(1)
  calls.clear()
  monkeypatch.setattr(export, '_write_shard', crash_after(2))
  with pytest.raises(RuntimeError, match='simulated crash'):
    run(CHUNKS_PER_SHARD)
  assert not os.path.exists(export_dir)
  with pytest.raises(ValueError, match='interrupted'):
    serving.load(export_dir)
  partial = export_dir + export.PARTIAL_SUFFIX
  progress = json.load(open(os.path.join(partial, 'progress.0.json')))
  assert progress['request']['layout']['chunks_per_shard'] == CHUNKS_PER_SHARD
  done = sorted(int(s) for s in progress['done'])
  assert done and len(done) <= 2 and set(done) <= {0, 1}

  calls.clear()
  monkeypatch.setattr(export, '_write_shard', crash_after(100))
  summary = run(CHUNKS_PER_SHARD)
  assert len(calls) == 4 - len(done)  # only the missing shards were computed again
  assert summary['rows_computed'] == 200 - 64 * len(done)
  gen = serving.load(export_dir)
  np.testing.assert_array_equal(gen.table.array, setup.gen.table.array)
  assert gen.metadata['table_sha256'] == setup.gen.metadata['table_sha256']
  assert not os.path.exists(partial)
  assert not any(n.startswith('progress') for n in os.listdir(export_dir))


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.Popen([sys.executable, '-m', 'scone_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


@pytest.mark.slow
def test_cli_export_generate_eval(setup, tmp_path):
  config = tiny.write_config_file(str(tmp_path / 'cfg.py'), setup.corpus_dir, steps=STEPS,
                                  tokenizer=setup.cfg.tokenizer.path)
  export_dir = str(tmp_path / 'cli_export')
  eval_file = os.path.join(setup.corpus_dir, 'eval.txt')
  common = [f'--config={config}', f'--workdir={setup.workdir}']
  # Two at a time: these are independent, and each one mostly waits on imports and compiles.
  p_export = _cli('--mode=export', *common, f'--export_dir={export_dir}',
                  '--config.export.rows_per_chunk=16')
  p_eval = _cli('--mode=eval', *common, f'--eval_text={eval_file}')
  summary = json.loads(_finish(p_export).strip().splitlines()[-1])
  want = json.loads(_finish(p_eval).strip().splitlines()[-1])
  assert summary['rows'] == 200 and summary['step'] == STEPS

  p_gen = _cli('--mode=generate', f'--export_dir={export_dir}', '--prompt=The nation',
               '--max_new_tokens=8')
  p_eval = _cli('--mode=eval', f'--export_dir={export_dir}', f'--eval_text={eval_file}',
                '--table_storage=mmap')
  text = _finish(p_gen)
  got = json.loads(_finish(p_eval).strip().splitlines()[-1])
  assert "=== 'The nation'" in text and '\nThe nation' in text
  assert got['tokens'] == want['tokens']
  np.testing.assert_allclose(got['ppl'], want['ppl'], rtol=1e-5)


@pytest.mark.slow
def test_same_seed_same_tokens_everywhere(setup):
  """One request, greedy and sampled (seed 7, temperature 1): Generator.generate alone and
  batched, the Engine alone and beside other requests, --mode=generate and the HTTP server
  (openai client, alone and with concurrent requests) all continue it with the same tokens:
  token i is drawn with the key (seed, i) only."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import openai  # pylint: disable=g-import-not-at-top
  from scone_jax import engine as engine_lib  # pylint: disable=g-import-not-at-top
  gen, tok = setup.gen, setup.gen.tokenizer
  prompt, others = 'The Congress shall', ['Our people will', 'The nation must protect']
  ids, other_ids = tok.encode(prompt), [tok.encode(p) for p in others]
  new = 12
  text = lambda toks: tok.decode([t for t in toks if t != tok.eos_id])
  want = {}
  for temperature in (0.0, 1.0):
    kw = dict(max_new_tokens=new, temperature=temperature, stop_tokens=(tok.eos_id,))
    alone = gen.generate([ids], seed=7, **kw)[0]
    assert gen.generate(other_ids + [ids], seed=[3, 4, 7], **kw)[2] == alone
    got = {}
    engine = engine_lib.Engine(gen, 4)
    for i, p in enumerate(other_ids + [ids]):
      engine.submit(engine_lib.Request(np.asarray(p), new, temperature=temperature,
                                       seed=3 + i if i < 2 else 7, on_event=(
          lambda kind, *a, i=i: got.setdefault(i, []).append(a[0]) if kind == 'token'
          else None)))
    while engine.load()['pending'] or engine.load()['active']:
      engine.iterate()
    assert got[2] == alone and engine.stats['shared_steps'] > 0
    want[temperature] = text(alone)
  cli = _finish(_cli('--mode=generate', f'--export_dir={setup.export_dir}',
                     f'--prompt={prompt}', f'--max_new_tokens={new}', '--temperature=1',
                     '--seed=7'))
  assert f'\n{prompt}{want[1.0]}\n' in cli + '\n', (cli, want[1.0])
  proc = _cli('--mode=serve', f'--export_dir={setup.export_dir}', '--port=0',
              '--max_batch=4', '--warmup=shortest')
  try:
    line = proc.stdout.readline()
    assert line.startswith('serving on '), proc.stderr.read()[-3000:] if proc.poll() else line
    client = openai.OpenAI(base_url=line.split()[-1] + '/v1', api_key='none', max_retries=0,
                           timeout=300)
    ask = lambda p, t, s: client.completions.create(
        model=os.path.basename(setup.export_dir), prompt=p, max_tokens=new, temperature=t,
        seed=s).choices[0].text
    for temperature in (0.0, 1.0):
      assert ask(prompt, temperature, 7) == want[temperature]
      with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, p, temperature, s)
                   for p, s in ((others[0], 3), (prompt, 7), (others[1], 4))]
        assert futures[1].result() == want[temperature]
  finally:
    proc.kill()
    proc.communicate()
