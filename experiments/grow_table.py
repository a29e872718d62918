"""Grow or retarget a trained run's f-gram table (issue 29), evaluated from each export.

  python -m experiments.grow_table --workdir=runs/scone_s0 --workdir=runs/scone_s1 \
      --out=experiments/results/grow_table/grow_table.json
  # or one process per seed, side by side, then their JSONs summarised together:
  python -m experiments.grow_table --combine=seed0.json,seed1.json --out=grow_table.json

Each --workdir is a trained SCONE run (its config.json and checkpoints; one per seed). Per
run, every cell is an `--mode=extract` of some text with the run's tokenizer, an export of
the run's checkpoint for that set (`export.export(..., fgram_set_paths=...)`, what
`--fgram_set` does) and an evaluation from the export (the serving path):

- more f-grams than trained (`--sizes`): the training split's f-grams at S' (the run's own
  S is the control; 0 = every n-gram of count >= min_count), the run's K; ppl on the
  held-out split and `--eval_chars` of each out-of-domain corpus.
- a new domain (`--domains`: wiki, shakespeare, or text:PATH): its documents split in two
  by a hash of the document id (a play's file name, a wiki title, `<file>#<n>`), one half
  extracted whole (heldout_fraction=0, the run's S and K), the other evaluated (at most
  `--eval_chars`): the training set (control), the domain's set alone, and their union.
  The evaluation half's text never reaches an extraction.

Not here: the same S' trained from scratch (a sweep point) and training-time remedies
(they change training). Extractions and exports go under --scratch (default: beside
--out), one directory per run and cell, reused when rerun. Prints one JSON line last: per
cell and eval set each seed's ppl and match rate, their mean and spread (max - min).
"""
import argparse
import json
import os
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.grow_table')

import numpy as np

from experiments import configs
from scone_jax import artifacts
from scone_jax import corpus
from scone_jax import export
from scone_jax import paths
from scone_jax import serving


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', action='append', default=[],
                 help='a trained run (one per seed); repeat the flag')
  p.add_argument('--combine', default='',
                 help='comma-separated JSONs of earlier runs (e.g. one per seed, run side by '
                      'side) to summarise together with any --workdir')
  p.add_argument('--sizes', default='16000,64000,256000,0',
                 help="S' of the training split's sets (0: every n-gram of count >= min_count)")
  p.add_argument('--domains', default='shakespeare,wiki',
                 help='wiki, shakespeare or text:PATH (blank-line-separated documents)')
  p.add_argument('--eval_chars', type=int, default=400_000,
                 help='characters of each out-of-domain eval set (0: all)')
  p.add_argument('--out', default='experiments/results/grow_table/grow_table.json')
  p.add_argument('--scratch', default='', help='extractions and exports (default: beside --out)')
  return p.parse_args(argv)


def _domain_documents(name: str) -> list:
  if name.startswith('text:'):
    return corpus.read_text_documents([name[len('text:'):]])
  return corpus.eval_corpus(name)


def _cap(docs, max_chars):
  """The first documents in hash order up to max_chars (as corpus.eval_corpus caps)."""
  if max_chars <= 0:
    return list(docs)
  out, used = [], 0
  for d in sorted(docs, key=lambda d: corpus.heldout_score(d.id)):
    if used >= max_chars:
      break
    text = d.text[:max_chars - used]
    out.append(corpus.Document(d.id, text))
    used += len(text)
  return out


def split_domain(docs) -> tuple[list, list]:
  """(extraction half, evaluation half) by a hash of each document's id (salted, so the
  halves are not the eval corpus' own hash order)."""
  halves = ([], [])
  for d in docs:
    halves[corpus.heldout_score('grow_table:' + d.id) < 0.5].append(d)
  return halves


def _write_jsonl(path, docs):
  paths.makedirs(os.path.dirname(path))
  paths.atomic_write(path, ''.join(json.dumps({'id': d.id, 'text': d.text}, ensure_ascii=False)
                                   + '\n' for d in docs))


def extract(run_workdir, workdir, *, num_fgrams, train_files=None) -> str:
  """--mode=extract with the run's tokenizer and K: the run's corpus, or train_files whole."""
  cfg = configs.load('experiments/configs/from_json.py:'
                     + os.path.join(run_workdir, artifacts.CONFIG_FILE))
  cfg.tokenizer.path = os.path.join(run_workdir, artifacts.TOKENIZER_FILE)
  cfg.fgrams.path = ''
  cfg.fgrams.num_fgrams = int(num_fgrams)
  cfg.input_pipeline = 'numpy'  # no token shards: only the f-grams are wanted
  if train_files:
    cfg.corpus.name, cfg.corpus.train_files = 'text', train_files
    cfg.corpus.eval_files, cfg.corpus.heldout_fraction = '', 0.0
  artifacts.prepare_run(cfg, workdir, need_heldout=False)
  return os.path.join(workdir, artifacts.FGRAMS_FILE)


def evaluate_export(cfg, run_workdir, run, export_dir, fgram_paths, eval_sets) -> dict:
  t0 = time.time()
  summary = export.export(cfg, run_workdir, run, export_dir, fgram_set_paths=fgram_paths)
  gen = serving.load(export_dir)
  rec = gen.metadata['fgram_set']
  out = {'fgram_set': {k: rec[k] for k in ('fingerprint', 'num_fgrams', 'max_len',
                                           'cut_to_trained_max_len')},
         'sources': [s['path'] for s in rec['sources']], 'export_seconds': summary['seconds']}
  for name, docs in eval_sets.items():
    ev = gen.evaluate(docs)
    out[name] = {'ppl': ev['ppl'], 'match_rate': ev['fgram_match_rate'], 'tokens': ev['tokens']}
  out['seconds'] = time.time() - t0
  print(json.dumps({'cell': export_dir, **out}), flush=True)
  return out


def own_set_file(run_workdir, run, base, num_fgrams) -> str:
  """The run's f-gram set as a file with its fgrams.json, which the union cell loads as it
  loads any extracted set. A sweep point's set lies outside its workdir, with no fgrams.json
  (points/<name>/fgrams.npz, a cut of the sweep's shared extraction): extract it again at
  the trained S (ids are ranks, so the same set; the more_S<S> cell reuses it) and check."""
  own = os.path.join(run_workdir, artifacts.FGRAMS_FILE)
  if os.path.isfile(own) and os.path.isfile(artifacts.fgram_set_meta_path(own)):
    return own
  path = extract(run_workdir, os.path.join(base, f'more_S{num_fgrams}'), num_fgrams=num_fgrams)
  _, source = artifacts.load_fgram_set(path, run.tokenizer)
  if source['fingerprint'] != run.fgram_set.fingerprint:
    raise ValueError(f'{run_workdir}: the training split extracted at S={num_fgrams} gives '
                     f'set {source["fingerprint"][:12]}, not the run\'s '
                     f'{run.fgram_set.fingerprint[:12]}; put the run\'s fgrams.npz with its '
                     'fgrams.json (--mode=extract) in the workdir.')
  return path


def run_one(run_workdir, args, scratch) -> dict:
  cfg = configs.load('experiments/configs/from_json.py:'
                     + os.path.join(run_workdir, artifacts.CONFIG_FILE))
  run = artifacts.prepare_run(cfg, run_workdir)
  out = {'workdir': os.path.abspath(run_workdir), 'seed': int(cfg.seed),
         'trained_S': int(cfg.fgrams.num_fgrams), 'K': int(cfg.fgrams.max_len), 'cells': {}}
  base = os.path.join(scratch, f'seed{cfg.seed}')
  own = own_set_file(run_workdir, run, base, int(cfg.fgrams.num_fgrams))
  ood = {n: corpus.eval_corpus(n, args.eval_chars) for n in args.domains.split(',')
         if n in corpus.EVAL_CORPORA}
  general = {'heldout': run.heldout_docs, **ood}
  for size in (int(x) for x in args.sizes.split(',')):
    name = f'more_S{size or "all"}'
    path = extract(run_workdir, os.path.join(base, name), num_fgrams=size or 10**9)
    cell = evaluate_export(cfg, run_workdir, run, os.path.join(base, name, 'export'), [path],
                           general)
    # The control: extraction at the trained S gives the trained set itself.
    cell['is_trained_set'] = cell['fgram_set']['fingerprint'] == run.fgram_set.fingerprint
    out['cells'][name] = cell
  for domain in args.domains.split(','):
    tag = (os.path.splitext(os.path.basename(domain[len('text:'):]))[0]
           if domain.startswith('text:') else domain)
    extract_half, eval_half = split_domain(_domain_documents(domain))
    files = os.path.join(base, f'domain_{tag}', 'extract_half.jsonl')
    _write_jsonl(files, extract_half)
    path = extract(run_workdir, os.path.join(base, f'domain_{tag}'),
                   num_fgrams=cfg.fgrams.num_fgrams, train_files=files)
    evals = {f'{tag}_eval_half': _cap(eval_half, args.eval_chars)}
    for cell, sets in (('training', None), ('domain', [path]), ('union', [own, path])):
      out['cells'][f'{tag}_{cell}'] = evaluate_export(
          cfg, run_workdir, run, os.path.join(base, f'domain_{tag}', f'export_{cell}'), sets,
          evals)
  return out


def summarise(runs) -> dict:
  """Per cell and eval set: each seed's ppl and match rate, mean and spread (max - min)."""
  table = {}
  for r in runs:
    for cell, res in r['cells'].items():
      for name, ev in res.items():
        if isinstance(ev, dict) and 'ppl' in ev:
          row = table.setdefault(cell, {}).setdefault(name, {'ppl': {}, 'match_rate': {}})
          row['ppl'][f'seed{r["seed"]}'] = ev['ppl']
          row['match_rate'][f'seed{r["seed"]}'] = ev['match_rate']
  for cell in table.values():
    for row in cell.values():
      ppl = np.array(list(row['ppl'].values()))
      row['ppl_mean'], row['ppl_spread'] = float(ppl.mean()), float(ppl.max() - ppl.min())
  return table


def main(argv=None):
  args = _args(sys.argv[1:] if argv is None else argv)
  scratch = args.scratch or os.path.join(os.path.dirname(os.path.abspath(args.out)), 'scratch')
  if not args.workdir and not args.combine:
    sys.exit('grow_table: give at least one --workdir (a trained run) or --combine=JSON,...')
  runs = [r for path in filter(None, args.combine.split(','))
          for r in json.loads(paths.read_text(path))['runs']]
  runs += [run_one(w, args, scratch) for w in args.workdir]
  seeds = [r['seed'] for r in runs]
  if len(set(seeds)) != len(seeds):
    sys.exit(f'grow_table: two runs with the same seed ({seeds}); combine one run per seed')
  result = {'experiment': 'grow_table', 'runs': runs, 'summary': summarise(runs)}
  paths.makedirs(os.path.dirname(os.path.abspath(args.out)))
  paths.atomic_write(args.out, json.dumps(result, indent=1) + '\n')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
