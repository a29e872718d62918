"""Run a sweep: every point trained, exported and evaluated from its export; results + plots.

  python -m experiments.sweep --sweep=experiments/sweeps/<name>.py --root=DIR
      [--only=NAME,NAME]   # just these points
      [--report_only]      # rebuild results.csv and the plots from what is done

Several runners may share one ROOT (one per core, or per machine on a shared disk): each
point is claimed by one runner (points/<name>/claim.json, taken over when its process is
gone), so they split the points between them in sweep order.

A sweep file defines `get_sweep()` -> (base ConfigDict, [override dict, ...]). An override
dict maps dotted config fields to values (`{'fgrams.num_fgrams': 4000, 'seed': 1}`) and may
carry `name` (the point's directory; default: made from the overrides), `group` (a name
or a tuple of names: points plotted together against the field that varies among them) and
`code` (a label of the code that ran the point, shown in the table). An optional module-level
`EVAL = {'heldout': True, 'wiki': 400_000, 'shakespeare': 400_000}` picks the eval sets
(characters per out-of-domain corpus; default: the held-out split only).

Layout of ROOT:
  shared/                  tokenizer and f-gram extractions shared by the points
  points/<name>/           config.json (resolved), result.json (when done), failed.json (the
                           last failure), metrics.jsonl, *.log, run/ (workdir: checkpoints,
                           export; the only large directory)
  results.csv, *.png       the table and the plots

Points that differ only in S or in the f-gram model share one tokenizer and one extraction
(at the largest S of the group; a point uses its first S ids, `FGramSet.top`), and every
point with the same seed sees the same data order (rows depend on the tokenizer only).
Each stage is a subprocess of the real CLI, so a kill anywhere loses at most the work since
the last checkpoint: a rerun skips finished points and resumes the one it was in. A failing
point is recorded and the runner moves on.
"""
import argparse
import csv
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.sweep')

import ml_collections

from scone_jax import artifacts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_JSON = os.path.join(REPO, 'experiments', 'configs', 'from_json.py')
RESULT_FILE = 'result.json'
FAILED_FILE = 'failed.json'
CSV_FILE = 'results.csv'
_SPECIAL = ('name', 'group', 'code')


# ----------------------------------------------------------------------------- sweep files


def load_sweep(path):
  """(base config, points, eval settings) of a sweep file; points get 'name' and 'group'."""
  spec = importlib.util.spec_from_file_location('scone_sweep', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base, overrides = module.get_sweep()
  evals = dict(getattr(module, 'EVAL', {'heldout': True}))
  points, seen = [], set()
  for o in overrides:
    o = dict(o)
    name = o.get('name') or point_name(o)
    if name in seen:
      raise ValueError(f'{path}: two points are named {name!r}; give them distinct names.')
    seen.add(name)
    o['name'] = name
    group = o.get('group') or ()
    o['group'] = (group,) if isinstance(group, str) else tuple(group)
    points.append(o)
  return base, points, evals


def point_name(overrides: dict) -> str:
  parts = []
  for k in sorted(k for k in overrides if k not in _SPECIAL):
    parts.append(f'{k.split(".")[-1]}={overrides[k]}')
  return ','.join(parts) or 'base'


def resolve(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    if key in _SPECIAL:
      continue
    node, parts = cfg, key.split('.')
    for p in parts[:-1]:
      if p not in node:
        raise ValueError(f'point override {key!r}: no config group {p!r}.')
      node = node[p]
    if parts[-1] not in node:
      raise ValueError(f'point override {key!r} is not a config field.')
    node[parts[-1]] = value
  return cfg


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _write_json(path, obj):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- shared artifacts


def shared_tokenizer(cfg, root) -> str:
  """Trains the tokenizer once per (corpus, tokenizer settings); returns its path."""
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  if cfg.tokenizer.path:
    return cfg.tokenizer.path
  key = _digest({'corpus': cfg.corpus.to_dict(), 'tokenizer': cfg.tokenizer.to_dict()})
  path = os.path.join(root, 'shared', f'tokenizer-{key}.model')
  if not os.path.isfile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    docs = corpus.load_documents(cfg.corpus, 'train')
    tmp = f'{path[:-len(".model")]}.tmp{os.getpid()}.model'
    corpus.train_tokenizer([d.text for d in docs], vocab_size=cfg.tokenizer.vocab_size,
                           model_type=cfg.tokenizer.model_type, model_path=tmp)
    os.replace(tmp, path)
    vocab = tmp[:-len('.model')] + '.vocab'
    if os.path.isfile(vocab):
      os.replace(vocab, path[:-len('.model')] + '.vocab')
    logging.info('trained shared tokenizer %s', path)
  return path


def _fgram_group_key(cfg, tokenizer_path) -> dict:
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  return {'corpus': cfg.corpus.to_dict(),
          'tokenizer': corpus.Tokenizer(tokenizer_path).fingerprint,
          'max_len': cfg.fgrams.max_len, 'min_count': cfg.fgrams.min_count}


def shared_fgrams(cfg, tokenizer_path, largest_s: int, root):
  """The extraction at the group's largest S, done once and cached under shared/."""
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  group = _fgram_group_key(cfg, tokenizer_path)
  path = os.path.join(root, 'shared', f'fgrams-{_digest(group)}-{largest_s}.npz')
  if os.path.isfile(path):
    return fgrams.FGramSet.load(path)
  tok = corpus.Tokenizer(tokenizer_path)
  docs = corpus.load_documents(cfg.corpus, 'train')
  t0 = time.time()
  fs = fgrams.extract([tok.encode(d.text) for d in docs], max_len=cfg.fgrams.max_len,
                      min_count=cfg.fgrams.min_count, num_fgrams=largest_s)
  logging.info('extracted %d f-grams (max_len %d) in %.1fs -> %s', len(fs), cfg.fgrams.max_len,
               time.time() - t0, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fs.save(path)
  return fs


# ----------------------------------------------------------------------------- one point


class PointFailed(Exception):

  def __init__(self, stage, message):
    super().__init__(f'{stage}: {message}')
    self.stage = stage


def _run_stage(stage, args, point_dir, env=None):
  log_path = os.path.join(point_dir, f'{stage}.log')
  t0 = time.time()
  with open(log_path, 'a') as log:
    log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(args)}\n')
    log.flush()
    proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                          env=env or os.environ.copy(), check=False)
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise PointFailed(stage, f'exit {proc.returncode}; last lines of {log_path}:\n{tail}')
  return time.time() - t0


def prepare_point(base, point, root, fgram_sizes) -> str:
  """Writes the point's resolved config (shared tokenizer / f-gram set filled in)."""
  point_dir = os.path.join(root, 'points', point['name'])
  os.makedirs(point_dir, exist_ok=True)
  cfg = resolve(base, point)
  cfg.tokenizer.path = shared_tokenizer(cfg, root)
  if cfg.fgrams.enabled:
    largest = fgram_sizes[_digest(_fgram_group_key(cfg, cfg.tokenizer.path))]
    fs_path = os.path.join(point_dir, 'fgrams.npz')
    full = shared_fgrams(cfg, cfg.tokenizer.path, largest, root)
    mine = full.top(cfg.fgrams.num_fgrams)
    if not os.path.isfile(fs_path):
      mine.save(fs_path)
    cfg.fgrams.path = fs_path
  resolved = json.loads(cfg.to_json_best_effort())
  path = os.path.join(point_dir, 'config.json')
  # Paths of the shared pieces may move with the checkout; every other field must agree.
  moved = ('tokenizer.path', 'fgrams.path')
  old = _read_json(path) if os.path.isfile(path) else resolved
  # A field the schema gained after the point was written counts as its default there.
  from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  defaults = _flatten(json.loads(config_lib.default_config().to_json_best_effort()))
  old_flat, new_flat = {**defaults, **_flatten(old)}, _flatten(resolved)
  diff = sorted(k for k in set(old_flat) | set(new_flat)
                if k not in moved and old_flat.get(k) != new_flat.get(k))
  if diff:
    raise PointFailed('config', f'point {point["name"]} was started with another config '
                      f'(fields {diff}); rename the point or delete {point_dir}.')
  _write_json(path, resolved)
  return point_dir


_flatten = artifacts.flatten


def run_point(point_dir, evals) -> dict:
  """train -> export -> eval from the export (the checkpoint for baselines) -> result."""
  cfg_path = os.path.join(point_dir, 'config.json')
  cfg = _read_json(cfg_path)
  workdir = os.path.join(point_dir, 'run')
  main = [sys.executable, '-m', 'scone_jax.main', f'--config={FROM_JSON}:{cfg_path}',
          f'--workdir={workdir}']
  seconds = {'train': _run_stage('train', main + ['--mode=train'], point_dir)}
  if cfg['fgrams']['enabled']:
    seconds['export'] = _run_stage('export', main + ['--mode=export'], point_dir)
  eval_path = os.path.join(point_dir, 'eval.json')
  seconds['eval'] = _run_stage(
      'eval', [sys.executable, '-m', 'experiments.sweep', '--eval_point', point_dir,
               '--eval_sets', json.dumps(evals)], point_dir)
  evaluation = _read_json(eval_path)
  metrics = _read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  _write_json(os.path.join(point_dir, 'curve.json'), metrics['curve'])
  return _result(cfg, evaluation, metrics, seconds)


def _read_metrics(path) -> dict:
  """Last training entry, f-gram rows and positions executed per step (means), and the eval
  curve."""
  train, curve, rows, positions = {}, [], [], []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  # A resumed run appends; keep the last record for each step.
  by_step = {}
  for rec in lines:
    by_step.setdefault(rec['step'], {}).update(rec)
  for step in sorted(by_step):
    rec = by_step[step]
    if 'train/loss' in rec:
      train = rec
      if 'train/fgram_rows_per_step' in rec:
        rows.append(rec['train/fgram_rows_per_step'])
      if 'train/fgram_positions_per_step' in rec:
        positions.append(rec['train/fgram_positions_per_step'])
    if 'eval/loss' in rec:
      curve.append({'step': step, 'loss': rec['eval/loss'], 'ppl': rec['eval/ppl']})
  mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
  return {'train': train, 'curve': curve, 'fgram_rows_per_step': mean(rows),
          # Runs from before packing logged rows only: each row was one window of max_len.
          'fgram_positions_per_step': mean(positions) if positions else None}


def _result(cfg, evaluation, metrics, seconds) -> dict:
  from scone_jax import flops  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(cfg)
  vocab = evaluation['vocab_size']
  mc = model_lib.ModelConfig.from_config(c, vocab)
  tokens_per_step = c.batch_size * c.seq_len
  if metrics.get('fgram_positions_per_step') is None:
    positions, row_len = metrics['fgram_rows_per_step'] * c.fgrams.max_len, 0
  else:
    positions, row_len = metrics['fgram_positions_per_step'], c.fgram_model.pack_len
  table_bytes = {'float32': 4, 'bfloat16': 2, 'float16': 2}[c.export.dtype]
  num_fgrams = evaluation.get('num_fgrams', 0)
  acc = flops.costs(mc, c.seq_len, fgram_positions_per_token=positions / tokens_per_step,
                    fgram_row_len=row_len, num_fgrams=num_fgrams,
                    table_bytes_per_value=table_bytes)
  train_tokens = c.num_train_steps * tokens_per_step
  return {
      'scone': bool(c.fgrams.enabled),
      'seed': c.seed,
      'num_fgrams': num_fgrams,
      'max_len': c.fgrams.max_len if c.fgrams.enabled else 0,
      'd_model': c.model.d_model, 'num_layers': c.model.num_layers,
      'fgram_layers': c.fgram_model.num_layers if c.fgrams.enabled else 0,
      'train_tokens': train_tokens,
      'train_flops': acc['train_flops_per_token'] * train_tokens,
      # Window positions the f-gram model executed: per step (as the trainer logs them) and
      # per training token (the figure the FLOPs are counted from).
      'fgram_positions_per_step': positions,
      'fgram_positions_per_token': positions / tokens_per_step,
      'final_train_loss': metrics['train'].get('train/loss'),
      **acc,
      'evals': evaluation['evals'],
      'fgram_fingerprint': evaluation.get('fgram_fingerprint'),
      'seconds': seconds,
  }


# ----------------------------------------------------------------------------- eval (subprocess)


def eval_point(point_dir, eval_sets) -> None:
  """Evaluates a point on its eval sets; SCONE from the export, baselines from the checkpoint."""
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  cfg_values = _read_json(os.path.join(point_dir, 'config.json'))
  from experiments import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.load(f'{FROM_JSON}:{os.path.join(point_dir, "config.json")}')
  workdir = os.path.join(point_dir, 'run')
  run = artifacts.prepare_run(cfg, workdir)
  sets = {}
  if eval_sets.get('heldout', True):
    sets['heldout'] = run.heldout_docs
  for name in corpus.EVAL_CORPORA:
    if eval_sets.get(name):
      sets[name] = corpus.eval_corpus(name, int(eval_sets[name]))
  out = {'vocab_size': run.tokenizer.vocab_size, 'evals': {}}
  if cfg_values['fgrams']['enabled']:
    gen = serving.load(os.path.join(workdir, 'export'), table_storage='ram')
    out['num_fgrams'] = len(gen.fgram_set)
    out['fgram_fingerprint'] = gen.fgram_set.fingerprint
    evaluate = gen.evaluate
    fs = gen.fgram_set
  else:
    trainer = train.load_for_eval(cfg, workdir, run)
    evaluate = lambda docs: train.eval_documents(trainer, docs)
    fs = None
  for name, docs in sets.items():
    t0 = time.time()
    ev = evaluate(docs)
    ev['documents'] = len(docs)
    if fs is not None:
      ev.update(_match_stats(docs, run.tokenizer, fs, cfg.seq_len))
    ev['seconds'] = time.time() - t0
    out['evals'][name] = ev
    print(name, json.dumps(ev), flush=True)
  _write_json(os.path.join(point_dir, 'eval.json'), out)


def _match_stats(docs, tokenizer, fgram_set, seq_len) -> dict:
  """Match rate and mean matched length at the positions the model reads (rule 4b applied)."""
  from scone_jax import packing  # pylint: disable=g-import-not-at-top
  split = packing.prepare_split(docs, tokenizer, fgram_set)
  loader = packing.Loader(split, seq_len=seq_len, batch_size=64, shuffle=False, eval_mode=True)
  matched = total = length = 0
  for b in loader:
    mask = b['loss_mask'] > 0
    hit = mask & (b['fgram_ids'] >= 0)
    total += int(mask.sum())
    matched += int(hit.sum())
    length += int(b['fgram_lengths'][hit].sum())
  return {'match_rate': matched / max(total, 1),
          'mean_matched_len': length / max(matched, 1)}


# ----------------------------------------------------------------------------- report


def _rows(root, points):
  rows = []
  for p in points:
    path = os.path.join(root, 'points', p['name'], RESULT_FILE)
    if not os.path.isfile(path):
      continue
    r = _read_json(path)
    row = {'name': p['name'], 'group': '+'.join(p['group']), 'code': p.get('code', '')}
    for k, v in r.items():
      if k in ('evals', 'seconds'):
        continue
      row[k] = v
    for set_name, ev in sorted(r['evals'].items()):
      for k in ('ppl', 'loss', 'bits_per_byte', 'tokens', 'match_rate', 'mean_matched_len'):
        if k in ev:
          row[f'{set_name}_{k}'] = ev[k]
    rows.append(row)
  return rows


def write_report(root, points):
  """results.csv (one row per finished point, no timings: reruns give the same file) + plots."""
  rows = _rows(root, points)
  columns = []
  for r in rows:
    for k in r:
      if k not in columns:
        columns.append(k)
  tmp = os.path.join(root, f'{CSV_FILE}.tmp{os.getpid()}')
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    for r in rows:
      w.writerow({k: _fmt(r.get(k)) for k in columns})
  os.replace(tmp, os.path.join(root, CSV_FILE))
  _write_markdown(root, rows)
  if rows:
    _plots(root, rows, points)
  return rows


_MD_COLUMNS = (
    ('point', 'name', '{}'), ('code', 'code', '{}'), ('seed', 'seed', '{}'),
    ('main d×L', None, None),
    ('S', 'num_fgrams', '{:,}'), ('K', 'max_len', '{}'), ('f-gram layers', 'fgram_layers', '{}'),
    ('train tokens', 'train_tokens', '{:,}'), ('main params', 'params_main', '{:,}'),
    ('f-gram params', 'params_fgram_model', '{:,}'),
    ('inference MFLOPs/tok', 'inference_flops_per_token', None),
    ('train MFLOPs/tok', 'train_flops_per_token', None),
    ('held-out ppl', 'heldout_ppl', '{:.2f}'), ('wiki ppl', 'wiki_ppl', '{:.2f}'),
    ('shakespeare ppl', 'shakespeare_ppl', '{:.2f}'),
    ('held-out match rate', 'heldout_match_rate', '{:.3f}'))


def _write_markdown(root, rows):
  """results.md: the table experiments/README.md shows, made from the same rows."""
  lines = ['| ' + ' | '.join(c[0] for c in _MD_COLUMNS) + ' |',
           '|' + '---|' * len(_MD_COLUMNS)]
  for r in rows:
    cells = []
    for _, key, fmt in _MD_COLUMNS:
      if key is None:
        cells.append(f"{r['d_model']}×{r['num_layers']}")
      elif key not in r or r[key] in (None, ''):
        cells.append('')
      elif fmt is None:
        cells.append(f'{float(r[key]) / 1e6:.2f}')
      else:
        cells.append(fmt.format(r[key]))
    lines.append('| ' + ' | '.join(cells) + ' |')
  tmp = os.path.join(root, f'results.md.tmp{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  os.replace(tmp, os.path.join(root, 'results.md'))


def _fmt(v):
  if isinstance(v, float):
    return f'{v:.6g}'
  return '' if v is None else v


def _varying_key(members):
  keys = set()
  for p in members:
    keys |= {k for k in p if k not in _SPECIAL and k != 'seed'}
  for k in sorted(keys):
    if len({json.dumps(p.get(k)) for p in members}) > 1:
      return k
  return None


_X_COLUMN = {'fgrams.num_fgrams': 'num_fgrams', 'fgrams.max_len': 'max_len',
             'fgram_model.num_layers': 'params_fgram_model',
             'fgram_model.mlp_dim': 'params_fgram_model', 'model.d_model': 'inference_flops_per_token',
             'num_train_steps': 'train_tokens'}


def _scatter_baseline_vs_scone(rows, sets, column, xlabel, path, *, names):
  """One panel per eval set: ppl against `column` (log scale), baselines and SCONE apart."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
  for ax, s in zip(axes[0], sets):
    for scone, marker, label in ((False, 's', 'baseline'), (True, 'o', 'SCONE')):
      pts = [(r[column], r[f'{s}_ppl'], r['name']) for r in rows
             if bool(r['scone']) == scone and f'{s}_ppl' in r and r.get(column)]
      if pts:
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, label=label,
                   alpha=0.8)
        for x, y, name in pts if names else ():
          ax.annotate(name, (x, y), fontsize=4, alpha=0.7)
    ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f'{s} ppl')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plots(root, rows, points):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sets = sorted({k[:-len('_ppl')] for r in rows for k in r if k.endswith('_ppl')})
  by_name = {r['name']: r for r in rows}

  def panel(ax_list, xs_fn, members, label, marker):
    for ax, s in zip(ax_list, sets):
      pts = sorted((xs_fn(by_name[p['name']]), by_name[p['name']][f'{s}_ppl'])
                   for p in members if p['name'] in by_name
                   and f'{s}_ppl' in by_name[p['name']])
      if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=label)

  groups = {}
  for p in points:
    for g in p['group']:
      groups.setdefault(g, []).append(p)
  for group, members in sorted(groups.items()):
    key = _varying_key(members)
    if key is None or sum(p['name'] in by_name for p in members) < 2:
      continue   # nothing to compare yet
    column = _X_COLUMN.get(key, None)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
    for seed in sorted({by_name[p['name']]['seed'] for p in members if p['name'] in by_name}):
      mine = [p for p in members if p['name'] in by_name and by_name[p['name']]['seed'] == seed]
      panel(axes[0], (lambda r: r[column]) if column else
            (lambda r, k=key: _lookup(points, r['name'], k)), mine, f'seed {seed}', 'o')
    for ax, s in zip(axes[0], sets):
      ax.set_xlabel(column or key)
      ax.set_ylabel(f'{s} ppl')
      if column in ('num_fgrams', 'params_fgram_model', 'inference_flops_per_token',
                    'train_tokens'):
        ax.set_xscale('log')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f'{group}: ppl vs {column or key}')
    fig.tight_layout()
    fig.savefig(os.path.join(root, f'{group}.png'), dpi=110)
    plt.close(fig)

  # The paper's headline picture: ppl vs inference FLOPs/token, baselines and SCONE together;
  # and the training-compute view: ppl vs training FLOPs (the whole run), points named.
  _scatter_baseline_vs_scone(rows, sets, 'inference_flops_per_token', 'inference FLOPs / token',
                             os.path.join(root, 'ppl_vs_inference_flops.png'), names=False)
  _scatter_baseline_vs_scone(rows, sets, 'train_flops', 'training FLOPs (whole run)',
                             os.path.join(root, 'ppl_vs_training_flops.png'), names=True)

  # Learning curves: held-out ppl vs training tokens, every point.
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for r in rows:
    path = os.path.join(root, 'points', r['name'], 'curve.json')
    if not os.path.isfile(path):
      continue
    curve = _read_json(path)
    cfg = _read_json(os.path.join(root, 'points', r['name'], 'config.json'))
    tok = cfg['batch_size'] * cfg['seq_len']
    if len(curve) >= 2:
      ax.plot([c['step'] * tok for c in curve], [c['ppl'] for c in curve],
              linestyle='-' if r['scone'] else '--', label=r['name'], linewidth=1)
  ax.set_xlabel('training tokens')
  ax.set_ylabel('held-out ppl (training-time eval)')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'ppl_vs_training_tokens.png'), dpi=110)
  plt.close(fig)


def _lookup(points, name, key):
  for p in points:
    if p['name'] == name:
      return p.get(key)
  return None


# ----------------------------------------------------------------------------- driver


_claims = {}   # point_dir -> this runner's artifacts.ExclusiveLock on it


def _claim(point_dir) -> bool:
  """Claims a point for this process (points/<name>/claim.json, the same exclusive-create
  lock as a run's run.lock); False when a live runner holds it. A claim whose runner is gone
  (same host, pid not running) is taken over."""
  os.makedirs(point_dir, exist_ok=True)
  lock = artifacts.ExclusiveLock(os.path.join(point_dir, 'claim.json'))
  if not lock.try_acquire():
    return False
  _claims[point_dir] = lock
  return True


def _release(point_dir):
  lock = _claims.pop(point_dir, None)
  if lock is not None:
    lock.release()


def run_sweep(sweep_path, root, *, only=None) -> dict:
  """Runs (or resumes) the sweep's unfinished, unclaimed points; returns a status count."""
  base, points, evals = load_sweep(sweep_path)
  os.makedirs(root, exist_ok=True)
  status = {'done': 0, 'ran': 0, 'failed': 0, 'skipped': 0}
  # Largest S per f-gram group, over all points: one extraction per group. Shared pieces
  # are made under a lock, so runners started together make each of them once.
  fgram_sizes = {}
  os.makedirs(os.path.join(root, 'shared'), exist_ok=True)
  with open(os.path.join(root, 'shared', '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for p in points:
      cfg = resolve(base, p)
      tokenizer_path = shared_tokenizer(cfg, root)
      if cfg.fgrams.enabled:
        key = _digest(_fgram_group_key(cfg, tokenizer_path))
        fgram_sizes[key] = max(fgram_sizes.get(key, 0), cfg.fgrams.num_fgrams)
    for p in points:
      cfg = resolve(base, p)
      if cfg.fgrams.enabled:
        tokenizer_path = shared_tokenizer(cfg, root)
        shared_fgrams(cfg, tokenizer_path,
                      fgram_sizes[_digest(_fgram_group_key(cfg, tokenizer_path))], root)
  for i, p in enumerate(points):
    point_dir = os.path.join(root, 'points', p['name'])
    if os.path.isfile(os.path.join(point_dir, RESULT_FILE)):
      status['done'] += 1
      continue
    if (only and p['name'] not in only) or not _claim(point_dir):
      status['skipped'] += 1
      continue
    t0 = time.time()
    logging.info('point %d/%d %s: starting', i + 1, len(points), p['name'])
    try:
      point_dir = prepare_point(base, p, root, fgram_sizes)
      result = run_point(point_dir, evals)
      _write_json(os.path.join(point_dir, RESULT_FILE), result)
      src = os.path.join(point_dir, 'run', 'metrics.jsonl')
      with open(src) as f, open(os.path.join(point_dir, 'metrics.jsonl'), 'w') as g:
        g.write(f.read())
      if os.path.exists(os.path.join(point_dir, FAILED_FILE)):
        os.remove(os.path.join(point_dir, FAILED_FILE))
      status['ran'] += 1
      heldout = result['evals'].get('heldout', {}).get('ppl', float('nan'))
      logging.info('point %s done in %.0fs: held-out ppl %.2f', p['name'], time.time() - t0,
                   heldout)
    except Exception as e:  # pylint: disable=broad-except
      # One bad point must not lose the others: record it and go on.
      status['failed'] += 1
      stage = getattr(e, 'stage', type(e).__name__)
      os.makedirs(point_dir, exist_ok=True)
      _write_json(os.path.join(point_dir, FAILED_FILE),
                  {'stage': stage, 'error': str(e)[-4000:], 'time': time.time()})
      logging.error('point %s failed at %s: %s', p['name'], stage, str(e)[-600:])
    finally:
      _release(point_dir)
    write_report(root, points)
  write_report(root, points)
  return status


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', help='sweep file with get_sweep()')
  parser.add_argument('--root', help='directory for the sweep (resumable)')
  parser.add_argument('--only', default='', help='comma-separated point names')
  parser.add_argument('--report_only', action='store_true')
  parser.add_argument('--eval_point', help=argparse.SUPPRESS)
  parser.add_argument('--eval_sets', default='{}', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  if args.eval_point:
    eval_point(args.eval_point, json.loads(args.eval_sets))
    return 0
  if not args.sweep or not args.root:
    parser.error('--sweep and --root are required')
  if not os.path.isfile(args.sweep):
    parser.error(f'--sweep={args.sweep}: no such file')
  if args.report_only:
    _, points, _ = load_sweep(args.sweep)
    rows = write_report(args.root, points)
    print(json.dumps({'points': len(points), 'finished': len(rows)}))
    return 0
  status = run_sweep(args.sweep, args.root, only=set(filter(None, args.only.split(','))))
  print(json.dumps(status))
  return 1 if status['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
