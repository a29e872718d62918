"""--fgram_set: export a table for another f-gram set (a domain's, a union, a longer K) and
serve it; extraction of a domain with no held-out split."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax import corpus
from scone_jax import device_match
from scone_jax import export
from scone_jax import fgrams
from scone_jax import metrics
from scone_jax import model as model_lib
from scone_jax import packing
from scone_jax import serving
from scone_jax import train
import reference
import tiny

_DOMAIN = (['the court', 'the defendant', 'the plaintiff', 'this agreement', 'the tenant',
            'the landlord', 'any party'],
           ['shall pay', 'may terminate', 'hereby grants', 'shall indemnify', 'must notify'],
           ['the rent when due', 'all reasonable costs', 'written notice within thirty days',
            'the premises', 'such damages as are proven'])
_GROWN_K = 6


def _write_domain(directory, num_docs=30, seed=3):
  """A corpus unlike the run's (legal sentences): what a domain's f-grams come from."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  docs = []
  for _ in range(num_docs):
    words = [' '.join(part[rng.integers(len(part))] for part in _DOMAIN) + '.'
             for _ in range(int(rng.integers(3, 7)))]
    docs.append(' '.join(w[0].upper() + w[1:] for w in words))
  path = os.path.join(directory, 'domain.txt')
  with open(path, 'w') as f:
    f.write('\n\n'.join(docs) + '\n')
  return path


def _extract(cfg, workdir, **fgram_fields):
  """An extraction as --mode=extract runs it (no held-out split needed): its fgrams.npz."""
  cfg = tiny.copy_config(cfg)
  cfg.fgrams.update(fgram_fields)
  run = artifacts.prepare_run(cfg, workdir, need_heldout=False)
  return os.path.join(workdir, artifacts.FGRAMS_FILE), run


@pytest.fixture(scope='module')
def s(tmp_path_factory):
  """An untrained tiny SCONE run (a step-0 checkpoint), its own export, a domain's f-gram
  set and a K=6 set of its own corpus, both extracted with its tokenizer."""
  root = tmp_path_factory.mktemp('fgset')
  corpus_dir = str(root / 'corpus')
  tiny.write_corpus(corpus_dir, num_train=60, num_eval=4)
  cfg = tiny.tiny_config(corpus_dir)
  workdir = str(root / 'work')
  run = artifacts.prepare_run(cfg, workdir)
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 0})
  mngr.wait_until_finished()
  mngr.close()
  own_dir = str(root / 'export_own')
  export.export(cfg, workdir, run, own_dir)

  tok_cfg = tiny.copy_config(cfg)
  tok_cfg.tokenizer.path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  domain_cfg = tiny.copy_config(tok_cfg)
  domain_cfg.corpus.train_files = _write_domain(str(root / 'domain_corpus'))
  domain_cfg.corpus.eval_files = ''
  domain_cfg.corpus.heldout_fraction = 0.0
  # As many as the run's own (200): the same table layout, so only the set tells them apart.
  domain_path, domain_run = _extract(domain_cfg, str(root / 'domain'), num_fgrams=200)
  grown_path, _ = _extract(tok_cfg, str(root / 'grown'), max_len=_GROWN_K, num_fgrams=300)
  return types.SimpleNamespace(
      root=root, cfg=cfg, workdir=workdir, run=run, trainer=trainer,
      params=jax.device_get(trainer.state.params), own_dir=own_dir,
      own=serving.load(own_dir), domain_cfg=domain_cfg, domain_path=domain_path,
      domain_run=domain_run, grown_path=grown_path,
      own_path=os.path.join(workdir, artifacts.FGRAMS_FILE))


# ----------------------------------------------------------------------------- union


def test_union_keeps_each_fgram_once_ranked_by_summed_count():
  a = fgrams.FGramSet.from_ngrams([(1, 2), (3, 4, 5), (2, 2), (9, 9)], counts=[5, 3, 3, 2],
                                  max_len=3)
  b = fgrams.FGramSet.from_ngrams([(7, 8, 9, 1), (3, 4, 5), (1, 2), (0, 1)],
                                  counts=[6, 4, 1, 2], max_len=4)
  u = fgrams.union([a, b])
  got = [(u.ngram(i), int(u.counts[i])) for i in range(len(u))]
  # (3,4,5): 3+4; (1,2): 5+1; count ties by token tuple; (0,1) < (9,9).
  assert got == [((3, 4, 5), 7), ((1, 2), 6), ((7, 8, 9, 1), 6), ((2, 2), 3), ((0, 1), 2),
                 ((9, 9), 2)]
  assert u.max_len == 4
  assert fgrams.union([b, a]).fingerprint == u.fingerprint  # the order of the sets is moot
  assert fgrams.union([a]) is a
  assert fgrams.union([a, a]).ngram(0) == (1, 2) and len(fgrams.union([a, a])) == len(a)
  # It matches like a set built from the same list.
  want = fgrams.FGramSet.from_ngrams([g for g, _ in got], max_len=4)
  assert want.fingerprint == u.fingerprint
  with pytest.raises(ValueError, match='no f-gram sets'):
    fgrams.union([])


# ----------------------------------------------------------------------------- extraction


def test_extract_without_a_heldout_split_takes_every_document(s):
  run = s.domain_run
  assert run.heldout_docs == []
  docs = corpus.load_documents(s.domain_cfg.corpus, 'train')
  assert len(docs) == 30
  want = reference.reference_extract([run.tokenizer.encode(d.text) for d in docs],
                                     max_len=4, min_count=2, num_fgrams=200)
  got = fgrams.FGramSet.load(s.domain_path)
  assert [(got.ngram(i), int(got.counts[i])) for i in range(len(got))] == want
  # Training (and eval) still need a held-out split, and say so.
  with pytest.raises(ValueError, match='heldout split of corpus .text. is empty'):
    artifacts.prepare_run(s.domain_cfg, str(s.root / 'domain'))


# ----------------------------------------------------------------------------- refusals


def test_a_set_of_another_tokenizer_is_refused(s):
  other = tiny.copy_config(s.cfg)
  other.tokenizer.vocab_size = 300
  foreign = artifacts.prepare_run(other, str(s.root / 'foreign'))
  assert foreign.tokenizer.fingerprint != s.run.tokenizer.fingerprint
  path = os.path.join(str(s.root / 'foreign'), artifacts.FGRAMS_FILE)
  for paths in ([path], [s.own_path, path]):
    with pytest.raises(ValueError) as e:
      export.export(s.cfg, s.workdir, s.run, str(s.root / 'refused'), fgram_set_paths=paths)
    msg = str(e.value)
    assert '\n' not in msg
    assert foreign.tokenizer.fingerprint[:12] in msg and s.run.tokenizer.fingerprint[:12] in msg
  assert not os.path.exists(str(s.root / 'refused') + export.PARTIAL_SUFFIX)
  # A set whose tokenizer is unknown (no fgrams.json beside it) is refused too.
  bare = str(s.root / 'bare.npz')
  fgrams.FGramSet.load(s.domain_path).save(bare)
  with pytest.raises(ValueError, match='cannot tell which tokenizer'):
    export.export(s.cfg, s.workdir, s.run, str(s.root / 'refused'), fgram_set_paths=[bare])


# ----------------------------------------------------------------------------- a domain's set


def _fgram_rows(s, fgram_set):
  """A_fgram of every f-gram of a set, cut (here, independently of export) to the last K
  tokens the f-gram model has positions for."""
  k = s.cfg.fgrams.max_len
  windows = np.zeros((len(fgram_set), k), np.int32)
  lens = np.zeros(len(fgram_set), np.int32)
  for i in range(len(fgram_set)):
    g = fgram_set.ngram(i)[-k:]
    windows[i, :len(g)] = g
    lens[i] = len(g)
  return np.asarray(s.trainer.model.apply({'params': s.params}, windows, lens,
                                          method=model_lib.SconeLM.fgram_embed))


@pytest.mark.slow
def test_export_with_a_domain_set_serves_that_set(s):
  export_dir = str(s.root / 'export_domain')
  export.export(s.cfg, s.workdir, s.run, export_dir, fgram_set_paths=[s.domain_path])
  domain = fgrams.FGramSet.load(s.domain_path)
  gen = serving.load(export_dir)
  assert gen.fgram_set.fingerprint == domain.fingerprint != s.run.fgram_set.fingerprint
  meta = json.load(open(os.path.join(export_dir, 'export.json')))
  rec = meta['fgram_set']
  assert meta['fgram_fingerprint'] == rec['fingerprint'] == domain.fingerprint
  assert (rec['num_fgrams'], rec['max_len'], rec['trained_max_len']) == (200, 4, 4)
  assert rec['trained_fingerprint'] == s.run.fgram_set.fingerprint
  (src,) = rec['sources']
  assert src['corpus']['train_files'] == s.domain_cfg.corpus.train_files
  assert src['tokenizer_fingerprint'] == s.run.tokenizer.fingerprint
  own_src = json.load(open(os.path.join(s.own_dir, 'export.json')))['fgram_set']['sources'][0]
  assert own_src['corpus']['train_files'] == s.cfg.corpus.train_files
  np.testing.assert_allclose(gen.table.array, _fgram_rows(s, domain), rtol=1e-5, atol=1e-6)
  # Matching and eval follow the domain set: on the domain's text it matches more than
  # the run's own set does, on the run's text less.
  domain_docs = corpus.load_documents(s.domain_cfg.corpus, 'train')[:6]
  on_domain = gen.evaluate(domain_docs)['fgram_match_rate']
  assert on_domain > s.own.evaluate(domain_docs)['fgram_match_rate'] + 0.2
  assert (gen.evaluate(s.run.heldout_docs)['fgram_match_rate']
          < s.own.evaluate(s.run.heldout_docs)['fgram_match_rate'] - 0.2)


def test_resume_with_another_fgram_set_starts_over(s, monkeypatch):
  export_dir = str(s.root / 'export_resume')
  real_write = export._write_shard  # pylint: disable=protected-access
  calls = []

  def crash_after_two(store, lo, rows):
    calls.append(lo)
    if len(calls) > 2:
      raise RuntimeError('simulated crash')
    return real_write(store, lo, rows)

  monkeypatch.setattr(export, '_write_shard', crash_after_two)
  with pytest.raises(RuntimeError, match='simulated crash'):
    export.export(s.cfg, s.workdir, s.run, export_dir, chunks_per_shard=1,
                  fgram_set_paths=[s.domain_path])
  partial = export_dir + export.PARTIAL_SUFFIX
  assert json.load(open(os.path.join(partial, 'progress.0.json')))['done']
  monkeypatch.setattr(export, '_write_shard', real_write)
  summary = export.export(s.cfg, s.workdir, s.run, export_dir, chunks_per_shard=1)
  assert summary['rows_computed'] == len(s.run.fgram_set)  # nothing of the domain's reused
  gen = serving.load(export_dir)
  assert gen.fgram_set.fingerprint == s.run.fgram_set.fingerprint
  np.testing.assert_array_equal(gen.table.array, s.own.table.array)


# ----------------------------------------------------------------------------- a longer K


@pytest.fixture(scope='module')
def grown(s):
  """The run's own set united with a K=6 set of its corpus, exported: f-grams up to 6 long
  for an f-gram model with 4 positions."""
  export_dir = str(s.root / 'export_grown')
  export.export(s.cfg, s.workdir, s.run, export_dir,
                fgram_set_paths=[s.own_path, s.grown_path])
  return serving.load(export_dir)


def test_grown_table_embeds_long_fgrams_from_their_last_k_tokens(s, grown):
  fs = grown.fgram_set
  want = fgrams.union([s.run.fgram_set, fgrams.FGramSet.load(s.grown_path)])
  assert fs.fingerprint == want.fingerprint and fs.max_len == _GROWN_K
  longer = int(np.sum(fs.lengths > s.cfg.fgrams.max_len))
  assert longer > 20
  rec = grown.metadata['fgram_set']
  assert (rec['max_len'], rec['trained_max_len'], rec['cut_to_trained_max_len']) == (
      _GROWN_K, 4, longer)
  assert rec['union'] and [x['max_len'] for x in rec['sources']] == [4, _GROWN_K]
  np.testing.assert_allclose(grown.table.array, _fgram_rows(s, fs), rtol=1e-5, atol=1e-6)
  # So a long f-gram's row is its 4-token suffix's row, where that suffix is in the set.
  i = int(np.flatnonzero(fs.lengths == _GROWN_K)[0])
  j = fs.index(fs.ngram(i)[-4:])
  assert j >= 0
  np.testing.assert_allclose(grown.table.array[i], grown.table.array[j], rtol=1e-5, atol=1e-6)


def _reference_logits_fn(s, fgram_set):
  """The checkpoint's model with A_fgram (not the table) on last-K-cut windows: a jitted
  (inputs, fgram ids, positions, segment ids) [B, L] -> logits."""
  rows_SxD = jnp.asarray(_fgram_rows(s, fgram_set))
  model = s.trainer.model

  @jax.jit
  def logits(inputs_BxL, fids_BxL, positions_BxL, segments_BxL):
    x_BxLxD = model.apply({'params': s.params}, inputs_BxL,
                          method=model_lib.SconeLM.embed_inputs)
    matched_BxL = fids_BxL >= 0
    x_BxLxD = jnp.where(matched_BxL[..., None], rows_SxD[jnp.maximum(fids_BxL, 0)], x_BxLxD)
    return model.apply({'params': s.params}, x_BxLxD, positions_BxL=positions_BxL,
                       segment_ids_BxL=segments_BxL, method=model_lib.SconeLM.backbone)
  return logits


@pytest.mark.slow
def test_grown_table_decode_and_eval_agree(s, grown):
  fs = grown.fgram_set
  tok = s.run.tokenizer
  docs = s.run.heldout_docs
  # Eval (packed rows, host matcher, table rows) = the reference over the same rows.
  split = packing.prepare_split(docs, tok, fs)
  loader = packing.Loader(split, seq_len=grown.seq_len, batch_size=grown.batch_size, seed=0,
                          shuffle=False, eval_mode=True)
  reference_logits = _reference_logits_fn(s, fs)
  nll, count, long_matches = 0.0, 0.0, 0
  for b in loader:
    logits = reference_logits(b['inputs'], b['fgram_ids'], b['positions'], b['segment_ids'])
    mask = b['loss_mask'] > 0
    nll += float(np.sum(np.asarray(metrics.token_nll(logits, b['targets']))[mask]))
    count += float(mask.sum())
    long_matches += int(np.sum((b['fgram_lengths'] > 4) & mask))
  assert long_matches > 20  # the long f-grams are in use
  np.testing.assert_allclose(grown.evaluate(docs)['loss'], nll / count, rtol=1e-5)

  # Decode (prefill, then the on-device matcher and gather) = the same reference.
  prompts = [tok.encode(d.text)[:n].tolist() for d, n in zip(docs, (14, 9, 17, 6))]
  outs = grown.generate(prompts, max_new_tokens=10, stop_tokens=())
  length = 32  # right-padded: one shape for every prompt
  for prompt, out in zip(prompts, outs):
    doc = np.asarray(prompt + out[:-1], np.int32)
    n = doc.size + 1
    inputs = np.zeros((1, length), np.int32)
    inputs[0, :n] = np.concatenate([[packing.BOS_ID], doc])
    fids = np.full((1, length), -1, np.int32)
    fids[0, 1:n] = fs.match(doc)[0]
    logits = np.asarray(reference_logits(inputs, fids, np.arange(length)[None],
                                         (np.arange(length) < n).astype(np.int32)[None]))
    logits = logits[0, len(prompt):n]
    for t, token in enumerate(out):
      assert logits[t, token] >= logits[t].max() - 1e-4, (prompt, t, token)
  # The on-device matcher finds the long f-grams the host matcher finds.
  doc = tok.encode(docs[0].text)[:60]
  ctx, doc_len = device_match.window([doc[:i + 1] for i in range(len(doc))], fs.max_len)
  got = np.asarray(device_match.match_last(jax.device_put(device_match.build(fs)),
                                           jnp.asarray(ctx), jnp.asarray(doc_len)))
  want_ids, want_lens = fs.match(doc)
  np.testing.assert_array_equal(got, want_ids)
  assert (want_lens > 4).any()


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run([sys.executable, '-m', 'scone_jax.main', *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_extract_a_whole_domain_then_export_the_union(s, tmp_path):
  corpus_dir = os.path.dirname(s.cfg.corpus.train_files)
  config = tiny.write_config_file(str(tmp_path / 'cfg.py'), corpus_dir)
  domain_dir = str(tmp_path / 'domain')
  r = _cli('--mode=extract', f'--config={config}', f'--workdir={domain_dir}',
           f'--config.tokenizer.path={os.path.join(s.workdir, artifacts.TOKENIZER_FILE)}',
           f'--config.corpus.train_files={s.domain_cfg.corpus.train_files}',
           '--config.corpus.eval_files=', '--config.corpus.heldout_fraction=0',
           '--config.fgrams.num_fgrams=200')
  assert r.returncode == 0, r.stderr[-3000:]
  domain = os.path.join(domain_dir, artifacts.FGRAMS_FILE)
  assert fgrams.FGramSet.load(domain).fingerprint == fgrams.FGramSet.load(
      s.domain_path).fingerprint  # every document, as in process
  export_dir = str(tmp_path / 'export')
  r = _cli('--mode=export', f'--config={config}', f'--workdir={s.workdir}',
           f'--export_dir={export_dir}', f'--fgram_set={domain},{s.own_path}')
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  want = fgrams.union([fgrams.FGramSet.load(domain), s.run.fgram_set])
  assert summary['fingerprint'] == want.fingerprint and summary['rows'] == len(want)
  meta = json.load(open(os.path.join(export_dir, 'export.json')))
  assert [x['path'] for x in meta['fgram_set']['sources']] == [domain, s.own_path]
  r = _cli('--mode=eval', f'--export_dir={export_dir}', f'--fgram_set={domain}',
           f'--eval_text={s.domain_cfg.corpus.train_files}')
  assert r.returncode == 2 and 'error: --fgram_set is for --mode=export' in r.stderr


# ----------------------------------------------------------------------------- grow_table


def test_grow_table_runs_its_cells_and_keeps_the_eval_half_out_of_extraction(s, tmp_path):
  """experiments/grow_table.py end to end on the tiny run (one seed): the control cell is the
  trained set, a larger S' and a domain's cells export and evaluate, and no evaluation-half
  document reaches the domain's extraction."""
  from experiments import grow_table  # pylint: disable=g-import-not-at-top
  domain_file = str(s.root / 'domain_corpus' / 'domain.txt')
  trained_s = len(s.run.fgram_set)
  artifacts.write_config(s.cfg, s.workdir)  # what --mode=train leaves; grow_table reads it
  out = tmp_path / 'grow.json'
  grow_table.main(['--workdir', s.workdir, '--sizes', f'{trained_s},{2 * trained_s}',
                   '--domains', f'text:{domain_file}', '--eval_chars', '0',
                   '--out', str(out), '--scratch', str(tmp_path / 'scratch')])
  result = json.loads(out.read_text())
  cells = result['runs'][0]['cells']
  assert cells[f'more_S{trained_s}']['is_trained_set']
  assert not cells[f'more_S{2 * trained_s}']['is_trained_set']
  assert cells[f'more_S{2 * trained_s}']['fgram_set']['num_fgrams'] > trained_s
  assert set(cells) >= {'domain_training', 'domain_domain', 'domain_union'}
  union = cells['domain_union']['fgram_set']['num_fgrams']
  assert union >= max(cells['domain_domain']['fgram_set']['num_fgrams'], trained_s)
  for cell in cells.values():
    for ev in cell.values():
      if isinstance(ev, dict) and 'ppl' in ev:
        assert np.isfinite(ev['ppl']) and ev['tokens'] > 0
  extract_half, eval_half = grow_table.split_domain(corpus.read_text_documents([domain_file]))
  assert extract_half and eval_half
  extracted = [json.loads(line)['id'] for line in
               (tmp_path / 'scratch' / 'seed0' / 'domain_domain' / 'extract_half.jsonl')
               .read_text().splitlines()]
  assert sorted(extracted) == sorted(d.id for d in extract_half)
  assert not set(extracted) & {d.id for d in eval_half}
  assert result['summary'][f'more_S{trained_s}']['heldout']['ppl_spread'] == 0.0
