"""The one-way house: each module imports only what is upstream of it, and a serving host
loads no training code, input pipeline, optimizer or TensorFlow."""
import ast
import json
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scone_jax')

# Data-flow order: a module may import only modules listed before it.
ORDER = ['paths', 'config', 'loader', 'tokenizer', 'fgrams', 'corpus', 'packing', 'token_shards',
         'beam_dask', 'fgrams_beam', 'artifacts', 'seqio_tasks', 'grain_input', 'model', 'sharding',
         'flops', 'metrics', 'checkpoints', 'row_reads', 'table', 'device_match', 'decode',
         'export_reader', 'step_batch', 'preemption', 'train_hooks',
         'train', 'export', 'serving',
         'engine', 'protocol', 'chat_template', 'tokenizing', 'streaming', 'server_metrics',
         'connections', 'server', 'compile', 'main']
# Train, export and serving stand side by side on a shared floor.
SIBLINGS = {'train', 'export', 'serving'}


def _imports(path):
  deps = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('scone_jax'):
      if node.module == 'scone_jax':
        deps |= {a.name for a in node.names}
      else:
        deps.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      deps |= {a.name.split('.')[1] for a in node.names if a.name.startswith('scone_jax.')}
  return deps


def _modules():
  found = {}
  for entry in sorted(os.listdir(PACKAGE)):
    path = os.path.join(PACKAGE, entry)
    if entry.endswith('.py') and entry != '__init__.py':
      found[entry[:-3]] = [path]
    elif os.path.isfile(os.path.join(path, '__init__.py')):
      found[entry] = [os.path.join(path, f) for f in os.listdir(path) if f.endswith('.py')]
  return found


def test_import_graph_runs_one_way():
  modules = _modules()
  assert set(modules) <= set(ORDER), f'place {set(modules) - set(ORDER)} in ORDER'
  for name, paths in modules.items():
    deps = set().union(*(_imports(p) for p in paths)) - {name}
    upstream = set(ORDER[:ORDER.index(name)])
    assert deps <= upstream, f'{name} imports {deps - upstream}, which is not upstream of it'
    if name in SIBLINGS:
      assert not deps & SIBLINGS, f'{name} imports {deps & SIBLINGS}'


# What a serving host may load: the tokenizer (corpus), the packing rule (packing), f-gram
# matching (fgrams' set and kernels), the model, its sharding rules (--mesh), the table and
# the metrics. Every other
# scone_jax module is forbidden there: the training loader (loader), token shards, f-gram
# extraction, training, export, checkpoints, Beam, seqio ...
SERVING_MAY_LOAD = {'paths', 'config', 'tokenizer', 'corpus', 'packing', 'fgrams', 'fgrams.fgram_set',
                    'fgrams.kernels', 'model', 'sharding', 'row_reads', 'table', 'device_match',
                    'metrics',
                    'decode', 'export_reader',
                    'serving',
                    'engine', 'protocol', 'chat_template', 'tokenizing', 'streaming',
                    'server_metrics', 'connections', 'server'}
# Named because serving once loaded them: each must exist and stay forbidden.
MUST_NOT_LOAD = {'loader', 'token_shards', 'fgrams.extraction', 'train', 'artifacts',
                 'seqio_tasks', 'export', 'step_batch'}
THIRD_PARTY_FORBIDDEN = ('tensorflow', 'optax', 'seqio', 'apache_beam', 'grain')


def _module_names():
  """Dotted names (below scone_jax) of every module and package in the package."""
  names = set()
  for root, _, files in os.walk(PACKAGE):
    rel = os.path.relpath(root, PACKAGE)
    prefix = '' if rel == '.' else rel.replace(os.sep, '.')
    if prefix and not os.path.isfile(os.path.join(root, '__init__.py')):
      continue
    for f in files:
      if f.endswith('.py'):
        stem = f[:-3]
        if stem == '__init__':
          if prefix:
            names.add(prefix)
        else:
          names.add(f'{prefix}.{stem}' if prefix else stem)
  return names


def _loaded_by(module, plant=''):
  """(scone_jax modules, forbidden third-party packages) that `import module` loads, in a
  fresh interpreter; `plant` is extra code run after it (the test of the test)."""
  probe = (
      'import sys\n'
      f'import {module}\n'
      f'{plant}\n'
      'mine = sorted(m[len("scone_jax."):] for m in sys.modules if m.startswith("scone_jax."))\n'
      f'bad = sorted(m for m in sys.modules if m.split(".")[0] in {THIRD_PARTY_FORBIDDEN!r})\n'
      'import json; print(json.dumps([mine, bad]))\n')
  out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(PACKAGE))
  mine, bad = json.loads(out.stdout.strip().splitlines()[-1])
  return set(mine), set(bad)


def test_the_serving_rules_name_modules_that_exist():
  names = _module_names()
  assert SERVING_MAY_LOAD <= names, f'no such modules: {SERVING_MAY_LOAD - names}'
  assert MUST_NOT_LOAD <= names, f'no such modules: {MUST_NOT_LOAD - names}'
  assert not SERVING_MAY_LOAD & MUST_NOT_LOAD


@pytest.mark.parametrize('module', ['scone_jax.serving', 'scone_jax.engine', 'scone_jax.server'])
def test_serving_loads_no_training_code(module):
  mine, third_party = _loaded_by(module)
  assert mine <= SERVING_MAY_LOAD, f'{module} loaded {sorted(mine - SERVING_MAY_LOAD)}'
  assert not third_party, f'{module} loaded {sorted(third_party)}'


@pytest.mark.parametrize('planted', ['scone_jax.loader', 'scone_jax.token_shards',
                                     'scone_jax.fgrams.extraction', 'optax'])
def test_a_planted_import_is_caught(planted):
  """The test of the test: serving plus one forbidden import is reported."""
  mine, third_party = _loaded_by('scone_jax.server', plant=f'import {planted}')
  assert (mine - SERVING_MAY_LOAD) | third_party, f'import {planted} went unnoticed'
