#!/usr/bin/env bash
# Run a plad_jax pipeline on a Cloud TPU pod slice: create the TPU VM (unless it exists), install
# plad_jax on every worker, then run the same command on all workers at once. JAX finds the other
# hosts by itself on TPU VMs (plad_jax.launch calls jax.distributed.initialize()).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR [plad_jax.launch flags ...]
#   launch/tpu_pod.sh plad-v4 us-central2-b v4-64 --config tldr_t5 --run-dir /mnt/shared/runs/tldr_t5 \
#       --set teacher.path=/mnt/shared/models/t5-v1_1-xxl --set student.path=/mnt/shared/models/t5-v1_1-large
#
# Environment: PROJECT (gcloud project; default: the configured one), RUNTIME (TPU software
# version, default tpu-ubuntu2204-base), REPO (git URL of plad_jax to install, default: this
# checkout is copied to every worker), SPOT=1 for a spot slice, KEEP=1 to keep the VM afterwards.
# Paths must be visible on every worker (a Filestore/NFS or Cloud Storage FUSE mount, set up with
# SETUP="commands run on all workers first"); the run directory is where stages resume from after
# a preemption, so rerunning this script with the same arguments continues the run.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
runtime=${RUNTIME:-tpu-ubuntu2204-base}
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project "$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")

if ! "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  echo "creating TPU VM $name ($accelerator, $zone)"
  spot=()
  [ "${SPOT:-0}" = 1 ] && spot=(--spot)
  "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$runtime" "${spot[@]}"
fi

on_all() { "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$1"; }

if [ -n "${REPO:-}" ]; then
  on_all "rm -rf ~/plad_jax && git clone -q '$REPO' ~/plad_jax"
else
  src=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$src" --exclude=.git --exclude=runs -czf /tmp/plad_jax.tgz .
  "${tpu[@]}" scp /tmp/plad_jax.tgz "$name":/tmp/plad_jax.tgz --zone "$zone" --worker=all
  on_all "rm -rf ~/plad_jax && mkdir -p ~/plad_jax && tar -C ~/plad_jax -xzf /tmp/plad_jax.tgz"
fi
on_all "cd ~/plad_jax && python3 -m pip install -q -U pip && python3 -m pip install -q 'jax[tpu]' -e ."
[ -n "${SETUP:-}" ] && on_all "$SETUP"

args=$(printf ' %q' "$@")
status=0
on_all "cd ~/plad_jax && python3 -m plad_jax.launch$args" || status=$?
if [ "${KEEP:-0}" != 1 ]; then
  "${tpu[@]}" delete "$name" --zone "$zone" --quiet
fi
exit $status
