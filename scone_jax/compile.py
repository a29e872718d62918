"""Ahead-of-time compile of the train, export and decode steps for a TPU topology, from any host.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc`
describes a TPU slice, or several, as compile-only devices on a machine that has none. The
steps compiled here are the ones the run executes (`train.jit_steps`, `export.make_fgram_pass`,
`serving.decode_program`: the decode chunk, with the table and the matcher in the memory kinds
serving gives them), lowered with ShapeDtypeStruct arguments in their shardings over
the config's mesh laid out on those devices, and compiled by the real TPU compiler. It reports
per-device memory (accelerator bytes, and the host bytes of host-memory operands) and FLOPs,
and refuses a program that does not fit the chip
(RESOURCE_EXHAUSTED). No corpus, tokenizer or f-gram set is read: the shapes come from the
config (tokenizer.vocab_size, fgrams.num_fgrams).

  report = compile.compile_steps(cfg, 'v5e:4x4')   # {'fits': ..., 'steps': {...}, ...}
"""
import dataclasses
import logging
import os
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from scone_jax import config as config_lib
from scone_jax import decode
from scone_jax import device_match
from scone_jax import export as export_lib
from scone_jax import export_reader
from scone_jax import flops as flops_lib
from scone_jax import model as model_lib
from scone_jax import serving
from scone_jax import sharding
from scone_jax import step_batch as step_batch_lib
from scone_jax import train

_GIB = 1 << 30
# HBM per JAX device (a chip; a megacore chip is one device), by device_kind. The compiler
# knows the usable capacity and fails with RESOURCE_EXHAUSTED past it; this is the second
# check (total of memory_analysis vs HBM) and the denominator of the report.
HBM_BYTES = {
    'TPU v4': 32 * _GIB,
    'TPU v5 lite': 16 * _GIB,
    'TPU v5': 95 * 10**9,        # v5p: 95 GB
    'TPU v6 lite': 32 * _GIB,
}
# Generations whose two TensorCores per chip act as one device ('megacore').
_MEGACORE = ('v4', 'v5p', 'v5')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# An HLO instruction's opcode: `= <shape> all-gather(` or its async `all-gather-start(`.
_COLLECTIVE_RE = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


class DoesNotFit(RuntimeError):
  """A step needs more memory per device than the chip has."""


# ----------------------------------------------------------------------------- topology


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `topology` (e.g. 'v5e:4x4').

  Needs libtpu (pip install -e '.[tpu]'), not a TPU: the devices only compile.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  _allow_beside_other_libtpu_processes()
  generation, dims = _parse_topology(topology)
  kwargs = {'chip_config_name': 'megacore' if generation in _MEGACORE else 'default',
            'num_slices': int(num_slices)}
  if len(dims) == 3:
    # A full cube of 4 chips per side or more is a torus (wraparound links).
    kwargs['wrap'] = tuple(d >= 4 and d % 4 == 0 for d in dims)
  try:
    desc = topologies.get_topology_desc(topology, platform='tpu', **kwargs)
  except RuntimeError as e:
    if 'lockfile' in str(e).lower():
      raise RuntimeError(_lockfile_error(topology)) from e
    if 'not installed' in str(e) or 'libtpu' in str(e).lower():
      raise RuntimeError(f'compiling for TPU topology {topology} needs libtpu on this host '
                         f'({e}); install it with pip install -e ".[tpu]".') from e
    raise ValueError(f'TPU topology {topology!r} (num_slices={num_slices}) was refused by '
                     f'libtpu: {_first_line(e)}; use a name such as v5e:2x2, v5e:4x4, '
                     'v5p:2x2x1 or v4:4x4x4.') from e
  return list(desc.devices)


# libtpu takes a host-wide lockfile when it loads, so that two processes never drive one TPU;
# every scone_jax process on a host with the `tpu` extra (a server, a trainer) holds it.
# Compiling for a topology drives no TPU, so a compile runs beside them: libtpu reads
# ALLOW_MULTIPLE_LIBTPU_LOAD when it loads (an explicit 0 is left alone).
LIBTPU_LOCKFILE = '/tmp/libtpu_lockfile'


def _allow_beside_other_libtpu_processes():
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def lockfile_holders(path: str = LIBTPU_LOCKFILE) -> list:
  """'pid (command line)' of every process of this host with the file open (Linux /proc)."""
  holders = []
  for pid in sorted((p for p in os.listdir('/proc') if p.isdigit()), key=int) if os.path.isdir(
      '/proc') else []:
    try:
      fds = os.listdir(f'/proc/{pid}/fd')
      if not any(os.readlink(f'/proc/{pid}/fd/{fd}') == path for fd in fds):
        continue
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmd = ' '.join(f.read().replace(b'\0', b' ').decode(errors='replace').split())
    except OSError:
      continue   # gone meanwhile, or not ours to read
    holders.append(f'{pid} ({cmd[:120]})')
  return holders


def _lockfile_error(topology: str) -> str:
  holders = lockfile_holders()
  held = ('held by process ' + ', '.join(holders)) if holders else 'held by another process'
  return (f'compiling for TPU topology {topology}: libtpu could not take its lockfile '
          f'{LIBTPU_LOCKFILE}, {held}; a compile needs no TPU: unset '
          f'ALLOW_MULTIPLE_LIBTPU_LOAD={os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD", "")} '
          '(this command sets it to 1 when unset) or stop that process.')


def _parse_topology(topology: str):
  m = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+){1,2})', topology or '')
  if not m:
    raise ValueError(f'topology {topology!r}: expected GENERATION:AxB or GENERATION:AxBxC, '
                     'e.g. v5e:4x4, v5p:2x2x1, v4:4x4x4 (--topology or config.compile.topology).')
  return m.group(1), tuple(int(x) for x in m.group(2).split('x'))


def hbm_bytes(device) -> int:
  kind = device.device_kind
  if kind not in HBM_BYTES:
    raise ValueError(f'unknown HBM size of TPU device kind {kind!r}; add it to '
                     'compile.HBM_BYTES.')
  return HBM_BYTES[kind]


# ----------------------------------------------------------------------------- analysis


def analyse(compiled, hbm: int) -> dict:
  """Per-device memory (bytes), FLOPs and collectives of a compiled program."""
  mem = compiled.memory_analysis()
  arguments = int(mem.argument_size_in_bytes)
  outputs = int(mem.output_size_in_bytes)
  aliased = int(mem.alias_size_in_bytes)
  temporaries = int(mem.temp_size_in_bytes)
  # Donated arguments alias outputs: their bytes are counted once.
  total = arguments + outputs - aliased + temporaries
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  text = compiled.as_text()
  found = [m.group(1) for m in _COLLECTIVE_RE.finditer(text)]
  return {
      'fits': total <= hbm,
      'memory': {'arguments': arguments, 'outputs': outputs, 'aliased': aliased,
                 'temporaries': temporaries,
                 'generated_code': int(mem.generated_code_size_in_bytes),
                 'host_temporaries': int(getattr(mem, 'host_temp_size_in_bytes', 0)),
                 # Host memory (pinned_host operands: a host table or matcher), beside the
                 # accelerator bytes above; TPU reports them, other backends give 0.
                 'host_arguments': int(getattr(mem, 'host_argument_size_in_bytes', 0)),
                 'host_outputs': int(getattr(mem, 'host_output_size_in_bytes', 0)),
                 'host_aliased': int(getattr(mem, 'host_alias_size_in_bytes', 0)),
                 'total': total, 'hbm': int(hbm), 'fraction_of_hbm': total / hbm},
      'flops_per_device': float((cost or {}).get('flops', 0.0)),
      # HBM traffic by the same analysis (a loop body once): next to the FLOPs, what says
      # whether a step is bound by memory rather than by compute.
      'bytes_accessed_per_device': float((cost or {}).get('bytes accessed', 0.0)),
      'collectives': {c: found.count(c) for c in COLLECTIVES},
  }


def _compile(name: str, lower, hbm: int) -> dict:
  """lower() -> Lowered; compiles it and analyses the result. A RESOURCE_EXHAUSTED compile is
  reported as {'fits': False, 'error': ...}, not raised."""
  t0 = time.time()
  lowered = lower()
  t1 = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    logging.info('%s: does not fit: %s', name, e)
    return {'fits': False, 'error': _first_line(e), 'lower_s': t1 - t0,
            'compile_s': time.time() - t1}
  out = analyse(compiled, hbm)
  out.update(lower_s=t1 - t0, compile_s=time.time() - t1)
  if not out['fits']:
    out['error'] = (f'{out["memory"]["total"] / _GIB:.2f} GiB per device > '
                    f'{hbm / _GIB:.2f} GiB of HBM')
  return out


def _first_line(e) -> str:
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  # XLA's message is 'RESOURCE_EXHAUSTED: ...' followed by an allocation listing; the first
  # lines say by how much.
  return ' '.join(lines[:3])[:400]


# ----------------------------------------------------------------------------- the steps


def _placed(shapes, sharding_tree):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, sharding_tree)


def packed_rows(cfg) -> int:
  """Packed f-gram rows of the compiled train step: config.compile.fgram_rows, or their
  largest count (every position of a micro-batch matched by a distinct max_len f-gram,
  rounded up to the bucket)."""
  if cfg.compile.fgram_rows:
    return int(cfg.compile.fgram_rows)
  positions = cfg.batch_size // cfg.grad_accum_steps * cfg.seq_len
  rows = -(-positions // (cfg.fgram_model.pack_len // cfg.fgrams.max_len))
  bucket = cfg.fgram_model.pack_bucket
  return -(-rows // bucket) * bucket


def compile_steps(cfg, topology: str, num_slices: int = 1, devices=None, *,
                  table_storage: str = 'host', matcher_storage: Optional[str] = None,
                  decode_tensor: int = 0) -> dict:
  """Compiles the train step, the export pass and the decode step for the topology.

  Returns {'fits', 'topology', 'num_slices', 'devices', 'device_kind', 'mesh', 'steps':
  {'train': ..., 'export': ... (None without f-grams), 'decode': ...}}; each step has fits,
  memory (bytes per device), flops_per_device, collectives (opcodes in the compiled HLO,
  each counted once however often a loop runs it), or error when it does not fit.
  devices: the compile-only devices (default: topology_devices(topology, num_slices)).
  table_storage, matcher_storage: where the decode chunk's table and matcher live (serving's
  --table_storage / --matcher_storage); decode_tensor: compile the decode over a serving mesh
  tensor:N of the first N devices (--mesh), 0 = one device.
  """
  dcn_data = int(cfg.mesh.dcn_data)
  if num_slices != dcn_data:
    raise ValueError(f'{num_slices} slice(s) of {topology} but config.mesh.dcn_data={dcn_data}: '
                     'the mesh spans slices with its data axis; set --config.mesh.dcn_data='
                     f'{num_slices} (or --num_slices={dcn_data}).')
  if devices is None:
    devices = topology_devices(topology, num_slices)
  config_lib.validate(cfg, num_devices=len(devices))
  hbm = hbm_bytes(devices[0])
  vocab = int(cfg.tokenizer.vocab_size)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.logical_axis_rules(cfg)
  model = train.build_model(cfg, vocab)
  tx = train.make_optimizer(cfg)
  state, state_shardings = train.abstract_state(cfg, model, tx, mesh, rules)
  with_fgrams = bool(cfg.fgrams.enabled)
  batch_shardings = step_batch_lib.batch_shardings_for(mesh, rules, with_fgrams=with_fgrams)
  train_step, _ = train.jit_steps(cfg, model, tx, train.make_schedule(cfg), mesh, rules,
                                  state_shardings, batch_shardings)
  num_rows = packed_rows(cfg) if with_fgrams else 0
  batch = step_batch_lib.abstract_step_batch(cfg, batch_shardings, num_rows=num_rows)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=state_shardings.step)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  steps = {}

  logging.info('compiling the train step for %s (mesh %s)', topology, dict(mesh.shape))
  steps['train'] = _compile('train', lambda: train_step.lower(state, batch, rng), hbm)
  fgram_positions = num_rows * cfg.fgram_model.pack_len if with_fgrams else 0
  steps['train'].update(tokens=tokens_per_step, fgram_rows=num_rows,
                        fgram_positions=fgram_positions)
  # XLA's cost analysis counts a loop body once (scanned layers, micro-batches), so its FLOPs
  # undercount a scanned model by the trip counts; the model's own count (flops.py: matmuls,
  # 6 per parameter per token for training, no rematerialisation) is the number to plan by.
  per_token = flops_lib.costs(
      model_lib.ModelConfig.from_config(cfg, vocab), cfg.seq_len,
      fgram_positions_per_token=fgram_positions * cfg.grad_accum_steps / tokens_per_step,
      fgram_row_len=cfg.fgram_model.pack_len)['train_flops_per_token']
  steps['train']['model_flops_per_device'] = per_token * tokens_per_step / len(devices)

  steps['export'] = None
  if with_fgrams:
    logging.info('compiling the export pass')
    fn, toks_sharding, lens_sharding = export_lib.make_fgram_pass(
        model, mesh, rules, state_shardings.params, jnp.dtype(cfg.export.dtype))
    processes = len({d.process_index for d in devices})
    rows = export_lib.global_batch_size(mesh, cfg.export.batch_size, processes)
    params = {k: state.params[k] for k in export_lib.FGRAM_PASS_PARAMS}
    toks = jax.ShapeDtypeStruct((rows, cfg.fgrams.max_len), jnp.int32, sharding=toks_sharding)
    lens = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=lens_sharding)

    def lower_export():
      with sharding.mesh_context(mesh, rules):
        return fn.lower(params, toks, lens)
    steps['export'] = _compile('export', lower_export, hbm)
    passes = -(-int(cfg.fgrams.num_fgrams) // rows)
    steps['export'].update(rows_per_pass=rows, passes=passes, table_bytes=int(
        cfg.fgrams.num_fgrams) * cfg.model.d_model * np.dtype(jnp.dtype(cfg.export.dtype)).itemsize)

  steps['decode'] = compile_decode(cfg, devices, table_storage=table_storage,
                                   matcher_storage=matcher_storage, tensor=decode_tensor)

  return {
      'fits': all(s['fits'] for s in steps.values() if s is not None),
      'topology': topology, 'num_slices': int(num_slices), 'devices': len(devices),
      'device_kind': devices[0].device_kind,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      # Which slices each index of the data axis spans: one each when the data axis crosses
      # slices (DCN) and fsdp/tensor stay within a slice (ICI).
      'data_axis_slices': [sorted({int(getattr(d, 'slice_index', 0)) for d in row.flat})
                           for row in mesh.devices],
      'steps': steps,
  }


def compile_decode(cfg, devices, *, table_storage: str = 'host',
                   matcher_storage: Optional[str] = None, tensor: int = 0) -> dict:
  """The decode chunk serving runs (`lower_decode`), compiled on devices[0] or over a
  serving mesh tensor:N of the first N devices; analyse()'s report plus its settings."""
  matcher_storage = export_reader.default_matcher_storage(table_storage, matcher_storage)
  mesh = sharding.serving_mesh(f'tensor:{tensor}', devices) if tensor else None
  vocab = int(cfg.tokenizer.vocab_size)
  logging.info('compiling the decode chunk (%s, table in %s, matcher in %s)',
               f'tensor:{tensor}' if tensor else 'one device', table_storage, matcher_storage)
  report = _compile('decode', lambda: lower_decode(
      cfg, vocab, devices[0], mesh=mesh, table_storage=table_storage,
      matcher_storage=matcher_storage), hbm_bytes(devices[0]))
  report.update(batch=int(cfg.compile.decode_batch), cache_len=_decode_len(cfg),
                devices=max(1, int(tensor)), table_storage=table_storage,
                matcher_storage=matcher_storage,
                num_fgrams=int(cfg.fgrams.num_fgrams) if cfg.fgrams.enabled else 0,
                max_len=int(cfg.fgrams.max_len),
                tokens_per_dispatch=decode.DEFAULT_TOKENS_PER_DISPATCH)
  return report


def _decode_len(cfg) -> int:
  return int(cfg.compile.decode_len or cfg.seq_len)


def abstract_matcher(num_fgrams: int, max_len: int, sharding_=None, width: int = 16):
  """device_match.MatcherArrays as ShapeDtypeStructs for S f-grams (the shapes `build`
  gives: S keys + `width` padding, a directory of ~S/2 buckets; width, the most keys in one
  bucket, is data-dependent: 16 is above what S up to 10^9 random keys give)."""
  s = int(num_fgrams)
  bits = int(min(24, max(1, (max(s, 2) // 2).bit_length())))
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding_)
  return device_match.MatcherArrays(
      spec((s + width,), jnp.uint32), spec((s + width,), jnp.uint32),
      spec((s + width,), jnp.int32), spec(((1 << bits) + 1,), jnp.int32),
      spec((s, max_len), jnp.int32), spec((s,), jnp.int32), 0, max_len, bits, width)


def _abstract_table(cfg, storage: str, placement):
  """The exported table as the step takes it ([S, d] in the export dtype), or None for a
  host-lookup storage (read through a callback, no operand)."""
  if storage not in export_reader.IN_STEP_STORAGES:
    return None
  return jax.ShapeDtypeStruct((int(cfg.fgrams.num_fgrams), int(cfg.model.d_model)),
                              jnp.dtype(cfg.export.dtype), sharding=placement)


def _abstract_callback(dim: int, dtype):
  """A host-lookup gather with the right shapes (it is lowered, never run)."""
  def gather(_, fid_B):
    shape = jax.ShapeDtypeStruct((fid_B.shape[0], dim), dtype)
    return jax.pure_callback(lambda f: np.zeros((f.shape[0], dim), dtype), shape, fid_B)
  return gather


def lower_decode(cfg, vocab, device=None, *, mesh=None, table_storage: str = 'host',
                 matcher_storage: Optional[str] = None, flags=None):
  """The decode chunk serving runs (`serving.decode_program`: retire, then
  decode.decode_chunk of decode.DEFAULT_TOKENS_PER_DISPATCH steps; greedy by default, as
  --mode=generate), lowered with the table and the matcher for config.fgrams.num_fgrams
  f-grams of up to max_len tokens in the memory kinds table_storage / matcher_storage give
  them: on one device, or over a serving mesh (`--mesh=tensor:N`: parameters, state and
  table in serving's mesh shardings, jitted as `Generator(mesh=...)` jits it)."""
  matcher_storage = export_reader.default_matcher_storage(table_storage, matcher_storage)
  model_config = dataclasses.replace(model_lib.ModelConfig.from_config(cfg, vocab),
                                     fgrams_enabled=False)
  model = model_lib.SconeLM(model_config)
  batch, k = int(cfg.compile.decode_batch), int(cfg.fgrams.max_len)
  with_fgrams = bool(cfg.fgrams.enabled)
  path = None
  if with_fgrams:
    dtype = jnp.dtype(cfg.export.dtype)
    path = export_reader.fgram_path(table_storage, matcher_storage,
                                    _abstract_callback(int(cfg.model.d_model), dtype))
  program = serving.decode_program(model, path, decode.DEFAULT_TOKENS_PER_DISPATCH,
                                   flags or decode.Flags())
  state = jax.eval_shape(lambda: decode.empty_state(model, batch, _decode_len(cfg),
                                                    k if with_fgrams else 2))
  if mesh is None:
    place = jax.sharding.SingleDeviceSharding(device)
    params = serving.abstract_params(model, device)
    state = _placed(state, jax.tree.map(lambda _: place, state))
    step = jax.jit(program, donate_argnums=(3,))
    table_at = (export_reader.placement(table_storage, device)
                if table_storage in export_reader.IN_STEP_STORAGES else None)
  else:
    rules = serving.mesh_rules(model_config, mesh)
    place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = serving.abstract_params(model, None, mesh=mesh, rules=rules)
    state = _placed(state, serving.state_shardings(state, mesh, rules))
    step = serving.jit_on_mesh(program, mesh, rules, donate_argnums=(3,), cache_out=1)
    table_at = (export_reader.table_sharding(mesh, int(cfg.model.d_model), table_storage)
                if table_storage in export_reader.IN_STEP_STORAGES else None)
  table = matcher = None
  if with_fgrams:
    table = _abstract_table(cfg, table_storage, table_at)
    matcher = abstract_matcher(cfg.fgrams.num_fgrams, k, export_reader.placement(
        matcher_storage, device, mesh))
  is_stop = jax.ShapeDtypeStruct((vocab,), jnp.bool_, sharding=place)
  active = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=place)
  return step.lower(params, table, matcher, state, is_stop, active)


# ----------------------------------------------------------------------------- report


def summary_lines(report: dict) -> list:
  """Human-readable lines: per step, memory per device vs HBM, FLOPs, collectives."""
  lines = [f'{report["topology"]} x{report["num_slices"]}: {report["devices"]} devices '
           f'({report["device_kind"]}), mesh {report["mesh"]}']
  for name, s in report['steps'].items():
    if s is None:
      lines.append(f'  {name}: skipped (no f-grams)')
      continue
    if 'memory' not in s:
      lines.append(f'  {name}: DOES NOT FIT: {s["error"]}')
      continue
    m = s['memory']
    gib = lambda b: f'{b / _GIB:.2f}'  # pylint: disable=cell-var-from-loop
    colls = ', '.join(f'{k} {v}' for k, v in s['collectives'].items() if v) or 'none'
    lines.append(
        f'  {name}: {"fits" if s["fits"] else "DOES NOT FIT"}; per device GiB: arguments '
        f'{gib(m["arguments"])}, outputs {gib(m["outputs"])}, aliased {gib(m["aliased"])}, '
        f'temporaries {gib(m["temporaries"])}, total {gib(m["total"])} of {gib(m["hbm"])} '
        f'HBM ({100 * m["fraction_of_hbm"]:.0f}%); {s["flops_per_device"] / 1e12:.3f} TFLOP '
        f'per device per step by XLA\'s cost analysis (a loop body once)'
        + (f', {s["model_flops_per_device"] / 1e12:.3f} by the model\'s count'
           if 'model_flops_per_device' in s else '')
        + f'; collectives: {colls}')
  return lines


def check_fits(report: dict):
  """Raises DoesNotFit naming each step that does not fit."""
  bad = [f'{name} ({s["error"]})' for name, s in report['steps'].items()
         if s is not None and not s['fits']]
  if bad:
    raise DoesNotFit(f'does not fit {report["topology"]} x{report["num_slices"]}: '
                     + '; '.join(bad) + '. Shard more (mesh.fsdp / mesh.tensor), lower '
                     'batch_size or raise grad_accum_steps, use model.remat, or a larger '
                     'topology.')

