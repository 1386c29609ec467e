#!/usr/bin/env bash
# Run a plad_jax pipeline as N processes on this machine (for trying multi-host code without a
# cluster): each process gets its own share of the CPU devices, all talk over gloo on localhost.
#
#   launch/local_multiprocess.sh 2 --config tiny --set ... --run-dir runs/tiny-2proc
set -euo pipefail
n=${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES [plad_jax.launch flags ...]}
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}" \
    python -m plad_jax.launch "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
