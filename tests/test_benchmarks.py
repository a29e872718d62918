"""The experiments/ scripts run one way, `python -m experiments.NAME` from the checkout root,
as README.md and experiments/README.md say; each benchmark of the README's table runs in its
smallest form that way and prints one JSON object last."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'experiments',
                                                                          '*.py'))
                 if '__main__' in open(p, encoding='utf-8').read())


def _readme(path='README.md'):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    return f.read()


def _benchmark_table() -> list:
  """The scripts the README's benchmark table names, in the command form it gives."""
  section = _readme().split('\n## Benchmarks\n', 1)[1]
  table = section.split('\n| script |', 1)[1].split('\n\n', 1)[0]  # the first table
  rows = [line for line in table.splitlines() if line.startswith('| `')]
  assert rows, 'no benchmark table in README.md'
  names = []
  for row in rows:
    command = row.split('`')[1]
    if command.endswith('.sh') or '.sh ' in command:
      continue  # accel_check.sh: a shell script that needs a GPU (it runs two of these)
    match = re.fullmatch(r'python -m experiments\.(\w+)( .*)?', command)
    assert match, f'README benchmark row {command!r}: give it as python -m experiments.NAME'
    names.append(match.group(1))
  return names


# A model of a few thousand parameters, for the scripts that take config overrides.
_TINY = ['model.num_layers=1', 'model.d_model=32', 'model.num_heads=2', 'model.head_dim=16',
         'model.mlp_dim=64', 'model.dtype=float32', 'fgram_model.num_layers=1',
         'fgram_model.num_heads=2', 'fgram_model.head_dim=16', 'fgram_model.mlp_dim=64',
         'seq_len=32', 'batch_size=4', 'tokenizer.vocab_size=500']


def _sets(items):
  return [f'--set={item}' for item in items]


# Each benchmark's smallest form: the README's command with the flags that make it small.
# WORK is replaced by a fresh directory, SOURCE by a small Parquet file.
SMALLEST = {
    'bench_fgrams': ['--quick', '--tokens=50000', '--num_fgrams=2000', '--small_fgrams=500',
                     '--bruteforce_tokens=3000', '--match_reps=1', '--no_real_text'],
    'bench_data': ['--only=formats', '--workdir=WORK', '--small_tokens=20000',
                   '--format_tokens=10000', '--vocab_size=300', '--parquet_mb=1',
                   '--num_shards=2'],
    'parquet_rss': ['--source=SOURCE', '--work=WORK', '--mb=1'],
    'bench_seqio': ['--quick', '--workdir=WORK'],
    'bench_train': ['--quick', '--workdir=WORK', '--steps=1', '--rounds=1',
                    '--config=experiments/configs/scone.py',
                    *_sets(_TINY + ['corpus.max_docs=40', 'fgrams.num_fgrams=500',
                                    'fgram_model.rows_sample_batches=2',
                                    'input_pipeline=numpy'])],
    'train_step_cost': ['--topology=cpu', '--fgram_rows=8', *_sets(_TINY)],
    'compile_decode_mesh': ['--config=experiments/configs/scone.py', '--topology=v5e:2x2',
                            '--tensor=1,2'],
    'step_cost_breakdown': ['--topology=cpu', '--num_devices=1', '--fgram_rows=8',
                            '--hlo_dir=WORK', *_sets(_TINY)],
    'compile_decode_fgram_path': ['--topology=v5e:2x2', '--num_fgrams=1000',
                                  '--pairs=host:host'],
    'bench_serving': ['--table_rows=4096', '--prompt_len=4', '--new_tokens=3', '--repeats=9',
                      '--storages=device', '--batches=1'],
    'table_int8': ['--workdir=WORK/work', '--export_dir=WORK/export',
                   '--heldout=WORK/corpus/eval.txt', '--rss_rows=4096',
                   '--rss_dir=WORK/rss', '--ood='],
    'bench_server': ['--quick'],
    'bench_scale': ['--out=WORK', '--stages=1', '--sizes=20000', '--stream_tokens=100000',
                    '--decode_steps=200'],
}


def test_the_readmes_give_every_script_as_python_dash_m():
  for path in ('README.md', 'experiments/README.md'):
    by_path = re.findall(r'python3? experiments/\w+\.py', _readme(path))
    assert not by_path, f'{path}: {by_path}; give these as python -m experiments.NAME'
  for name in SCRIPTS:
    text = open(os.path.join(REPO, 'experiments', f'{name}.py'), encoding='utf-8').read()
    assert not re.search(r'python3? experiments/\w+\.py', text), name
    # The checkout root is never put on sys.path by hand (tests/ for its helpers may be).
    assert not re.search(r'sys\.path\.insert\(0, [^\n]*dirname\(os\.path\.dirname\(os\.path'
                         r'\.abspath\(__file__\)\)\)\)', text), name
    assert f"python -m experiments.{name}'" in text, f'{name}: no run-by-path guard'


def test_every_benchmark_of_the_readme_has_a_smallest_form():
  assert sorted(_benchmark_table()) == sorted(SMALLEST)


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('PYTHONPATH', None)  # the checkout root comes from running there, as the README says
  env.pop('XLA_FLAGS', None)   # one CPU device, not the tests' eight
  return env


@pytest.mark.parametrize('name', ['bench_train', 'sweep'])
def test_a_script_run_by_its_path_says_how_to_run_it(name):
  proc = subprocess.run([sys.executable, os.path.join('experiments', f'{name}.py'), '--help'],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (f'run it from the checkout root as: python -m '
                                 f'experiments.{name}')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(SMALLEST))
def test_smallest_form_runs_and_prints_json_last(name, tmp_path):
  work = str(tmp_path / 'work')
  args = [a.replace('WORK', work) for a in SMALLEST[name]]
  if name == 'parquet_rss':
    args = [a.replace('SOURCE', _small_parquet(tmp_path)) for a in args]
  if name == 'table_int8':
    tiny.untrained_export(work)  # WORK/work (its held-out split) and WORK/export
  proc = subprocess.run([sys.executable, '-m', f'experiments.{name}', *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert isinstance(last, dict) and last


def _small_parquet(tmp_path) -> str:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'source.parquet')
  texts = [f'document {i} says {" ".join(["word"] * (i % 50 + 5))}.' for i in range(300)]
  pq.write_table(pa.table({'id': [str(i) for i in range(len(texts))], 'text': texts}), path)
  return path
