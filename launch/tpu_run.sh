#!/usr/bin/env bash
# Run scone_jax on every worker of a Cloud TPU VM slice (or several slices), from create
# to delete. See usage() below, or run with --help.
# The remote scripts are single-quoted on purpose: $HOME, $w... expand on the worker.
# shellcheck disable=SC2016
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh COMMAND TPU_NAME ZONE [OPTIONS] [-- MAIN_FLAGS...]

Commands (each runs gcloud; every step that fails stops the script, non-zero exit):
  create   make the TPU VM slice unless it exists (tpu-vm create; with --num_slices=N>1 a
           queued resource of N slices named TPU_NAME-0..N-1, waited for until ACTIVE)
  ship     copy this checkout to ~/scone_jax on every worker: tracked files plus untracked
           files git does not ignore, and every --config file named in MAIN_FLAGS
  setup    ship, then make ~/scone_jax_venv with .[tpu,data] on every worker; skipped
           while setup.cfg/pyproject.toml and --extras are unchanged (a stamp in the venv)
  run      ship, setup, then start `python -m scone_jax.main --distributed MAIN_FLAGS` on
           all workers detached from ssh (setsid nohup): a dropped ssh does not stop it.
           Output: ~/scone_jax_logs/JOB/worker-N.log (slice-S-worker-N.log for several
           slices), pid beside it; ~/scone_jax_logs/latest points at the last JOB
  logs     follow the logs of JOB on the workers (tail -F, lines prefixed by worker)
  status   TPU state, and whether JOB runs on each worker (with its last log lines)
  stop     SIGTERM JOB's process group (SIGKILL after --grace seconds), then kill any
           process still holding the TPU (sudo lsof /dev/accel* /dev/vfio/*) and remove
           /tmp/libtpu_lockfile, so the next run can open the chips
  delete   delete the TPU VM (or the queued resource with its slices)

Options:
  --project=P            gcloud project (default: gcloud's configured one)
  --accelerator_type=T   create: slice type, e.g. v5p-64, v6e-256 (required by create)
  --version=V            create: TPU runtime version (default tpu-ubuntu2204-base)
  --num_slices=N         N>1: multislice; use the same N with every command (default 1)
  --create_flag=F        create: extra gcloud flag, e.g. --create_flag=--spot (repeatable)
  --job=JOB              run: job name (default job-YYYYmmdd-HHMMSS);
                         logs/status/stop: which job (default latest)
  --worker=W             ssh to worker W only (default all)
  --extras=E             setup: pip extras (default tpu,data)
  --grace=S              stop: seconds between SIGTERM and SIGKILL (default 30)
  --dry_run              print every command (to stderr, shell-quoted), run none
  -h, --help             this text

The workers get LIBTPU_INIT_ARGS, XLA_FLAGS and every JAX_* variable exported in this
shell (plus MEGASCALE_* joining the slices when --num_slices>1). MAIN_FLAGS reach
scone_jax.main unchanged, whatever they quote, except that --config=PATH[:ARGS] is
shipped and rewritten to where PATH lands on the workers. --workdir must be a path
every worker sees (gs://bucket/run).

  launch/tpu_run.sh create my-tpu us-east5-a --accelerator_type=v5p-64
  launch/tpu_run.sh run my-tpu us-east5-a --job=scone1 -- --mode=train \
      --config=experiments/configs/scone.py --workdir=gs://bucket/scone1
  launch/tpu_run.sh logs my-tpu us-east5-a
  launch/tpu_run.sh stop my-tpu us-east5-a && launch/tpu_run.sh delete my-tpu us-east5-a
EOF
}

die() { echo "tpu_run.sh: $*" >&2; exit 2; }

for a in "$@"; do
  [[ $a == -- ]] && break
  [[ $a == -h || $a == --help ]] && { usage; exit 0; }
done
[[ $# -ge 3 ]] || { usage >&2; exit 2; }
COMMAND=$1 TPU=$2 ZONE=$3
shift 3
case $COMMAND in
  create | ship | setup | run | logs | status | stop | delete) ;;
  *) die "unknown command '$COMMAND'; one of create ship setup run logs status stop delete" ;;
esac

PROJECT="" ACCELERATOR_TYPE="" VERSION=tpu-ubuntu2204-base NUM_SLICES=1 JOB="" WORKER=all
EXTRAS=tpu,data GRACE=30 DRY_RUN=0
CREATE_FLAGS=()
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --project=*) PROJECT=${1#*=} ;;
    --accelerator_type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --num_slices=*) NUM_SLICES=${1#*=} ;;
    --create_flag=*) CREATE_FLAGS+=("${1#*=}") ;;
    --job=*) JOB=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --extras=*) EXTRAS=${1#*=} ;;
    --grace=*) GRACE=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    *) die "unknown option '$1' (flags for scone_jax.main go after --; see --help)" ;;
  esac
  shift
done
[[ ${1:-} == -- ]] && shift
MAIN_FLAGS=("$@")

[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$NUM_SLICES is not a positive integer"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace=$GRACE is not a number of seconds"
[[ -z $JOB || $JOB =~ ^[A-Za-z0-9._-]+$ ]] || die "--job=$JOB: use letters, digits, . _ -"
[[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die "--extras=$EXTRAS: a comma-separated list of extras"
if [[ $COMMAND == run ]]; then
  [[ ${#MAIN_FLAGS[@]} -gt 0 ]] || die "run needs scone_jax.main flags after --"
  JOB=${JOB:-job-$(date +%Y%m%d-%H%M%S)}
else
  JOB=${JOB:-latest}
fi

GFLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project="$PROJECT")
NODES=("$TPU")
if [[ $NUM_SLICES -gt 1 ]]; then
  NODES=()
  for ((s = 0; s < NUM_SLICES; s++)); do NODES+=("$TPU-$s"); done
fi
REPO=$(cd "$(dirname "$0")/.." && pwd -P)

# POSIX single quoting: the remote login shell need not be bash.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
# The same, leaving words that need no quotes bare, for readable commands.
word() { if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"; else q "$1"; fi; }

# Prints a command (to stderr, like set -x) so that it can be pasted into a shell, then
# runs it unless --dry_run.
step() {
  local a out="+"
  for a in "$@"; do
    if [[ $a =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then out+=" ${BASH_REMATCH[1]}$(word "${BASH_REMATCH[2]}")"
    else out+=" $(word "$a")"
    fi
  done
  printf '%s\n' "$out" >&2
  [[ $DRY_RUN == 1 ]] || "$@"
}

ssh_node() {  # NODE SCRIPT
  step gcloud compute tpus tpu-vm ssh "$1" "${GFLAGS[@]}" --worker="$WORKER" --command="$2"
}

# Remote shell snippets. $HOME etc. are expanded on the worker.
R_CODE='"$HOME/scone_jax"'
R_LOGS='"$HOME/scone_jax_logs"'
R_JOB="\"\$HOME/scone_jax_logs\"/$JOB"  # JOB is [A-Za-z0-9._-]+
R_VENV='"$HOME/scone_jax_venv"'
# The worker's index in its slice, as jax reads it, from the TPU VM metadata server.
R_WORKER='w=$(curl -sf -m 10 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) || w=$(hostname)'

cmd_create() {
  local A=(--accelerator-type="$ACCELERATOR_TYPE")
  [[ -n $ACCELERATOR_TYPE ]] || die "create needs --accelerator_type (e.g. v5p-64)"
  if [[ $NUM_SLICES == 1 ]]; then
    if step gcloud compute tpus tpu-vm describe "$TPU" "${GFLAGS[@]}" --format='value(state)' \
        && [[ $DRY_RUN == 0 ]]; then
      echo "TPU VM $TPU exists; reusing it"
      return
    fi
    step gcloud compute tpus tpu-vm create "$TPU" "${GFLAGS[@]}" "${A[@]}" --version="$VERSION" \
      ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
    return
  fi
  local Q=(gcloud compute tpus queued-resources)
  if step "${Q[@]}" describe "$TPU" "${GFLAGS[@]}" --format='value(state.state)' \
      && [[ $DRY_RUN == 0 ]]; then
    echo "queued resource $TPU exists; reusing it"
  else
    step "${Q[@]}" create "$TPU" "${GFLAGS[@]}" "${A[@]}" --runtime-version="$VERSION" \
      --node-count="$NUM_SLICES" --node-prefix="$TPU" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
  fi
  [[ $DRY_RUN == 0 ]] || return 0
  local state
  while :; do
    state=$("${Q[@]}" describe "$TPU" "${GFLAGS[@]}" --format='value(state.state)')
    echo "queued resource $TPU: $state"
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $TPU is $state; delete it and create again" ;;
    esac
    sleep "${TPU_RUN_POLL_S:-30}"
  done
}

# Outside-repo --config files are staged here and shipped as .tpu_run_configs/.
STAGE=""
SHIP_EXTRA=()
cleanup() { [[ -z $STAGE ]] || rm -rf "$STAGE"; }
trap cleanup EXIT

# Sets MAPPED to where config SPEC (PATH[:ARGS]) will be on the workers, and arranges
# for PATH to be shipped.
map_config() {
  local spec=$1 path=${1%%:*} rest abs
  rest=${spec:${#path}}
  [[ -f $path ]] || die "--config file $path not found (relative paths are from $PWD)"
  abs=$(cd "$(dirname "$path")" && pwd -P)/$(basename "$path")
  if [[ $abs == "$REPO"/* ]]; then
    SHIP_EXTRA+=("${abs#"$REPO"/}")  # shipped even when git ignores it
    MAPPED=${abs#"$REPO"/}$rest
  else
    mkdir -p "$STAGE/.tpu_run_configs"
    local name
    name=${#SHIP_EXTRA[@]}-$(basename "$path")
    cp "$abs" "$STAGE/.tpu_run_configs/$name"
    SHIP_EXTRA+=(".tpu_run_configs/$name")
    MAPPED=.tpu_run_configs/$name$rest
  fi
}

map_main_flags() {
  local out=() i=0 n=${#MAIN_FLAGS[@]}
  while ((i < n)); do
    case ${MAIN_FLAGS[i]} in
      --config=*) map_config "${MAIN_FLAGS[i]#--config=}"; out+=("--config=$MAPPED") ;;
      --config)
        ((i + 1 < n)) || die "--config needs a file"
        map_config "${MAIN_FLAGS[i + 1]}"; out+=(--config "$MAPPED"); i=$((i + 1)) ;;
      *) out+=("${MAIN_FLAGS[i]}") ;;
    esac
    i=$((i + 1))
  done
  MAIN_FLAGS=(${out[@]+"${out[@]}"})
}

cmd_ship() {
  STAGE=$(mktemp -d "${TMPDIR:-/tmp}/tpu_run.XXXXXX")
  map_main_flags
  local list=$STAGE/files tarball=$STAGE/scone_jax_ship.tar.gz f
  # Tracked and untracked-but-not-ignored files: what `git status` calls the checkout.
  git -C "$REPO" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e $REPO/$f ]] && printf '%s\0' "$f"  # tracked but deleted: not shipped
  done >"$list"
  for f in ${SHIP_EXTRA[@]+"${SHIP_EXTRA[@]}"}; do
    [[ $f == .tpu_run_configs/* ]] || printf '%s\0' "$f" >>"$list"
  done
  local staged=()
  [[ ! -d $STAGE/.tpu_run_configs ]] || staged=(-C "$STAGE" .tpu_run_configs)
  step tar -czf "$tarball" -C "$REPO" --null -T "$list" ${staged[@]+"${staged[@]}"}
  local node
  for node in "${NODES[@]}"; do
    step gcloud compute tpus tpu-vm scp "$tarball" "$node":scone_jax_ship.tar.gz "${GFLAGS[@]}" \
      --worker="$WORKER"
    # Unpack beside, then swap, so a half-copied tree never replaces a good one.
    ssh_node "$node" "set -e; rm -rf $R_CODE.new; mkdir -p $R_CODE.new; \
tar -xzf \"\$HOME/scone_jax_ship.tar.gz\" -C $R_CODE.new; rm -rf $R_CODE; mv $R_CODE.new $R_CODE; \
rm -f \"\$HOME/scone_jax_ship.tar.gz\""
  done
}

cmd_setup() {
  local node
  for node in "${NODES[@]}"; do
    ssh_node "$node" "set -e; cd $R_CODE; \
h=\"\$(cat setup.cfg pyproject.toml 2>/dev/null | sha256sum | cut -c1-64) $EXTRAS\"; \
if [ \"\$(cat $R_VENV/.tpu_run_stamp 2>/dev/null)\" = \"\$h\" ]; then echo 'venv up to date'; else \
if [ ! -x $R_VENV/bin/pip ]; then rm -rf $R_VENV; python3 -m venv $R_VENV || { rm -rf $R_VENV; \
sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv $R_VENV; }; fi; \
$R_VENV/bin/pip install -q --upgrade pip; $R_VENV/bin/pip install -q '.[$EXTRAS]'; \
echo \"\$h\" > $R_VENV/.tpu_run_stamp; fi"
  done
}

# `export NAME='value'; ` for each variable the workers should see.
env_exports() {
  local v exports=""
  for v in LIBTPU_INIT_ARGS XLA_FLAGS $(compgen -e); do
    case $v in LIBTPU_INIT_ARGS | XLA_FLAGS | JAX_*) ;; *) continue ;; esac
    [[ -n ${!v+set} ]] || continue
    [[ $exports != *"export $v="* ]] || continue
    exports+="export $v=$(word "${!v}"); "
  done
  printf '%s' "$exports"
}

cmd_start() {
  local exports args="" a s=0 node coordinator="" name
  exports="export PYTHONUNBUFFERED=1; $(env_exports)"
  for a in "${MAIN_FLAGS[@]}"; do args+=" $(word "$a")"; done
  if [[ $NUM_SLICES -gt 1 ]]; then
    # Slices meet through worker 0 of slice 0; jax numbers processes slice by slice.
    coordinator=$(step gcloud compute tpus tpu-vm describe "${NODES[0]}" "${GFLAGS[@]}" \
      --format='value(networkEndpoints[0].ipAddress)')
    [[ $DRY_RUN == 0 ]] || coordinator=COORDINATOR_IP
    [[ -n $coordinator ]] || die "no internal IP for ${NODES[0]}; is it READY? (status)"
  fi
  for node in "${NODES[@]}"; do
    local env=$exports
    name='worker-$w'
    if [[ $NUM_SLICES -gt 1 ]]; then
      env+="export MEGASCALE_COORDINATOR_ADDRESS=$(word "$coordinator:8081") MEGASCALE_PORT=8081 \
MEGASCALE_NUM_SLICES=$NUM_SLICES MEGASCALE_SLICE_ID=$s; "
      name="slice-$s-worker-\$w"
    fi
    ssh_node "$node" "set -e; cd $R_CODE; $R_WORKER; mkdir -p $R_JOB; \
ln -sfn $JOB $R_LOGS/latest; f=$R_JOB/$name; \
if [ -e \"\$f.pid\" ] && kill -0 \"\$(cat \"\$f.pid\")\" 2>/dev/null; then \
echo \"job $JOB already runs on \$f; stop it first\" >&2; exit 1; fi; \
${env}setsid nohup $R_VENV/bin/python -m scone_jax.main --distributed$args >\"\$f.log\" 2>&1 </dev/null & \
echo \$! >\"\$f.pid\"; echo \"started \$f.log (pid \$!)\""
    s=$((s + 1))
  done
}

cmd_logs() {
  local node pid pids=()
  # Every slice at once: each ssh follows its logs until interrupted.
  for node in "${NODES[@]}"; do
    ssh_node "$node" "for f in $R_JOB/*.log; do n=\$(basename \"\$f\" .log); \
tail -n 100 -F \"\$f\" | sed -u \"s/^/[\$n] /\" & done; wait" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

cmd_status() {
  local node
  for node in "${NODES[@]}"; do
    step gcloud compute tpus tpu-vm describe "$node" "${GFLAGS[@]}" --format='value(state,health)'
    ssh_node "$node" "for f in $R_JOB/*.pid; do [ -e \"\$f\" ] || continue; \
p=\$(cat \"\$f\"); n=\$(basename \"\$f\" .pid); \
if kill -0 \"\$p\" 2>/dev/null; then echo \"[\$n] running (pid \$p)\"; else echo \"[\$n] exited\"; fi; \
tail -n 3 \"\${f%.pid}.log\" | sed \"s/^/[\$n]   /\"; done"
  done
}

cmd_stop() {
  local node
  for node in "${NODES[@]}"; do
    # The job leads its own session (setsid), so its pid is its process group.
    ssh_node "$node" "alive() { s=\$(ps -o stat= -p \"\$1\" 2>/dev/null) && [ \"\${s#Z}\" = \"\$s\" ]; }; \
for f in $R_JOB/*.pid; do [ -e \"\$f\" ] || continue; p=\$(cat \"\$f\"); \
kill -s TERM -- \"-\$p\" 2>/dev/null || true; i=0; \
while alive \"\$p\" && [ \$i -lt $((GRACE * 5)) ]; do sleep 0.2; i=\$((i + 1)); done; \
kill -s KILL -- \"-\$p\" 2>/dev/null || true; rm -f \"\$f\"; echo \"stopped \${f%.pid} (pid \$p)\"; done; \
p=\$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null || true); \
if [ -n \"\$p\" ]; then echo \"killing TPU holders: \$p\"; sudo kill -9 \$p || true; fi; \
sudo rm -f /tmp/libtpu_lockfile"
  done
}

cmd_delete() {
  if [[ $NUM_SLICES == 1 ]]; then
    step gcloud compute tpus tpu-vm delete "$TPU" "${GFLAGS[@]}" --quiet
  else
    step gcloud compute tpus queued-resources delete "$TPU" "${GFLAGS[@]}" --force --quiet
  fi
}

case $COMMAND in
  create) cmd_create ;;
  ship) cmd_ship ;;
  setup) cmd_ship; cmd_setup ;;
  run) cmd_ship; cmd_setup; cmd_start ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
esac
