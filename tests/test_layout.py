"""The one-way house: each module imports only what is upstream of it, and a serving host
loads no training code, input pipeline, optimizer or TensorFlow."""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scone_jax')

# Data-flow order: a module may import only modules listed before it.
ORDER = ['paths', 'config', 'fgrams', 'corpus', 'packing', 'token_shards', 'beam_dask',
         'fgrams_beam', 'artifacts', 'seqio_tasks', 'model', 'sharding', 'flops', 'metrics',
         'checkpoints', 'table', 'device_match', 'step_batch', 'preemption', 'train', 'export', 'serving',
         'engine', 'server', 'compile', 'main']
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


@pytest.mark.parametrize('module', ['scone_jax.serving', 'scone_jax.engine', 'scone_jax.server'])
def test_serving_loads_no_training_code(module):
  probe = (
      'import sys\n'
      f'import {module}\n'
      'bad = sorted(m for m in sys.modules if m.split(".")[0] in '
      '("tensorflow", "optax", "seqio", "apache_beam", "grain") or m in '
      '("scone_jax.train", "scone_jax.data", "scone_jax.seqio_tasks", "scone_jax.export", '
      '"scone_jax.artifacts", "scone_jax.step_batch"))\n'
      'print(",".join(bad))\n')
  out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(PACKAGE))
  assert out.stdout.strip() == '', f'{module} loaded: {out.stdout.strip()}'
