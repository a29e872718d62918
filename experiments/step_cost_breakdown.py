"""Where the SCONE train step's bytes and FLOPs go, op by op, against the baseline's.

`train_step_cost.py` compares whole-step totals (XLA's cost analysis); this breaks them down.
It compiles both train steps for a TPU topology with libtpu (as --mode=compile does; no TPU
needed) at issue 20's shape (d768x12 bf16, 2-layer f-gram model of that width, 32x512
tokens, 768 packed f-gram rows of 16 slots), or reads optimized HLO saved by an earlier run
(--hlo_dir), and walks every executed instruction of the optimized per-device program:

  bytes  operands read + result written, per top-level instruction (a fusion counts its
         operands and result, not its internals; an operand a fusion only slices or gathers
         from counts the slice; an in-place dynamic-update-slice counts the update);
  FLOPs  2 * multiply-adds of every dot of the program before optimization (the optimized
         TPU program encodes batched matmuls as windowed convolutions), divided over the
         devices (data parallel); elementwise FLOPs are left out: the matmuls are what the
         FLOPs-predicted ratio counts.

It sums them by model part (from each instruction's op_name metadata: main blocks, f-gram
model, token embedding, LM head + loss, optimizer, ...) and by op kind (matmul fusion,
elementwise, reduce, gather, scatter, copy/transpose, collective, ...), prints both tables
for baseline and SCONE, then the instructions SCONE adds or grows (matched by part, kind,
op_name and shape), largest bytes first. Asynchronous moves between memory spaces
(copy-start / slice-start, no op_name) are split into float32 arrays of a parameter's shape
(weights, their gradients and optimizer states) and the rest (activations). The last line
is one JSON object.

  python -m experiments.step_cost_breakdown --topology=v5e:2x2 [--hlo_dir DIR] [--reuse]

With --reuse, a DIR that already holds baseline.hlo.gz / scone.hlo.gz (and their cost JSON)
is read instead of compiling again (a compile of this size takes minutes on a small host).
"""
import argparse
import collections
import gzip
import json
import os
import re
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.step_cost_breakdown')

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1,
          'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
          'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s+->\s+.*)?\{\s*$')
_NAME = re.compile(r'%([\w.\-]+)')
# Instructions that move no data of their own.
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
         'partition-id', 'replica-id', 'iota', 'opt-barrier', 'add-dependency'}
_CONTROL = {'while', 'call', 'conditional', 'async-start', 'async-update', 'async-done'}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_SLICERS = {'dynamic-slice', 'slice', 'gather'}
_LAYOUT_ONLY = {'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'parameter', 'tuple',
                'get-tuple-element', 'constant', 'slice', 'concatenate', 'pad'}

PARTS = ('fgram_model', 'fgram_inputs', 'token_embed', 'main_blocks', 'lm_head_loss',
         'optimizer', 'collectives', 'memory_moves', 'other')
KINDS = ('matmul', 'attention_custom', 'elementwise', 'reduce', 'convert', 'copy_transpose',
         'gather', 'scatter', 'dynamic_update_slice', 'collective', 'async_copy_weights',
         'async_copy_activations', 'other')


def shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    n = _BYTES[dtype]
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n
  return total


def shape_dims(shape: str):
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _match(text: str, i: int, open_c: str, close_c: str) -> int:
  """Index just past the bracket that closes the one at text[i]."""
  depth = 0
  for j in range(i, len(text)):
    if text[j] == open_c:
      depth += 1
    elif text[j] == close_c:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(text)


class Instr:
  __slots__ = ('name', 'shape', 'opcode', 'operands', 'attrs', 'op_name')

  def __init__(self, name, shape, opcode, operands, attrs):
    self.name, self.shape, self.opcode = name, shape, opcode
    self.operands, self.attrs = operands, attrs
    m = re.search(r'op_name="([^"]*)"', attrs)
    self.op_name = m.group(1) if m else ''

  def attr(self, key):
    m = re.search(key + r'=([%\w.\-]+)', self.attrs)
    return m.group(1).lstrip('%') if m else None


def parse_instr(line: str):
  line = line.strip()
  if line.startswith('ROOT '):
    line = line[5:]
  eq = line.find(' = ')
  if eq < 0:
    return None
  name = line[:eq].strip().lstrip('%')
  rest = line[eq + 3:]
  if rest.startswith('('):
    end = _match(rest, 0, '(', ')')
  else:
    end = rest.find(' ')
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find('(')
  if paren < 0:
    return None
  opcode = rest[:paren]
  close = _match(rest, paren, '(', ')')
  operands = [t.split()[-1].lstrip('%') for t in
              re.sub(r'/\*[^*]*\*/', '', rest[paren + 1:close - 1]).split(',') if t.strip()]
  return Instr(name, shape, opcode, operands, rest[close:])


def parse_module(text: str):
  """{computation name: [Instr]}, the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line.strip())
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    ins = parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  return comps, entry


def _dot_flops(ins: Instr, table: dict) -> float:
  out = 1
  for d in shape_dims(ins.shape):
    out *= d
  if ins.opcode == 'dot':
    lhs = shape_dims(table[ins.operands[0]].shape) if ins.operands[0] in table else []
    m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', ins.attrs)
    k = 1
    for i in (int(x) for x in m.group(1).split(',') if x) if m else ():
      k *= lhs[i] if i < len(lhs) else 1
    return 2.0 * out * k
  # convolution: contraction = kernel input features x kernel window / feature groups.
  rhs = shape_dims(table[ins.operands[1]].shape) if ins.operands[1] in table else []
  m = re.search(r'dim_labels=[^_]+_([^-]+)->', ins.attrs)
  k = 1
  if m and len(m.group(1)) == len(rhs):
    for label, size in zip(m.group(1), rhs):
      if label != 'o':
        k *= size
  groups = re.search(r'feature_group_count=(\d+)', ins.attrs)
  k //= int(groups.group(1)) if groups else 1
  return 2.0 * out * k


class Program:
  """Per-instruction bytes / FLOPs / part / kind of one optimized HLO module."""

  def __init__(self, text: str, param_shapes=frozenset()):
    # f32 arrays of these shapes are parameters, their gradients or optimizer states.
    self.param_shapes = param_shapes
    self.weight_moves = collections.Counter()  # async_copy_weights bytes by origin
    self.comps, self.entry = parse_module(text)
    self.tables = {c: {i.name: i for i in ins} for c, ins in self.comps.items()}
    self.rows = []  # (part, kind, op_name, shape, opcode, bytes, flops, count)
    self._walk(self.entry, 1)

  def _fused_info(self, comp: str):
    """(flops, kind, per-parameter bytes read or None for 'whole', DUS update bytes)."""
    ins_list, table = self.comps.get(comp, []), self.tables.get(comp, {})
    opcodes = collections.Counter(i.opcode for i in ins_list)
    flops = 0.0
    for i in ins_list:
      if i.opcode == 'dot':
        flops += _dot_flops(i, table)
      elif i.opcode == 'convolution':
        flops += 1.0  # marks a matmul fusion; FLOPs come from the unoptimized program
      elif i.opcode == 'fusion' and i.attr('calls'):
        flops += self._fused_info(i.attr('calls'))[0]
    users = collections.defaultdict(list)
    for i in ins_list:
      for o in i.operands:
        users[o].append(i)
    params = {}
    for i in ins_list:
      if i.opcode == 'parameter':
        # `parameter(N)`: N parsed as the only operand.
        idx = int(i.operands[0]) if i.operands and i.operands[0].isdigit() else None
        u = users.get(i.name, [])
        if idx is not None and u and all(x.opcode in _SLICERS and x.operands[0] == i.name
                                         for x in u):
          params[idx] = sum(shape_bytes(x.shape) for x in u)
        elif idx is not None and u and all(x.opcode == 'dynamic-update-slice'
                                           and x.operands[0] == i.name for x in u):
          params[idx] = 0  # updated in place
    root = ins_list[-1] if ins_list else None
    for i in ins_list:
      if 'ROOT' in i.attrs:
        root = i
    dus_bytes = None
    if root is not None and root.opcode == 'dynamic-update-slice' and len(root.operands) > 1:
      upd = table.get(root.operands[1])
      dus_bytes = shape_bytes(upd.shape) if upd is not None else None
    if opcodes['convolution'] or opcodes['dot'] or flops:
      kind = 'matmul'
    elif opcodes['scatter']:
      kind = 'scatter'
    elif opcodes['gather']:
      kind = 'gather'
    elif opcodes['dynamic-update-slice']:
      kind = 'dynamic_update_slice'
    elif opcodes['reduce'] or opcodes['reduce-window']:
      kind = 'reduce'
    elif set(opcodes) <= _LAYOUT_ONLY:
      kind = 'copy_transpose'
    elif set(opcodes) <= _LAYOUT_ONLY | {'convert'}:
      kind = 'convert'
    else:
      kind = 'elementwise'
    return flops, kind, params, dus_bytes

  def _walk(self, comp: str, times: int):
    table = self.tables[comp]
    for ins in self.comps[comp]:
      op = ins.opcode
      if op == 'while':
        trip = re.search(r'known_trip_count[^\d]*(\d+)', ins.attrs)
        n = int(trip.group(1)) if trip else 1
        for key in ('body', 'condition'):
          if ins.attr(key) in self.comps:
            self._walk(ins.attr(key), times * n)
        continue
      if op in ('call', 'async-start') and ins.attr('to_apply' if op == 'call' else 'calls'):
        callee = ins.attr('to_apply' if op == 'call' else 'calls')
        if callee in self.comps:
          self._walk(callee, times)
        continue
      if op == 'conditional':
        for callee in re.findall(r'%([\w.\-]+)', ins.attrs.split('branch_computations=')[-1]
                                 .split('}')[0]):
          if callee in self.comps:
            self._walk(callee, times)
        continue
      if op in _FREE or op in _CONTROL:
        continue
      out_bytes = shape_bytes(ins.shape)
      operand_bytes = [shape_bytes(table[o].shape) if o in table else 0 for o in ins.operands]
      flops = 0.0
      if op == 'fusion' and ins.attr('calls') in self.comps:
        flops, kind, params, dus = self._fused_info(ins.attr('calls'))
        flops = 0.0
        for idx, b in params.items():
          if idx < len(operand_bytes):
            operand_bytes[idx] = b
        if dus is not None:
          out_bytes = dus
      elif op == 'dot':
        flops, kind = _dot_flops(ins, table), 'matmul'
      elif op == 'convolution':
        kind = 'matmul'
      elif op.startswith(_COLLECTIVES):
        kind = 'collective'
        if op.endswith('-done'):
          operand_bytes, out_bytes = [], 0  # counted at the start
      elif op == 'custom-call':
        kind = 'attention_custom' if 'attention' in ins.attrs.lower() else 'other'
      elif op in ('copy-start', 'slice-start', 'copy-done', 'slice-done'):
        # Asynchronous moves between memory spaces (HBM <-> on-chip): read and write the
        # moved array (the first of the start's tuple) once; the done moves nothing.
        # copy-start: (destination, source, context); slice-start: ((source), result, ctx).
        arrays = [a.group(0) for a in _ARRAY.finditer(ins.shape)]
        moved = arrays[1 if op == 'slice-start' else 0] if len(arrays) > 1 else ''
        out_bytes = shape_bytes(moved) if op.endswith('-start') else 0
        operand_bytes = [out_bytes]
        m = _ARRAY.search(moved)
        dims = tuple(int(d) for d in m.group(2).split(',') if d) if m else ()
        kind = ('async_copy_weights' if m and m.group(1) == 'f32' and dims in self.param_shapes
                else 'async_copy_activations')
        if kind == 'async_copy_weights' and out_bytes:
          # What is moved: a step input (parameter / optimizer state) or a value computed in
          # the step (e.g. the optimizer's new state on its way to the outputs).
          src = table.get(ins.operands[0]) if ins.operands else None
          while src is not None and src.opcode in ('get-tuple-element', 'bitcast') and \
              src.operands and src.operands[0] in table:
            src = table[src.operands[0]]
          origin = ('step_input' if src is not None and src.opcode == 'parameter'
                    else part_of(src.op_name, '') if src is not None else 'unknown')
          self.weight_moves[origin] += 2 * out_bytes * times
      elif op in ('copy', 'transpose'):
        kind = 'copy_transpose'
      elif op == 'convert':
        kind = 'convert'
      elif op == 'gather':
        kind = 'gather'
      elif op == 'scatter':
        kind = 'scatter'
      elif op == 'dynamic-update-slice':
        kind = 'dynamic_update_slice'
        out_bytes = operand_bytes[1] if len(operand_bytes) > 1 else out_bytes
        operand_bytes = operand_bytes[1:]
      elif op in ('reduce', 'reduce-window'):
        kind = 'reduce'
      elif op in ('dynamic-slice', 'slice'):
        kind = 'copy_transpose'
        operand_bytes = [out_bytes] + operand_bytes[1:]
      else:
        kind = 'elementwise' if op not in ('sort', 'rng', 'rng-bit-generator') else 'other'
      total = (sum(operand_bytes) + out_bytes) * times
      self.rows.append((part_of(ins.op_name, kind), kind, ins.op_name,
                        _ARRAY.sub(lambda m: f'{m.group(1)}[{m.group(2)}]',
                                   re.sub(r'\{[^}]*\}', '', ins.shape)),
                        op, total, flops * times, times))

  def table(self, by: int):
    out = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in self.rows:
      out[r[by]][0] += r[5]
      out[r[by]][1] += r[6]
      out[r[by]][2] += r[7]
    return out


def part_of(op_name: str, kind: str) -> str:
  """The model part an instruction serves, from its op_name (Flax module path in it)."""
  if kind == 'collective':
    return 'collectives'
  if kind.startswith('async_copy') and not op_name:
    return 'memory_moves'
  if 'fgram_model' in op_name:
    return 'fgram_model'
  if 'decoder' in op_name:
    return 'main_blocks'
  if 'lm_head' in op_name or 'softmax_cross_entropy' in op_name or 'log_softmax' in op_name:
    return 'lm_head_loss'
  if 'SconeLM' in op_name:
    # embed_inputs outside the f-gram model: T[ids] (the main input and the f-gram windows'
    # tokens) and the where() that puts A_fgram's rows in place.
    if any(s in op_name for s in ('select_n', 'where', 'broadcast_in_dim', 'ge')) and \
        kind in ('elementwise',):
      return 'fgram_inputs'
    return 'token_embed'
  if op_name.startswith('jit(') and op_name:
    return 'optimizer'
  return 'other'


def _fmt(x: float) -> str:
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.2f}{unit}'
  return f'{x:.0f}'


def compare_table(title, names, base: dict, scone: dict, total_bytes_b: float):
  lines = [f'\n{title}', f'{"":24s} {"bytes base":>11s} {"bytes scone":>11s} {"+bytes":>9s} '
           f'{"% of base":>9s} {"flops base":>11s} {"flops scone":>11s} {"+flops":>9s}']
  for n in names:
    b, s = base.get(n, [0, 0, 0]), scone.get(n, [0, 0, 0])
    if not (b[0] or s[0] or b[1] or s[1]):
      continue
    lines.append(f'{n:24s} {_fmt(b[0]):>11s} {_fmt(s[0]):>11s} {_fmt(s[0] - b[0]):>9s} '
                 f'{100 * (s[0] - b[0]) / max(total_bytes_b, 1):8.2f}% {_fmt(b[1]):>11s} '
                 f'{_fmt(s[1]):>11s} {_fmt(s[1] - b[1]):>9s}')
  return '\n'.join(lines)


def added_ops(base: Program, scone: Program, top: int):
  """SCONE's instructions beyond the baseline's: grouped by (part, kind, op_name, shape)."""
  def groups(p):
    g = collections.defaultdict(lambda: [0.0, 0.0, 0, ''])
    for part, kind, op_name, shape, opcode, b, f, n in p.rows:
      key = (part, kind, re.sub(r'^jit\(\w+\)/', '', op_name), shape)
      g[key][0] += b
      g[key][1] += f
      g[key][2] += 1
      g[key][3] = opcode
    return g
  gb, gs = groups(base), groups(scone)
  diffs = []
  for key, (b, f, n, opcode) in gs.items():
    ob = gb.get(key, [0.0, 0.0, 0, ''])
    if b - ob[0] > 0:
      diffs.append({'part': key[0], 'kind': key[1], 'op_name': key[2][-160:],
                    'shape': key[3][:80], 'opcode': opcode, 'count': n - ob[2],
                    'bytes': b - ob[0], 'flops': f - ob[1]})
  diffs.sort(key=lambda d: -d['bytes'])
  return diffs[:top]


def load_or_compile(args):
  from experiments import train_step_cost  # pylint: disable=g-import-not-at-top
  from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(args.hlo_dir, exist_ok=True)
  cfg = train_step_cost.issue_config()
  for item in args.set:
    train_step_cost.apply_override(cfg, item)
  base = config_lib.ml_collections.ConfigDict(cfg.to_dict())
  base.fgrams.enabled = False
  devices = None
  from scone_jax import flops  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  params = flops.param_counts(model_lib.ModelConfig.from_config(cfg, cfg.tokenizer.vocab_size))
  args.params = {'main': params['main_total'], 'fgram_model': params['fgram_model']}
  m, f, v = cfg.model, cfg.fgram_model, cfg.tokenizer.vocab_size
  d = m.d_model
  args.param_shapes = frozenset([
      (d,), (v, d), (d, v), (cfg.fgrams.max_len, d),
      (d, m.num_heads, m.head_dim), (m.num_heads, m.head_dim, d), (d, m.mlp_dim), (m.mlp_dim, d),
      (d, f.num_heads, f.head_dim), (f.num_heads, f.head_dim, d), (d, f.mlp_dim), (f.mlp_dim, d)])
  args.positions = {'main_tokens': cfg.batch_size * cfg.seq_len,
                    'fgram_slots': args.fgram_rows * cfg.fgram_model.pack_len,
                    'main_layers': cfg.model.num_layers,
                    'fgram_layers': cfg.fgram_model.num_layers}
  out = {}
  for name, c, rows in (('baseline', base, 0), ('scone', cfg, args.fgram_rows)):
    hlo = os.path.join(args.hlo_dir, f'{name}.hlo.gz')
    cost = os.path.join(args.hlo_dir, f'{name}.json')
    if args.reuse and os.path.exists(hlo) and os.path.exists(cost):
      print(f'{name}: reusing {hlo}', file=sys.stderr)
      out[name] = json.load(open(cost))
    else:
      if devices is None:
        devices = (compile_lib.topology_devices(args.topology) if args.topology != 'cpu'
                   else __import__('jax').devices()[:1])
        devices = devices[:args.num_devices or len(devices)]
      print(f'{name}: compiling for {args.topology}', file=sys.stderr)
      out[name] = train_step_cost.compile_train_step(c, devices, rows, hlo)
      out[name]['devices'] = len(devices)
      json.dump(out[name], open(cost, 'w'))
    with gzip.open(hlo, 'rt') as f:
      out[name]['text'] = f.read()
    pre = os.path.join(args.hlo_dir, f'{name}.pre.hlo.gz')
    if not (args.reuse and os.path.exists(pre)):
      if devices is None:
        devices = (compile_lib.topology_devices(args.topology) if args.topology != 'cpu'
                   else __import__('jax').devices()[:1])
        devices = devices[:args.num_devices or len(devices)]
      print(f'{name}: lowering (for the FLOPs of each dot)', file=sys.stderr)
      text = train_step_cost.lower_train_step(c, devices, rows).as_text(dialect='hlo',
                                                                        debug_info=True)
      with gzip.open(pre, 'wt') as f:
        f.write(text)
    with gzip.open(pre, 'rt') as f:
      out[name]['pre_text'] = f.read()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--topology', default='v5e:2x2',
                      help="TPU topology (libtpu), or 'cpu' for this host's CPU")
  parser.add_argument('--fgram_rows', type=int, default=768)
  parser.add_argument('--hlo_dir', default='/tmp/step_cost_breakdown',
                      help='where the optimized HLO (and cost JSON) of both steps go')
  parser.add_argument('--reuse', action='store_true',
                      help='read HLO already in --hlo_dir instead of compiling')
  parser.add_argument('--num_devices', type=int, default=0,
                      help="only the topology's first N chips (1: one chip, no sharding, "
                      "like issue 20's single H200); 0: all")
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--set', action='append', default=[], help='FIELD=VALUE override')
  args = parser.parse_args()
  got = load_or_compile(args)
  progs = {k: Program(v.pop('text'), args.param_shapes) for k, v in got.items()}
  pre = {k: Program(v.pop('pre_text')) for k, v in got.items()}
  for k, p in progs.items():
    # FLOPs by part from the unoptimized program's dots, per device.
    ndev = max(int(got[k].get('devices', 1)), 1)
    p.rows += [(r[0], r[1], r[2], r[3], 'dot(pre-opt)', 0.0, r[6] / ndev, 0)
               for r in pre[k].rows if r[6]]
  b, s = progs['baseline'], progs['scone']
  tb = {k: sum(r[5] for r in p.rows) for k, p in progs.items()}
  tf = {k: sum(r[6] for r in p.rows) for k, p in progs.items()}
  print(f'per-device step, {args.topology}: parsed bytes base {_fmt(tb["baseline"])} '
        f'(XLA {_fmt(got["baseline"]["xla_bytes_accessed"])}), scone {_fmt(tb["scone"])} '
        f'(XLA {_fmt(got["scone"]["xla_bytes_accessed"])}); parsed matmul FLOPs base '
        f'{_fmt(tf["baseline"])} (XLA {_fmt(got["baseline"]["xla_flops"])}), scone '
        f'{_fmt(tf["scone"])} (XLA {_fmt(got["scone"]["xla_flops"])})')
  print(compare_table('by model part', PARTS, b.table(0), s.table(0), tb['baseline']))
  print(compare_table('by op kind', KINDS, b.table(1), s.table(1), tb['baseline']))
  print('\nfloat32 parameter-shaped moves by origin (bytes): baseline '
        f'{ {k: _fmt(v) for k, v in b.weight_moves.items()} }, scone '
        f'{ {k: _fmt(v) for k, v in s.weight_moves.items()} }')
  # The f-gram output path into the main model's input: the take of the selected slots, the
  # final norm over them (forward and backward), the scatter-add back, the where().
  output_path = sum(r[5] for r in s.rows
                    if r[0] == 'fgram_inputs' or (r[0] == 'fgram_model' and (
                        '/final_norm/' in r[2] or 'fgram_model/jit(_take)' in r[2])))
  print(f'f-gram output path (take, final norm, scatter-add, where): {_fmt(output_path)}B')
  fg = [r for r in s.rows if r[0] == 'fgram_model']
  fk = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for r in fg:
    fk[r[1]][0] += r[5]
    fk[r[1]][1] += r[6]
  print(compare_table('f-gram model by op kind (scone only)', KINDS, {}, fk, tb['baseline']))
  added = added_ops(b, s, args.top)
  print(f'\ntop {args.top} instructions SCONE adds (bytes beyond the baseline\'s, same key):')
  for d in added:
    print(f'  {_fmt(d["bytes"]):>8s}B {_fmt(d["flops"]):>8s}F x{d["count"]:<3d} {d["part"]:12s} '
          f'{d["kind"]:16s} {d["opcode"]:10s} {d["shape"][:40]:40s} {d["op_name"][-90:]}')

  def tables(p):
    return {'by_part': {k: {'bytes': v[0], 'flops': v[1], 'ops': v[2]}
                        for k, v in p.table(0).items()},
            'by_kind': {k: {'bytes': v[0], 'flops': v[1], 'ops': v[2]}
                        for k, v in p.table(1).items()}}
  result = {'bench': 'step_cost_breakdown', 'topology': args.topology,
            'num_devices': got['scone'].get('devices', args.num_devices),
            'fgram_rows': args.fgram_rows, 'overrides': args.set,
            'xla': {k: {f: v[f] for f in ('xla_flops', 'xla_bytes_accessed', 'model_flops')}
                    for k, v in got.items()},
            'ratio_xla_bytes_accessed': (got['scone']['xla_bytes_accessed']
                                         / got['baseline']['xla_bytes_accessed']),
            'ratio_xla_flops': got['scone']['xla_flops'] / got['baseline']['xla_flops'],
            'ratio_model_flops': got['scone']['model_flops'] / got['baseline']['model_flops'],
            'fgram_output_path_bytes': output_path,
            'params': args.params, 'positions_per_step': args.positions,
            'parsed_bytes': tb, 'parsed_matmul_flops': tf,
            'weight_moves_by_origin': {'baseline': dict(b.weight_moves),
                                       'scone': dict(s.weight_moves)},
            'baseline': tables(b), 'scone': tables(s), 'scone_added_top': added}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
