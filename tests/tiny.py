"""A tiny corpus and config shared by the training/export tests (seconds on a CPU)."""
import os

import numpy as np

from scone_jax import config as config_lib

_SUBJECTS = ['the nation', 'our people', 'the congress', 'the government', 'every citizen',
             'the united states', 'the world', 'our economy', 'the president', 'this house']
_VERBS = ['must protect', 'will build', 'has seen', 'shall defend', 'can strengthen',
          'should support', 'will not forget', 'needs', 'has made', 'will honor']
_OBJECTS = ['the public interest', 'a stronger union', 'the rights of workers', 'our schools',
            'the common defense', 'the general welfare', 'new jobs', 'peace and freedom',
            'the national debt', 'health care for all']


def copy_config(cfg):
  """An independent copy of a ConfigDict (a test edits its copy, never the shared one)."""
  return type(cfg)(cfg.to_dict())


def prepared_run(root):
  """The tiny corpus, its config and its prepared run (tokenizer and f-grams) under root:
  (cfg, run), cfg pointing at the run's tokenizer and f-gram files."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  write_corpus(os.path.join(root, 'corpus'))
  cfg = tiny_config(os.path.join(root, 'corpus'))
  workdir = os.path.join(root, 'base')
  run = artifacts.prepare_run(cfg, workdir)
  cfg.tokenizer.path = os.path.join(workdir, artifacts.TOKENIZER_FILE)
  cfg.fgrams.path = os.path.join(workdir, artifacts.FGRAMS_FILE)
  return cfg, run


def untrained_export(root, *, num_eval=4, chunks_per_shard=None, model=None):
  """A tiny SCONE export of untrained weights (serving only has to compute what the model
  computes), in a few seconds: (export_dir, run). `model`: config.model fields to change
  (e.g. more heads)."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import export  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  corpus_dir = os.path.join(root, 'corpus')
  write_corpus(corpus_dir, num_train=60, num_eval=num_eval)
  cfg = tiny_config(corpus_dir)
  cfg.model.update(model or {})
  workdir = os.path.join(root, 'work')
  run = artifacts.prepare_run(cfg, workdir)
  trainer = train.create_trainer(cfg, workdir, run)
  mngr = train.checkpoint_manager(workdir, cfg)
  train.save_checkpoint(mngr, trainer, {'step': 0})
  mngr.wait_until_finished()
  mngr.close()
  export_dir = os.path.join(root, 'export')
  export.export(cfg, workdir, run, export_dir, chunks_per_shard=chunks_per_shard)
  return export_dir, run


def write_corpus(directory, num_train=120, num_eval=12, seed=0):
  """Writes train.txt and eval.txt: blank-line-separated documents of templated sentences."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name, n in (('train.txt', num_train), ('eval.txt', num_eval)):
    docs = []
    for _ in range(n):
      sentences = []
      for _ in range(int(rng.integers(3, 9))):
        s = (f'{_SUBJECTS[rng.integers(len(_SUBJECTS))]} '
             f'{_VERBS[rng.integers(len(_VERBS))]} '
             f'{_OBJECTS[rng.integers(len(_OBJECTS))]}')
        sentences.append(s[0].upper() + s[1:] + '.')
      docs.append(' '.join(sentences))
    path = os.path.join(directory, name)
    with open(path, 'w') as f:
      f.write('\n\n'.join(docs) + '\n')
    paths.append(path)
  return paths


def tiny_config(corpus_dir, *, fgrams=True, steps=8):
  """A 2-layer d=32 model over the tiny corpus, on all 8 fake devices."""
  c = config_lib.default_config()
  c.corpus.name = 'text'
  c.corpus.train_files = os.path.join(corpus_dir, 'train.txt')
  c.corpus.eval_files = os.path.join(corpus_dir, 'eval.txt')
  c.tokenizer.vocab_size = 400
  c.fgrams.enabled = fgrams
  c.fgrams.num_fgrams = 200 if fgrams else 0
  c.fgrams.max_len = 4
  c.fgrams.min_count = 2
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.dtype = 'float32'
  c.fgram_model.num_layers = 1
  c.fgram_model.num_heads = 2
  c.fgram_model.head_dim = 16
  c.fgram_model.mlp_dim = 64
  c.fgram_model.pack_bucket = 8
  c.seq_len = 32
  c.batch_size = 8
  c.num_train_steps = steps
  c.learning_rate = 1e-2
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 1000
  c.eval_batches = 2
  c.checkpoint_every_steps = 2
  c.mesh.data = -1
  c.export.batch_size = 64
  c.export.rows_per_chunk = 32
  return c


CONFIG_FILE_TEMPLATE = '''
import sys
sys.path.insert(0, {tests_dir!r})
import tiny


def get_config():
  c = tiny.tiny_config({corpus_dir!r}, fgrams={fgrams!r}, steps={steps!r})
  c.tokenizer.path = {tokenizer!r}
  return c
'''


def write_config_file(path, corpus_dir, *, fgrams=True, steps=8, tokenizer=''):
  """A get_config() file for subprocess runs of scone_jax.main."""
  with open(path, 'w') as f:
    f.write(CONFIG_FILE_TEMPLATE.format(
        tests_dir=os.path.dirname(os.path.abspath(__file__)), corpus_dir=corpus_dir,
        fgrams=fgrams, steps=steps, tokenizer=tokenizer))
  return path
