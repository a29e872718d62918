"""Where the f-gram path lives and what it costs the accelerator: serving's decode chunk
(`compile.compile_decode`, what `--mode=compile` compiles) compiled for a TPU chip from any
host with S f-grams, for each matcher storage with the table in host memory (and the table
on the device for comparison).

  python -m experiments.compile_decode_fgram_path --config=experiments/configs/scone.py \
      --topology=v5e:2x2 --num_fgrams=1000,1000000

Per (table storage, matcher storage, S): accelerator bytes (arguments, temporaries,
outputs, total) and host bytes (host arguments). The last line printed is one JSON object.
"""
import argparse
import json
import os
import sys

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.compile_decode_fgram_path')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host only compiles

from experiments import configs  # pylint: disable=g-import-not-at-top
from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top

PAIRS = (('host', 'host'), ('host', 'device'), ('device', 'device'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='experiments/configs/scone.py')
  parser.add_argument('--topology', default='v5e:2x2')
  parser.add_argument('--num_fgrams', default='1000,1000000')
  parser.add_argument('--pairs', default=','.join(f'{t}:{m}' for t, m in PAIRS),
                      help='table_storage:matcher_storage pairs')
  args = parser.parse_args()
  devices = compile_lib.topology_devices(args.topology)
  out = {'config': args.config, 'topology': args.topology,
         'device_kind': devices[0].device_kind, 'runs': {}}
  for pair in args.pairs.split(','):
    table, matcher = pair.split(':')
    for s in (int(x) for x in args.num_fgrams.split(',')):
      cfg = configs.load(args.config)
      with cfg.unlocked():
        cfg.fgrams.num_fgrams = s
      r = compile_lib.compile_decode(cfg, devices, table_storage=table, matcher_storage=matcher)
      m = r.get('memory', {})
      print(f'table {table}, matcher {matcher}, S={s:,}: fits={r["fits"]} accelerator '
            f'{m.get("total", 0) / 2**20:.1f} MiB (arguments {m.get("arguments", 0):,}), host '
            f'arguments {m.get("host_arguments", 0):,} bytes', flush=True)
      out['runs'][f'{table}:{matcher}:{s}'] = r
      out.update(batch=r['batch'], cache_len=r['cache_len'], max_len=r['max_len'],
                 tokens_per_dispatch=r['tokens_per_dispatch'])
  print(json.dumps(out))


if __name__ == '__main__':
  main()
