#!/usr/bin/env bash
# Run scone_jax as N local processes on this machine (CPU), the way a multi-host pod
# runs it: each process gets DEVICES fake CPU devices and joins jax.distributed on
# 127.0.0.1.
#
#   launch/local_run.sh NUM_PROCESSES DEVICES_PER_PROCESS -- --mode=train \
#       --config=experiments/configs/scone.py --workdir=/tmp/run
set -euo pipefail
[[ $# -ge 3 && $3 == "--" ]] || { sed -n '2,8p' "$0"; exit 2; }
N=$1; D=$2; shift 3
# A port the OS says is free now (a random one could collide with a busy port).
PORT=${PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    python -m scone_jax.main "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
