"""Peak RSS of streaming a large Parquet file vs one a quarter its size (issue 22's memory
proof at full size), with bench_data.py's own writer and reader, each read in a fresh process.

  python -m experiments.parquet_rss --source=CORPUS.parquet --work=DIR [--mb=2000]

--source: any Parquet corpus with `id` and `text` columns (bench_data.py --only=formats
writes one as formats-N/corpus.parquet); its documents are repeated under fresh ids.
Prints one JSON line last.
"""
import argparse
import json
import os
import sys

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.parquet_rss')

from experiments import bench_data  # pylint: disable=g-import-not-at-top
from scone_jax import corpus  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', required=True)
  parser.add_argument('--work', required=True)
  parser.add_argument('--mb', type=int, default=2000)
  args = parser.parse_args()
  os.makedirs(args.work, exist_ok=True)
  docs = list(corpus.iter_documents([args.source]))
  out = {'bench': 'data_parquet_rss', 'host_cpus': os.cpu_count(),
         'source_documents': len(docs)}
  big = bench_data.write_big_parquet(docs, os.path.join(args.work, f'big-{args.mb}mb.parquet'),
                                     args.mb)
  quarter = bench_data.write_big_parquet(
      docs, os.path.join(args.work, f'big-{args.mb // 4}mb.parquet'), args.mb // 4)
  print('written', big, quarter, flush=True)
  # pylint: disable=protected-access
  out['parquet_rss'] = {'large': bench_data._in_subprocess('parquet_read_rss', big),
                        'quarter': bench_data._in_subprocess('parquet_read_rss', quarter)}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
