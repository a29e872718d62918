"""lm-evaluation-harness against a live `--mode=serve`, beside `--mode=eval` on the same text.

lm-eval (`pip install "lm_eval[api]"`, installed on demand: not a dependency of scone_jax;
it may live in a venv of its own, --lm_eval names its executable) scores a local JSONL task
of rolling log-likelihoods (`loglikelihood_rolling`, as wikitext is scored) through the
server's completions endpoint with its `local-completions` model and nothing else: no
tokenizer wrapper; it finds the server's /tokenizer_info and tokenizes through /tokenize.
Each document's target ends with '</s>' (read as EOS by /tokenize) because --mode=eval
scores the EOS that ends every document too, so both count the same tokens.

The two need not agree to the last digit: --mode=eval packs documents back to back into
rows of the training seq_len (a document that straddles a row boundary loses its context
there), while lm-eval scores each document alone in windows of --max_length tokens (a
window after the first gets one token of context, after a BOS the server puts first). So a
third figure is printed where every document fits in one window: each document scored
alone in one forward pass of the export's model, which lm-eval through the server should
equal to float precision.

  python -m experiments.lm_eval_check --export_dir=runs/scone/export \\
      --eval_text=heldout.txt --limit=100 --lm_eval=/path/to/venv/bin/lm_eval
  python -m experiments.lm_eval_check --tiny --lm_eval=...   # a tiny export built here

The last line printed is one JSON object: both NLLs per token and their relative gap.
"""
import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

if not __package__:  # run by path, neither scone_jax nor experiments would import
  sys.exit('run it from the checkout root as: python -m experiments.lm_eval_check')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))  # tiny.py (tests/ is not a package)

TASK = 'scone_local_nll'
TASK_YAML = '''task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}</s>"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
'''


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  env.pop('XLA_FLAGS', None)
  return env


def mode_eval(export_dir: str, text_file: str) -> dict:
  """`python -m scone_jax.main --mode=eval --export_dir=... --eval_text=...`'s JSON."""
  out = subprocess.run([sys.executable, '-m', 'scone_jax.main', '--mode=eval',
                        f'--export_dir={export_dir}', f'--eval_text={text_file}'],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def per_document_nll(export_dir: str, docs: list) -> tuple:
  """(summed NLL, tokens) of each document alone, BOS + text + EOS in one forward pass of
  the export's model (what the server computes for a window holding a whole document), or
  None where a document does not fit in the model's length."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scone_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from scone_jax import serving  # pylint: disable=g-import-not-at-top
  gen = serving.load(export_dir)
  nll, tokens = 0.0, 0
  for d in docs:
    ids = np.concatenate([gen.tokenizer.encode(d), [gen.tokenizer.eos_id]]).astype(np.int64)
    if ids.size + 1 > gen.max_len:
      return None
    ints = gen.prompt_batch([ids], [True], [1], ids.size + 1).ints_NxWx4
    x = gen.input_vectors(gen.params, gen.rows_for(ints[..., 2]), ints)
    logits = gen.model.apply({'params': gen.params}, x, positions_BxL=ints[..., 1],
                             method=model_lib.SconeLM.backbone)
    logp = np.asarray(jax.nn.log_softmax(logits[0, :-1].astype(np.float32)))
    nll -= float(logp[np.arange(ids.size), ids].sum())
    tokens += ids.size
  return nll, tokens


def start_server(export_dir: str, name: str, log_path: str):
  proc = subprocess.Popen([sys.executable, '-m', 'scone_jax.main', '--mode=serve',
                           f'--export_dir={export_dir}', '--port=0',
                           f'--served_model_name={name}'], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=open(log_path, 'w'), text=True)
  line = proc.stdout.readline()
  if not line.startswith('serving on '):
    proc.kill()
    raise RuntimeError(f'server did not start: {line!r}\n' + open(log_path).read()[-3000:])
  return proc, line.split()[-1]


def _get(url):
  with urllib.request.urlopen(url, timeout=60) as r:
    return json.loads(r.read())


def _post(url, body):
  req = urllib.request.Request(url, json.dumps(body).encode(),
                               {'Content-Type': 'application/json'})
  with urllib.request.urlopen(req, timeout=60) as r:
    return json.loads(r.read())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--export_dir')
  parser.add_argument('--eval_text', help='plain text, blank-line-separated documents '
                      '(what --mode=eval reads)')
  parser.add_argument('--tiny', action='store_true',
                      help='build a tiny export and corpus here (tests/tiny.py) for a smoke run')
  parser.add_argument('--limit', type=int, default=50, help='documents to score')
  parser.add_argument('--lm_eval', default='lm_eval', help='the lm_eval executable')
  parser.add_argument('--max_length', type=int, default=0,
                      help="lm-eval's max_length (default: the server's max_model_len)")
  parser.add_argument('--workdir', help='keep the files here (default: a temp dir)')
  args = parser.parse_args()
  lm_eval = shutil.which(args.lm_eval) or args.lm_eval
  if not os.path.exists(lm_eval):
    sys.exit(f'error: no lm_eval executable at {args.lm_eval!r}: pip install "lm_eval[api]" '
             '(a venv of its own is fine) and pass --lm_eval=PATH.')
  t_start = time.time()
  work = args.workdir or tempfile.mkdtemp(prefix='lm_eval_check_')
  os.makedirs(work, exist_ok=True)
  from scone_jax import corpus  # pylint: disable=g-import-not-at-top
  if args.tiny:
    import test_server  # pylint: disable=g-import-not-at-top
    import tiny  # pylint: disable=g-import-not-at-top
    export_dir = test_server.build_export(os.path.join(work, 'tiny'))
    text_files = [os.path.join(work, 'tiny', 'corpus', 'eval.txt')]
    del tiny
  else:
    if not args.export_dir or not args.eval_text:
      parser.error('--export_dir and --eval_text are required (or --tiny).')
    export_dir, text_files = args.export_dir, args.eval_text.split(',')
  docs = [d.text for d in corpus.read_text_documents(text_files)][:args.limit]
  text_file = os.path.join(work, 'docs.txt')
  with open(text_file, 'w') as f:
    f.write('\n\n'.join(docs) + '\n')
  task_dir = os.path.join(work, 'task')
  os.makedirs(task_dir, exist_ok=True)
  data = os.path.join(task_dir, 'data.jsonl')
  with open(data, 'w') as f:
    for d in docs:
      f.write(json.dumps({'text': d}) + '\n')
  with open(os.path.join(task_dir, f'{TASK}.yaml'), 'w') as f:
    f.write(TASK_YAML.format(task=TASK, data=data))

  reference = mode_eval(export_dir, text_file)
  print('--mode=eval:', json.dumps(reference), flush=True)
  per_doc = per_document_nll(export_dir, docs)
  proc, url = start_server(export_dir, 'scone', os.path.join(work, 'server.log'))
  try:
    max_len = _get(url + '/v1/models')['data'][0]['max_model_len']
    # The tokens lm-eval will score: each document's ids and its EOS.
    tokens = sum(len(_post(url + '/tokenize', {'prompt': d + '</s>',
                                               'add_special_tokens': False})['tokens'])
                 for d in docs)
    out_dir = os.path.join(work, 'lm_eval_out')
    model_args = (f'model=scone,base_url={url}/v1/completions,tokenized_requests=True,'
                  f'max_length={args.max_length or max_len},num_concurrent=1,max_retries=1')
    cmd = [lm_eval, '--model', 'local-completions', '--model_args', model_args,
           '--tasks', TASK, '--include_path', task_dir, '--output_path', out_dir,
           '--log_samples', '--batch_size', '1']
    print('running:', ' '.join(cmd), flush=True)
    t0 = time.time()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    lm_eval_seconds = time.time() - t0
    print(run.stdout[-4000:])
    if run.returncode:
      print(run.stderr[-6000:], file=sys.stderr)
      sys.exit(f'error: lm_eval failed (exit {run.returncode}).')
  finally:
    proc.terminate()
    proc.wait(60)
  samples = glob.glob(os.path.join(out_dir, '**', f'samples_{TASK}_*.jsonl'), recursive=True)
  if not samples:
    sys.exit(f'error: lm_eval wrote no samples file under {out_dir}.')
  log_likelihood = 0.0
  scored = 0
  with open(sorted(samples)[-1]) as f:
    for line in f:
      s = json.loads(line)
      ll = s['filtered_resps'][0] if s.get('filtered_resps') else s['resps'][0][0]
      log_likelihood += float(ll[0] if isinstance(ll, (list, tuple)) else ll)
      scored += 1
  nll = -log_likelihood / tokens
  version = subprocess.run([lm_eval.replace('lm_eval', 'python') if lm_eval.endswith(
      'lm_eval') else sys.executable, '-c', 'import importlib.metadata as m; '
      'print(m.version("lm_eval"))'], capture_output=True, text=True).stdout.strip()
  print(json.dumps({
      'lm_eval_version': version, 'docs': scored, 'tokens': tokens,
      'eval_tokens': reference['tokens'], 'lm_eval_nll_per_token': nll,
      'eval_loss': reference['loss'], 'rel_diff': (nll - reference['loss']) / reference['loss'],
      # Each document alone in one pass: equal to lm-eval's when every document fits in
      # one window (the packing of --mode=eval aside).
      'per_document_nll_per_token': per_doc and per_doc[0] / per_doc[1],
      'per_document_rel_diff': per_doc and (nll - per_doc[0] / per_doc[1]) / (
          per_doc[0] / per_doc[1]),
      'lm_eval_ppl': math.exp(nll), 'eval_ppl': reference['ppl'],
      'max_length': args.max_length or max_len, 'export': 'tiny (tests/tiny.py)' if args.tiny
      else os.path.basename(os.path.normpath(export_dir)),
      'lm_eval_seconds': lm_eval_seconds, 'seconds': time.time() - t_start}))


if __name__ == '__main__':
  main()
