#!/usr/bin/env bash
# Launch scone_jax on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_run.sh TPU_NAME ZONE [--project=P] [--dry_run] -- --mode=train \
#       --config=experiments/configs/scone.py --workdir=/mnt/shared/run1
#
# Copies this checkout to all workers, installs it with jax[tpu], and runs
# `python -m scone_jax.main --distributed ARGS` on every worker at once
# (jax.distributed.initialize() finds the coordinator on TPU VMs by itself).
# The workdir must be visible to all workers (a shared filesystem); each host
# writes its own checkpoint shards there through orbax.
set -euo pipefail

usage() { sed -n '2,12p' "$0"; exit 2; }
[[ $# -ge 2 ]] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=""; DRY_RUN=0
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project=*) PROJECT_FLAG="--project=${1#--project=}" ;;
    --dry_run) DRY_RUN=1 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "give scone_jax.main flags after --" >&2; usage; }
ARGS=$(printf ' %q' "$@")

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=$(mktemp /tmp/scone_jax.XXXXXX.tar.gz)
trap 'rm -f "$TARBALL"' EXIT
git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$TARBALL"

run() { echo "+ $*"; [[ $DRY_RUN == 1 ]] || "$@"; }
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all)
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME":/tmp/scone_jax.tar.gz \
  --zone="$ZONE" $PROJECT_FLAG --worker=all
run "${SSH[@]}" --command="mkdir -p ~/scone_jax && tar -xzf /tmp/scone_jax.tar.gz -C ~/scone_jax \
  && cd ~/scone_jax && python3 -m pip install -q -e '.[all]' 'jax[tpu]'"
run "${SSH[@]}" --command="cd ~/scone_jax && python3 -m scone_jax.main --distributed$ARGS"
