"""The run directory: what each stage writes there and how the next stage finds it.

Layout of a workdir:
  config.json            resolved config of the run; a resume may change only the fields
                         config.RESUME_KINDS calls operational
  run.lock               held by the one training process writing here (host, pid, start)
  tokenizer.model        SentencePiece model trained on the training split, or the given
                         one (tokenizer.json for tokenizer.kind=huggingface)
  fgrams.npz             the FGramSet (absent for the baseline)
  fgrams.json            how the set was made: tokenizer fingerprint, sizes, timing
  fgrams_summary.txt     counts by length and the top f-grams, detokenized
  data/                  tokenized + matched splits (cached, keyed by fingerprints);
                         train-shards/ (token shards), heldout.jsonl (+ .request.json: the
                         held-out documents, written once, read instead of the corpus)
  checkpoints/           orbax CheckpointManager directory
  metrics.jsonl          one JSON object per logged train/eval step
"""
import collections
import json
import logging
import time
from typing import Optional

import ml_collections
import numpy as np

from scone_jax import config as config_lib
from scone_jax import corpus
from scone_jax import fgrams
from scone_jax import paths
from scone_jax import token_shards

TOKENIZER_FILE = 'tokenizer.model'
FGRAMS_FILE = 'fgrams.npz'
FGRAMS_META_FILE = 'fgrams.json'
FGRAMS_SUMMARY_FILE = 'fgrams_summary.txt'
CONFIG_FILE = 'config.json'
LOCK_FILE = 'run.lock'
CHECKPOINT_DIR = 'checkpoints'
DATA_DIR = 'data'
TRAIN_SHARDS_DIR = 'train-shards'
HELDOUT_FILE = 'heldout.jsonl'
METRICS_FILE = 'metrics.jsonl'


class RunArtifacts:
  """Everything upstream of training, ready to use.

  train_docs: the training documents, or a function loading them, called on first use:
  a run whose tokenizer, f-grams and token shards exist never reads the training corpus.
  train_shards: the directory of the training split's token shards ('' when not prepared).
  """

  def __init__(self, tokenizer: 'corpus.Tokenizer', fgram_set: Optional[fgrams.FGramSet],
               train_docs, heldout_docs: list, train_shards: str = ''):
    self.tokenizer = tokenizer
    self.fgram_set = fgram_set
    self._train_docs = train_docs
    self.heldout_docs = heldout_docs
    self.train_shards = train_shards

  @property
  def train_docs(self) -> list:
    if callable(self._train_docs):
      self._train_docs = self._train_docs()
    return self._train_docs


def flatten(d, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1}: config JSON as dotted fields."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> tuple[list, list]:
  """(refused, allowed): the differing fields as 'field: old -> new' lines.

  Allowed: the fields config.RESUME_KINDS calls operational; the rest are refused.
  """
  a, b = flatten(old), flatten(new)
  refused, allowed = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key) == b.get(key):
      continue
    line = f'{key}: {a.get(key, "(absent)")!r} -> {b.get(key, "(absent)")!r}'
    # A field config.RESUME_KINDS does not classify (one dropped from the schema) is refused.
    operational = config_lib.resume_kind(key) == config_lib.OPERATIONAL
    (allowed if operational else refused).append(line)
  return refused, allowed


def check_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run whose checkpoints were made under a different config.

  Operational fields (config.RESUME_KINDS) may change (logged); a change of any other
  field is refused with one message listing each field, old -> new, and what to do.
  """
  path = paths.join(workdir, CONFIG_FILE)
  if not (paths.isfile(path) and paths.isdir(paths.join(workdir, CHECKPOINT_DIR))):
    return
  # A field added to the schema after the run started counts as its default there.
  defaults = flatten(json.loads(config_lib.default_config().to_json_best_effort()))
  old = {**defaults, **flatten(paths.read_json(path))}
  refused, allowed = config_changes(old, flatten(json.loads(cfg.to_json_best_effort())))
  if refused:
    raise ValueError(
        f'{workdir} holds checkpoints of a run with another config: '
        + '; '.join(refused) + '. Use a new --workdir, or restore the old value(s) to resume.')
  for line in allowed:
    logging.info('resuming with a changed operational field: %s', line)


class ExclusiveLock:
  """A lock file created exclusively, naming its holder (host, pid, start time, token).

  Local and gs:// alike (O_EXCL; on Cloud Storage an upload that fails if the object
  exists), so of several processes racing exactly one wins. A lock left by a process that
  is gone (same host, pid not running) is taken over; a holder on another host cannot be
  checked, so its lock stays until someone deletes it. The run lock (`RunLock`) and the
  sweep's point claims are both this.
  """

  def __init__(self, path: str):
    self.path = path
    self.holder = {}   # who held it when try_acquire last failed
    self._held = False

  def try_acquire(self) -> bool:
    import os  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import uuid  # pylint: disable=g-import-not-at-top
    # token: this acquire, told apart from any other (a retried upload finds its own lock).
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'start': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'token': uuid.uuid4().hex}
    for _ in range(3):
      created = paths.create_exclusive(self.path, json.dumps(me))
      holder = me if created else self._holder()
      if holder == me:  # also when gcsfs retried our upload after a lost response (412)
        self._held = True
        return True
      if holder.get('host') == me['host'] and not pid_alive(holder.get('pid')):
        logging.warning('taking over the stale lock %s of process %s (no longer running)',
                        self.path, holder.get('pid'))
        try:
          paths.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      self.holder = holder
      return False
    self.holder = {}
    return False

  def _holder(self) -> dict:
    try:
      return paths.read_json(self.path)
    except (OSError, ValueError):
      return {}

  def release(self):
    if self._held:
      try:
        paths.remove(self.path)
      except (FileNotFoundError, OSError):
        pass
      self._held = False


class RunLock(ExclusiveLock):
  """One writer per run directory: `run.lock` (an `ExclusiveLock`). A second trainer on the
  same workdir is refused; on several processes, process 0 holds it."""

  def __init__(self, workdir: str):
    super().__init__(paths.join(workdir, LOCK_FILE))

  def acquire(self) -> 'RunLock':
    if self.try_acquire():
      return self
    holder = self.holder
    if not holder:
      raise RuntimeError(f'{self.path}: could not take the run lock; try again.')
    raise RuntimeError(
        f'{self.path}: another training process (host {holder.get("host")}, pid '
        f'{holder.get("pid")}, started {holder.get("start")}) is writing this run; wait '
        'for it or stop it, or use another --workdir. If it is dead on another host, '
        'delete the lock file.') from None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def pid_alive(pid) -> bool:
  """Whether a process with this pid runs on this host.

  A zombie (killed, but not yet reaped: its parent died and the process that adopted it,
  a CI harness or a container's init, has not waited for it) answers signal 0 like a live
  process; it holds nothing, so it counts as gone.
  """
  import os  # pylint: disable=g-import-not-at-top
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True
  return process_state(int(pid)) not in ('Z', 'X')


def process_state(pid: int) -> Optional[str]:
  """The one-letter state of a process from /proc (R, S, D, Z, ...); None off Linux or when
  it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # The name (in parentheses) may hold spaces and ')'; the state follows the last ')'.
  fields = stat[stat.rfind(')') + 2:].split()
  return fields[0] if fields else None


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config beside the checkpoints (every run does this; on several
  processes sharing the workdir, process 0 does)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = paths.join(workdir, CONFIG_FILE)
  if jax.process_index() != 0:
    return path
  paths.makedirs(workdir)
  paths.atomic_write(path, cfg.to_json_best_effort(indent=2, sort_keys=True))
  return path


def prepare_run(cfg: ml_collections.ConfigDict, workdir: str, *,
                need_heldout: bool = True) -> RunArtifacts:
  """Loads the corpus, trains or reuses the tokenizer, extracts or reuses the f-grams.

  need_heldout=False (`--mode=extract`): with corpus.heldout_fraction=0 and no eval files
  there is no held-out split and none is asked for (heldout_docs is empty): every document
  of a domain goes into its f-grams. Training and eval need one and refuse an empty split.
  On several processes (a pod), process 0 makes the tokenizer and the f-gram set first;
  the others wait for it and then load what it wrote (the workdir is shared).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return _prepare_run(cfg, workdir, need_heldout)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  run = _prepare_run(cfg, workdir, need_heldout) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('scone_jax.prepare_run')
  if run is None:
    run = _prepare_run(cfg, workdir, need_heldout)
  fingerprints = np.frombuffer(bytes.fromhex(
      run.tokenizer.fingerprint[:16] + (run.fgram_set.fingerprint[:16] if run.fgram_set
                                        else '0' * 16)), np.uint8)
  everyone = multihost_utils.process_allgather(fingerprints)
  if not (everyone == everyone[0]).all():
    raise RuntimeError('processes disagree on the tokenizer or f-gram set; is the workdir '
                       f'{workdir} on a filesystem all hosts share?')
  return run


def _prepare_run(cfg: ml_collections.ConfigDict, workdir: str,
                 need_heldout: bool = True) -> RunArtifacts:
  paths.makedirs(workdir)
  t0 = time.time()
  no_split = (cfg.corpus.heldout_fraction == 0
              and not (cfg.corpus.name == 'text' and cfg.corpus.eval_files))
  # The split would be empty by construction: reading the corpus for it is wasted.
  heldout_docs = [] if (no_split and not need_heldout) else load_heldout(cfg, workdir)
  logging.info('corpus %s: %d held-out documents (%.1fs)', cfg.corpus.name, len(heldout_docs),
               time.time() - t0)

  def load_train():
    t0 = time.time()
    docs = corpus.load_documents(cfg.corpus, 'train')
    logging.info('corpus %s: %d training documents (%.1fs)', cfg.corpus.name, len(docs),
                 time.time() - t0)
    return docs

  run = RunArtifacts(None, None, load_train, heldout_docs)
  run.tokenizer = corpus.prepare_tokenizer(cfg, workdir, lambda: [d.text for d in run.train_docs])
  if cfg.fgrams.enabled:
    run.fgram_set = prepare_fgrams(cfg, workdir, run.tokenizer, lambda: run.train_docs)
  # 'seqio' reads token shards only when given them (prepared elsewhere); without, its
  # Task tokenizes the training documents itself.
  if cfg.input_pipeline in ('shards', 'grain') or (cfg.input_pipeline == 'seqio' and
                                        cfg.data.train_shards):
    run.train_shards = prepare_shards(cfg, workdir, run)
  return run


def load_heldout(cfg, workdir: str) -> list:
  """The held-out documents. Eval files are read as they are; a split of the training
  corpus is made once, at prepare time (streaming the corpus, `corpus.load_documents`), into
  <workdir>/data/heldout.jsonl, which every later run and every other host of a pod reads
  instead of the training corpus."""
  if cfg.corpus.name == 'text' and cfg.corpus.eval_files:
    return corpus.load_documents(cfg.corpus, 'heldout')
  path = paths.join(workdir, DATA_DIR, HELDOUT_FILE)
  request_path = path + '.request.json'
  request = {'corpus': cfg.corpus.to_dict()}
  if paths.isfile(path) and paths.isfile(request_path):
    if paths.read_json(request_path) == request:
      return corpus.read_text_documents([path])
  docs = corpus.load_documents(cfg.corpus, 'heldout')
  paths.makedirs(paths.join(workdir, DATA_DIR))
  paths.atomic_write(path, ''.join(json.dumps({'id': d.id, 'text': d.text}, ensure_ascii=False)
                                   + '\n' for d in docs))
  paths.write_json_atomic(request_path, request)
  return docs


def prepare_shards(cfg, workdir: str, run: RunArtifacts) -> str:
  """The directory of the training split's token shards: cfg.data.train_shards (prepared
  elsewhere, e.g. by the Beam pipeline) or the workdir's, written on first use."""
  if cfg.data.train_shards:
    index = token_shards.read_index(cfg.data.train_shards)
    if index is None:
      raise FileNotFoundError(f'config.data.train_shards={cfg.data.train_shards}: no finished '
                              f'token shards there (no {token_shards.INDEX}).')
    token_shards.check_tokenizer(index, run.tokenizer, cfg.data.train_shards)
    return cfg.data.train_shards
  directory = paths.join(workdir, DATA_DIR, TRAIN_SHARDS_DIR)
  request = {'tokenizer_fingerprint': run.tokenizer.fingerprint,
             'corpus': cfg.corpus.to_dict(), 'num_shards': cfg.data.num_shards}
  token_shards.prepare(lambda: run.train_docs, run.tokenizer, directory,
                       num_shards=cfg.data.num_shards, request=request)
  return directory


def _fgram_request(cfg, tokenizer) -> dict:
  return {
      'tokenizer_fingerprint': tokenizer.fingerprint,
      'corpus': cfg.corpus.to_dict(),
      'max_len': cfg.fgrams.max_len,
      'min_count': cfg.fgrams.min_count,
      'num_fgrams': cfg.fgrams.num_fgrams,
  }


def prepare_fgrams(cfg, workdir, tokenizer, train_docs) -> fgrams.FGramSet:
  """Returns the run's FGramSet: cfg.fgrams.path, the workdir's, or a fresh extraction.

  train_docs: the training documents, or a function returning them (called only to extract).
  """
  if cfg.fgrams.path:
    fgram_set = fgrams.FGramSet.load(cfg.fgrams.path)
    _check_fgrams_fit(fgram_set, cfg, cfg.fgrams.path)
    logging.info('using f-gram set %s (%d f-grams, %s)', cfg.fgrams.path, len(fgram_set),
                 fgram_set.fingerprint[:12])
    return fgram_set
  path = paths.join(workdir, FGRAMS_FILE)
  meta_path = paths.join(workdir, FGRAMS_META_FILE)
  request = _fgram_request(cfg, tokenizer)
  if paths.exists(path) and paths.exists(meta_path):
    meta = paths.read_json(meta_path)
    if meta.get('request') == request:
      fgram_set = fgrams.FGramSet.load(path)
      if fgram_set.fingerprint != meta.get('fingerprint'):
        raise ValueError(
            f'{path} has fingerprint {fgram_set.fingerprint[:12]} but {meta_path} records '
            f'{str(meta.get("fingerprint"))[:12]}; delete both to re-extract.')
      logging.info('reusing f-gram set %s (%d f-grams, %s)', path, len(fgram_set),
                   fgram_set.fingerprint[:12])
      return fgram_set
    if paths.isdir(paths.join(workdir, CHECKPOINT_DIR)):
      raise ValueError(
          f'{workdir} already has checkpoints trained with a different f-gram set '
          f'({meta.get("request")}); use a new --workdir or restore the original config.')
    logging.info('f-gram settings changed; re-extracting')

  if callable(train_docs):
    train_docs = train_docs()
  t0 = time.time()
  docs_tokens = [tokenizer.encode(d.text) for d in train_docs]
  num_tokens = int(sum(len(t) for t in docs_tokens))
  t_tok = time.time() - t0
  logging.info('tokenized %d training documents: %d tokens (%.1fs)', len(docs_tokens),
               num_tokens, t_tok)
  t0 = time.time()
  fgram_set = fgrams.extract(docs_tokens, max_len=cfg.fgrams.max_len,
                             min_count=cfg.fgrams.min_count,
                             num_fgrams=cfg.fgrams.num_fgrams)
  t_ext = time.time() - t0
  fgram_set.save(path)
  meta = {
      'request': request,
      'fingerprint': fgram_set.fingerprint,
      'num_fgrams': len(fgram_set),
      'train_tokens': num_tokens,
      'extract_seconds': t_ext,
      'extract_tokens_per_s': num_tokens / max(t_ext, 1e-9),
  }
  paths.write_json_atomic(meta_path, meta, sort_keys=False)
  summary = fgram_summary(fgram_set, tokenizer, num_tokens=num_tokens, seconds=t_ext)
  paths.atomic_write(paths.join(workdir, FGRAMS_SUMMARY_FILE), summary)
  return fgram_set


def fgram_set_meta_path(path: str) -> str:
  """The description `--mode=extract` writes beside a set: fgrams.npz -> fgrams.json."""
  return (path[:-len('.npz')] if path.endswith('.npz') else path) + '.json'


def load_fgram_set(path: str, tokenizer) -> tuple[fgrams.FGramSet, dict]:
  """An f-gram set file and where it came from, refused unless made with this tokenizer.

  The tokenizer that made a set is in the description `--mode=extract` writes beside it
  (`fgram_set_meta_path`): its request's tokenizer fingerprint. Returns (set, source) with
  source = {path, fingerprint, num_fgrams, max_len, tokenizer_fingerprint, corpus,
  min_count}: what `export.json` records of it.
  """
  path = paths.abspath(paths.check(path))
  fgram_set = fgrams.FGramSet.load(path)
  meta_path = fgram_set_meta_path(path)
  if not paths.isfile(meta_path):
    raise ValueError(f'{path}: cannot tell which tokenizer made this f-gram set: no '
                     f'{meta_path} beside it (--mode=extract writes one); extract the set '
                     'with --mode=extract and this run\'s --config.tokenizer.path.')
  meta = paths.read_json(meta_path)
  request = meta.get('request') or {}
  if meta.get('fingerprint') != fgram_set.fingerprint:
    raise ValueError(f'{meta_path} describes f-gram set {str(meta.get("fingerprint"))[:12]}… '
                     f'but {path} is {fgram_set.fingerprint[:12]}…; keep each fgrams.npz '
                     'with its own fgrams.json, or re-run --mode=extract.')
  made_with = str(request.get('tokenizer_fingerprint'))
  if made_with != tokenizer.fingerprint:
    raise ValueError(f'f-gram set {path} was made with tokenizer {made_with[:12]}…, this run\'s '
                     f'tokenizer is {tokenizer.fingerprint[:12]}…; extract it again with '
                     '--mode=extract --config.tokenizer.path=WORKDIR/tokenizer.model.')
  return fgram_set, {
      'path': path, 'fingerprint': fgram_set.fingerprint, 'num_fgrams': len(fgram_set),
      'max_len': fgram_set.max_len, 'tokenizer_fingerprint': made_with,
      'corpus': request.get('corpus'), 'min_count': request.get('min_count')}


def _check_fgrams_fit(fgram_set, cfg, path):
  if fgram_set.max_len > cfg.fgrams.max_len:
    raise ValueError(f'f-gram set {path} has max_len {fgram_set.max_len} but the config says '
                     f'fgrams.max_len={cfg.fgrams.max_len}; set --config.fgrams.max_len='
                     f'{fgram_set.max_len}.')


def fgram_summary(fgram_set, tokenizer, *, num_tokens=None, seconds=None, top=40) -> str:
  """Human-readable summary: counts by length and the most frequent f-grams, detokenized."""
  lines = [f'f-gram set {fgram_set.fingerprint[:12]}: {len(fgram_set)} f-grams, '
           f'max_len {fgram_set.max_len}']
  if num_tokens is not None:
    rate = f', {num_tokens / seconds:,.0f} tokens/s' if seconds else ''
    lines.append(f'extracted from {num_tokens:,} training tokens'
                 + (f' in {seconds:.1f}s{rate}' if seconds else ''))
  by_len = collections.Counter(np.asarray(fgram_set.lengths).tolist())
  lines.append('count by length: ' + ', '.join(
      f'n={n}: {by_len[n]}' for n in range(2, fgram_set.max_len + 1)))
  counts = np.asarray(fgram_set.counts)
  if len(counts):
    lines.append(f'occurrences: max {counts.max():,}, min {counts.min():,}')
  lines.append(f'top {min(top, len(fgram_set))} f-grams (id, count, n, text):')
  for i in range(min(top, len(fgram_set))):
    ngram = fgram_set.ngram(i)
    pieces = tokenizer.decode(np.asarray(ngram, np.int32))
    lines.append(f'  {i:6d} {int(counts[i]):9,d}  n={len(ngram)}  {pieces!r}')
  return '\n'.join(lines) + '\n'
