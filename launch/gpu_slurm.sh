#!/usr/bin/env bash
# Run a plad_jax pipeline on a GPU cluster with SLURM: one task per node, all GPUs of a node in
# that task. Every task runs the same command; plad_jax.launch calls jax.distributed.initialize()
# (JAX reads the SLURM environment: coordinator = first node, process id = task rank).
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config tldr_llama --run-dir /shared/runs/tldr_llama \
#       --set teacher.path=/shared/models/llama-2-13b --set student.path=/shared/models/llama-2-7b
#
# Install first, once, into an environment every node sees:
#   python -m venv /shared/venv && /shared/venv/bin/pip install -U "jax[cuda12]" -e /path/to/plad_jax
# VENV (default /shared/venv) is activated on each node. The run directory must be on a file system
# all nodes share; rerunning the same sbatch line resumes the run.
#SBATCH --job-name=plad_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=plad_jax-%j.log
set -euo pipefail

# shellcheck disable=SC1091
source "${VENV:-/shared/venv}/bin/activate"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m plad_jax.launch "$@"
