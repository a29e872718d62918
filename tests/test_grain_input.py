"""input_pipeline=grain: the token shards as a grain RandomAccessDataSource give the shards
input's rows exactly, per process, and its iterator state resumes where it stopped."""
import numpy as np
import pytest

from scone_jax import corpus
from scone_jax import fgrams
from scone_jax import grain_input
from scone_jax import packing
from scone_jax import token_shards
import tiny

SEQ_LEN = 24
BATCH = 6


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('grain')
  paths = tiny.write_corpus(str(root / 'corpus'), num_train=40, num_eval=0)
  docs = corpus.read_text_documents(paths[:1])
  model = str(root / 'tokenizer.model')
  corpus.train_tokenizer([d.text for d in docs], vocab_size=300, model_type='bpe',
                         model_path=model)
  tok = corpus.Tokenizer(model)
  fgram_set = fgrams.extract([tok.encode(d.text) for d in docs], max_len=3, min_count=2,
                             num_fgrams=40, progress=False)
  token_shards.write_shards(docs, tok, str(root / 'shards'), num_shards=3)
  return token_shards.TokenShards(str(root / 'shards'), fgram_set)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rows_equal_the_shards_loader_per_process(shards):
  steps = list(range(0, 3)) + [int(2.5 * shards.num_tokens / SEQ_LEN / BATCH)]  # 2nd epoch
  for p in range(2):
    ref = packing.Loader(shards, seq_len=SEQ_LEN, batch_size=BATCH, seed=3,
                         process_index=p, process_count=2)
    gl = grain_input.GrainLoader(shards, seq_len=SEQ_LEN, batch_size=BATCH, seed=3,
                                 process_index=p, process_count=2)
    assert gl.local_batch_size == BATCH // 2
    for step in steps:
      _same(gl.batch_at(step), ref.batch_at(step))
    # Iteration (grain's threaded read-ahead) gives the same batches in order.
    it = iter(gl)
    for step in range(3):
      _same(next(it), ref.batch_at(step))


def test_iterator_state_resumes_at_the_same_record(shards):
  gl = grain_input.GrainLoader(shards, seq_len=SEQ_LEN, batch_size=BATCH, seed=1,
                               prefetch=2, workers=2)
  it = iter(gl)
  for _ in range(4):
    next(it)
  state = gl.state()
  assert state['step'] == 4 and state['grain']['next_index'] == 4
  want = [next(it) for _ in range(2)]
  again = grain_input.GrainLoader(shards, seq_len=SEQ_LEN, batch_size=BATCH, seed=1)
  again.restore(state)
  it2 = iter(again)
  for w in want:
    _same(next(it2), w)
  # A resume from the step alone (the shards input's state) reads the same batches too.
  by_step = grain_input.GrainLoader(shards, seq_len=SEQ_LEN, batch_size=BATCH, seed=1)
  by_step.restore({'step': 4})
  _same(next(iter(by_step)), want[0])
  with pytest.raises(ValueError, match='inconsistent'):
    again.restore({'step': 2, 'grain': {'next_index': 4}})


@pytest.mark.slow
def test_training_on_grain_matches_the_shards_input(tmp_path):
  # Same rows, same model, same seed: the losses of a short run agree exactly.
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  corpus_dir = str(tmp_path / 'corpus')
  tiny.write_corpus(corpus_dir)
  losses = {}
  for pipeline in ('shards', 'grain'):
    cfg = tiny.tiny_config(corpus_dir, steps=2)
    cfg.input_pipeline = pipeline
    workdir = str(tmp_path / pipeline)
    run = artifacts.prepare_run(cfg, workdir)
    loader, _ = train.make_loaders(cfg, workdir, run)
    assert type(loader).__name__ == ('GrainLoader' if pipeline == 'grain' else 'Loader')
    losses[pipeline] = train.train(cfg, workdir, run)['loss']
  assert np.isfinite(losses['grain']) and losses['grain'] == losses['shards']
