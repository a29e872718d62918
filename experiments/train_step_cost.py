"""What the SCONE train step costs beyond its FLOPs: the compiled step vs the baseline's.

Without a GPU, the next best evidence for issue 20's gap (SCONE/baseline step time 1.63x on
an H200 where flops.py predicts 1.11x) is the compiled program: this compiles the train step
of the baseline and of SCONE (same main model; the f-gram model's packed rows fixed at
--fgram_rows) for a TPU topology with libtpu (as --mode=compile does, no TPU needed) or for
this host's CPU, and reports per step: XLA's FLOPs and bytes accessed, flops.py's model FLOPs,
and a census of the optimized HLO (scatters and gathers with their element types and sizes,
converts, fusions). Ratios SCONE/baseline sit beside the FLOPs-predicted ratio: what grows
out of proportion is what to fix.

  python -m experiments.train_step_cost --topology=v5e:2x2 [--set model.attention=einsum]

Default shape: issue 20's (d768x12 bf16 main model, a 2-layer f-gram model of that width,
32x512 tokens per step, 4,096-piece vocab, 768 packed rows of 16 slots = 12,288 f-gram
positions per step, as measured there). The last line printed is one JSON object.
"""
import argparse
import collections
import gzip
import json
import os
import re
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.train_step_cost')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from scone_jax import flops  # pylint: disable=g-import-not-at-top
from scone_jax import sharding  # pylint: disable=g-import-not-at-top
from scone_jax import step_batch  # pylint: disable=g-import-not-at-top
from scone_jax import train  # pylint: disable=g-import-not-at-top

# An HLO instruction: `name = type[dims]{layout} opcode(` (tuple-shaped ones skipped).
_INSTR = re.compile(r'=\s+(\w+)\[([\d,]*)\][^\s]*\s+([\w-]+)\(')


def issue_config():
  c = config_lib.cpu_default(config_lib.default_config())
  c.fgrams.enabled = True
  c.fgrams.num_fgrams = 16000
  c.model.d_model, c.model.num_layers, c.model.num_heads = 768, 12, 12
  c.model.head_dim, c.model.mlp_dim, c.model.dtype = 64, 3072, 'bfloat16'
  c.fgram_model.num_layers, c.fgram_model.num_heads = 2, 12
  c.fgram_model.head_dim, c.fgram_model.mlp_dim = 64, 3072
  c.seq_len, c.batch_size = 512, 32
  c.mesh.data = -1
  return c


def apply_override(cfg, item: str):
  """FIELD=VALUE (e.g. model.attention=einsum) onto cfg, in the field's type."""
  key, value = item.split('=', 1)
  node = cfg
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = (value.lower() in ('1', 'true')) if isinstance(old, bool) else type(old)(value)


def hlo_census(text: str) -> dict:
  """Scatter / gather / convert / fusion counts of optimized HLO, scatters by dtype+size."""
  ops = collections.Counter()
  scatters, gathers = collections.Counter(), collections.Counter()
  for dtype, dims, op in _INSTR.findall(text):
    ops[op] += 1
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    if op == 'scatter':
      scatters[f'{dtype}[{dims}]'] += 1
    elif op == 'gather':
      gathers[f'{dtype}[{dims}]'] += 1
  return {'ops': sum(ops.values()), 'fusion': ops['fusion'], 'convert': ops['convert'],
          'scatter': ops['scatter'], 'gather': ops['gather'], 'sort': ops['sort'],
          'scatters': dict(scatters), 'gathers': dict(gathers)}


def lower_train_step(cfg, devices, num_rows: int):
  """The train step lowered (jax.stages.Lowered) for `devices`, packed rows fixed."""
  config_lib.validate(cfg, num_devices=len(devices))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.logical_axis_rules(cfg)
  model = train.build_model(cfg, cfg.tokenizer.vocab_size)
  tx = train.make_optimizer(cfg)
  state, state_shardings = train.abstract_state(cfg, model, tx, mesh, rules)
  shardings = step_batch.batch_shardings_for(mesh, rules, with_fgrams=cfg.fgrams.enabled)
  train_step, _ = train.jit_steps(cfg, model, tx, train.make_schedule(cfg), mesh, rules,
                                  state_shardings, shardings)
  batch = step_batch.abstract_step_batch(cfg, shardings, num_rows=num_rows)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=state_shardings.step)
  return train_step.lower(state, batch, rng)


def compile_train_step(cfg, devices, num_rows: int, hlo_path: str = '') -> dict:
  """Compiles one train step; hlo_path (optional): where to write its optimized HLO (gzip)."""
  t0 = time.time()
  compiled = lower_train_step(cfg, devices, num_rows).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  text = compiled.as_text()
  if hlo_path:
    with gzip.open(hlo_path, 'wt') as f:
      f.write(text)
  positions = cfg.batch_size * cfg.seq_len
  fgram_per_token = (num_rows * cfg.fgram_model.pack_len / positions
                     if cfg.fgrams.enabled else 0.0)
  return {'compile_s': time.time() - t0,
          'xla_flops': float(cost.get('flops', 0.0)),
          'xla_bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'model_flops': train.model_flops_per_token(cfg, cfg.tokenizer.vocab_size,
                                                     fgram_per_token) * positions,
          'hlo': hlo_census(text)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--topology', default='v5e:2x2',
                      help="TPU topology (libtpu), or 'cpu' for this host's CPU")
  parser.add_argument('--fgram_rows', type=int, default=768)
  parser.add_argument('--set', action='append', default=[], help='FIELD=VALUE override')
  args = parser.parse_args()
  cfg = issue_config()
  for item in args.set:
    apply_override(cfg, item)
  if args.topology == 'cpu':
    devices = jax.devices()[:1]
  else:
    devices = compile_lib.topology_devices(args.topology)
  base = config_lib.ml_collections.ConfigDict(cfg.to_dict())
  base.fgrams.enabled = False
  out = {'bench': 'train_step_cost', 'topology': args.topology,
         'device_kind': devices[0].device_kind, 'devices': len(devices),
         'fgram_rows': args.fgram_rows, 'overrides': args.set}
  for name, c in (('baseline', base), ('scone', cfg)):
    out[name] = compile_train_step(c, devices, args.fgram_rows if name == 'scone' else 0)
    print(f'{name}: {json.dumps(out[name])}', file=sys.stderr)
  b, s = out['baseline'], out['scone']
  out['ratio_model_flops'] = s['model_flops'] / b['model_flops']
  out['ratio_xla_flops'] = s['xla_flops'] / max(b['xla_flops'], 1)
  out['ratio_bytes_accessed'] = s['xla_bytes_accessed'] / max(b['xla_bytes_accessed'], 1)
  out['peak_flops_per_chip'] = flops.peak_flops(devices[0].device_kind)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
