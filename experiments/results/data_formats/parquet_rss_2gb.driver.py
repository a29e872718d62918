"""Peak RSS of streaming a 2 GB Parquet file vs a 500 MB one (issue 22's proof), using
experiments/bench_data.py's own writer and reader functions."""
import json, os, sys, platform
sys.path.insert(0, '/work/wt/merge/experiments'); sys.path.insert(0, '/work/wt/merge')
import bench_data
from scone_jax import corpus
docs = list(corpus.iter_documents(['/tmp/i22bench/formats-4925/corpus.parquet']))
out = {'bench': 'data_parquet_rss', 'host_cpus': os.cpu_count(), 'source_documents': len(docs)}
big = bench_data.write_big_parquet(docs, '/tmp/pq2g/big-2000mb.parquet', 2000)
quarter = bench_data.write_big_parquet(docs, '/tmp/pq2g/big-500mb.parquet', 500)
print('written', flush=True)
out['parquet_rss'] = {'large': bench_data._in_subprocess('parquet_read_rss', big),
                      'quarter': bench_data._in_subprocess('parquet_read_rss', quarter)}
print(json.dumps(out))
