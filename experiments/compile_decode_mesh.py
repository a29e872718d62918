"""Serving's decode step split over chips (`--mesh=tensor:N`), compiled for a TPU topology
from any host: memory per chip at N = 1, 2, 4, 8.

The step is the decode chunk serving runs (`compile.compile_decode`, what `--mode=compile
--mesh=tensor:N` compiles; the table and matcher in host memory by default) with the
parameters, the decode state and the arguments in serving's mesh shardings
(`serving.mesh_rules`, `serving.state_shardings`, `serving.jit_on_mesh`: what
`Generator(mesh=...)` runs), lowered
for the first N chips of the topology and compiled by libtpu's TPU compiler (no TPU needed;
`pip install -e ".[tpu]"`). N = 1 is the one-chip baseline in the same run.

  python -m experiments.compile_decode_mesh --config=experiments/configs/olmo1b.py:0.6b \
      --topology=v5e:2x4 --tensor=1,2,4,8

The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import sys

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.compile_decode_mesh')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host only compiles

from experiments import configs  # pylint: disable=g-import-not-at-top
from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='experiments/configs/olmo1b.py:0.6b')
  parser.add_argument('--topology', default='v5e:2x4')
  parser.add_argument('--tensor', default='1,2,4,8', help='tensor sizes to compile')
  args = parser.parse_args()
  cfg = configs.load(args.config)
  devices = compile_lib.topology_devices(args.topology)
  out = {'config': args.config, 'topology': args.topology,
         'device_kind': devices[0].device_kind, 'batch': int(cfg.compile.decode_batch),
         'cache_len': int(cfg.compile.decode_len or cfg.seq_len),
         'tensor': {}}
  for n in (int(x) for x in args.tensor.split(',')):
    report = compile_lib.compile_decode(cfg, devices, tensor=n)
    mem = report.get('memory', {})
    print(f'tensor:{n}: fits={report["fits"]} '
          f'{mem.get("total", 0) / 2**30:.2f} GiB per chip '
          f'({mem.get("fraction_of_hbm", float("nan")):.1%} of HBM), '
          f'collectives {report.get("collectives")}', flush=True)
    out['tensor'][str(n)] = report
  base = out['tensor'].get('1', {}).get('memory', {}).get('total')
  for n, report in out['tensor'].items():
    total = report.get('memory', {}).get('total')
    if base and total:
      report['memory_vs_one_chip'] = total / base
  print(json.dumps(out))


if __name__ == '__main__':
  main()
