"""Why SCONE wins or loses: held-out loss split by f-gram match length, and table scale.

  python -m experiments.analyze_study --root=experiments/results/cpu_study \
      [--reference=scone_xs_16k_s0] [--points=a,b,...]

For every finished point (its run/ directory must still be on disk), evaluates the held-out
split through the serving path — the export for SCONE points, the checkpoint's parameters
for baselines — splitting the loss by the length of the longest f-gram of ONE reference
set at each position (rule 4b applied), so every point is compared at the same positions.
For SCONE points it also reports the held-out ppl the old packing rule (f-grams reaching
back before a row's start) would have given, the table rows' norm against the token embedding's (the
f-gram model's output scale relative to T) and how often the set's f-grams occur in the
training corpus. Writes ROOT/analysis.json and ROOT/loss_by_match_length.png; the last
line printed is one JSON object.

  python -m experiments.analyze_study --root=... --fgram_counts [--shared_from=DIR,...]

needs no run/ directory: for every finished SCONE point, how often its f-grams occur in the
training split (min / 10th percentile / median / max of the set's counts), from the
point's own fgrams.npz or a shared extraction (ROOT/shared, or --shared_from) whose first
S ids have the fingerprint the point's result.json records. Writes ROOT/fgram_counts.json.
"""
import argparse
import json
import os
import sys

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.analyze_study')

import numpy as np


def _generator(point_dir, cfg):
  """A serving Generator: the export for SCONE, the checkpoint's main params for baselines."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scone_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  from scone_jax import sharding  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(point_dir, 'run')
  if cfg.fgrams.enabled:
    return serving.load(os.path.join(workdir, 'export'))
  tokenizer = corpus.Tokenizer(os.path.join(workdir, 'tokenizer.model'))
  mc = model_lib.ModelConfig.from_config(cfg, tokenizer.vocab_size)
  model = model_lib.SconeLM(mc)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rules = sharding.logical_axis_rules(cfg)
  abstract, _ = sharding.abstract_params(model, {'inputs_BxL': jnp.zeros((1, 1), jnp.int32)},
                                         mesh, rules)
  params, _ = checkpoints.restore_latest_params(os.path.join(workdir, 'checkpoints'), abstract)
  return serving.Generator(dataclasses.replace(mc, fgrams_enabled=False), params, None, None,
                           tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                           use_table=False)


def analyze_point(point_dir, reference) -> dict:
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from_json = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'from_json.py')
  cfg = configs.load(f'{from_json}:{os.path.join(point_dir, "config.json")}')
  run = artifacts.prepare_run(cfg, os.path.join(point_dir, 'run'))
  gen = _generator(point_dir, cfg)
  ev = gen.evaluate(run.heldout_docs, split_by=reference)
  out = {'scone': bool(cfg.fgrams.enabled), 'heldout_loss': ev['loss'],
         'by_match_length': ev['by_match_length']}
  if cfg.fgrams.enabled:
    # What the old packing rule reported: matches reaching back before the row start (the
    # fair-protocol fix, rule 4b in packing.py, switched off for this one measurement).
    from scone_jax import packing  # pylint: disable=g-import-not-at-top
    fair = packing.limit_to_row
    packing.limit_to_row = lambda rows, fgram_set: rows
    try:
      leak = gen.evaluate(run.heldout_docs)
    finally:
      packing.limit_to_row = fair
    out['heldout_loss_row_leak'] = leak['loss']
    out['heldout_ppl'] = float(np.exp(ev['loss']))
    out['heldout_ppl_row_leak'] = float(np.exp(leak['loss']))
    table = np.asarray(gen.table.array, np.float32)
    embed = np.asarray(gen.params['token_embed']['embedding'], np.float32)
    out['table_row_norm'] = float(np.linalg.norm(table, axis=1).mean())
    out['token_embed_row_norm'] = float(np.linalg.norm(embed, axis=1).mean())
    counts = np.asarray(gen.fgram_set.counts)
    out['fgram_count_min'] = int(counts.min())
    out['fgram_count_median'] = float(np.median(counts))
  return out


def _find_set(point_dir, result, shared_dirs):
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  want, n = result['fgram_fingerprint'], result['num_fgrams']
  own = os.path.join(point_dir, 'fgrams.npz')
  candidates = [own] if os.path.isfile(own) else []
  for d in shared_dirs:
    if os.path.isdir(d):
      candidates += sorted(os.path.join(d, f) for f in os.listdir(d)
                           if f.startswith('fgrams-') and f.endswith('.npz'))
  for path in candidates:
    fs = fgrams.FGramSet.load(path)
    if len(fs) >= n and fs.top(n).fingerprint == want:
      return fs.top(n), path
  return None, None


def fgram_counts(root, shared_dirs) -> dict:
  points_dir = os.path.join(root, 'points')
  out = {}
  for name in sorted(os.listdir(points_dir)):
    path = os.path.join(points_dir, name, 'result.json')
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      result = json.load(f)
    if not result.get('scone'):
      continue
    fs, source = _find_set(os.path.join(points_dir, name), result,
                           [os.path.join(root, 'shared'), *shared_dirs])
    if fs is None:
      print(f'{name}: no f-gram set with fingerprint {result["fgram_fingerprint"][:12]} found; '
            'skipped', flush=True)
      continue
    counts = np.asarray(fs.counts)
    out[name] = {'num_fgrams': len(fs), 'max_len': result['max_len'],
                 'fingerprint': fs.fingerprint, 'count_min': int(counts.min()),
                 'count_p10': float(np.percentile(counts, 10)),
                 'count_median': float(np.median(counts)), 'count_max': int(counts.max()),
                 'source': os.path.basename(source)}
    print(name, json.dumps(out[name]), flush=True)
  with open(os.path.join(root, 'fgram_counts.json'), 'w') as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True)
  parser.add_argument('--reference', default='scone_xs_16k_s0',
                      help='point whose f-gram set splits the positions')
  parser.add_argument('--points', default='', help='comma-separated; default: all finished')
  parser.add_argument('--fgram_counts', action='store_true',
                      help='only the f-gram count statistics (no run/ directory needed)')
  parser.add_argument('--shared_from', default='',
                      help='comma-separated directories holding shared extractions')
  args = parser.parse_args(argv)
  if args.fgram_counts:
    out = fgram_counts(args.root, [d for d in args.shared_from.split(',') if d])
    print(json.dumps({'fgram_counts': out}))
    return
  from scone_jax import fgrams  # pylint: disable=g-import-not-at-top
  points_dir = os.path.join(args.root, 'points')
  reference = fgrams.FGramSet.load(os.path.join(points_dir, args.reference, 'fgrams.npz'))
  names = [n for n in (args.points.split(',') if args.points else sorted(os.listdir(points_dir)))
           if os.path.isfile(os.path.join(points_dir, n, 'result.json'))
           and os.path.isdir(os.path.join(points_dir, n, 'run'))]
  results = {}
  for name in names:
    results[name] = analyze_point(os.path.join(points_dir, name), reference)
    print(name, json.dumps(results[name]), flush=True)
  with open(os.path.join(args.root, 'analysis.json'), 'w') as f:
    json.dump({'reference': args.reference, 'points': results}, f, indent=2, sort_keys=True)
  _plot(args.root, results)
  print(json.dumps({'reference': args.reference, 'points': results}))


def _plot(root, results):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  names = sorted(results)
  lengths = sorted({int(k) for r in results.values() for k in r['by_match_length']})
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    by = results[name]['by_match_length']
    ax.bar([l + i * width for l in lengths], [by.get(l, by.get(str(l), {})).get('loss', 0)
                                               for l in lengths], width, label=name)
  ax.set_xlabel('length of the reference f-gram ending at the input (1 = none)')
  ax.set_ylabel('held-out loss (nats)')
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'loss_by_match_length.png'), dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
