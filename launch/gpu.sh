#!/usr/bin/env bash
# Run fipo_jax on NVIDIA GPUs with jax[cuda]: one host, or many nodes under SLURM.
#
#   launch/gpu.sh install                  # pip install -e .[cuda] (jax[cuda12]) in the current env
#   launch/gpu.sh local [flags...]         # this host, all visible GPUs, one process
#   sbatch --nodes=16 launch/gpu.sh slurm [flags...]   # multi-node (from a login node)
#
# Multi-node follows JAX's SLURM convention: `srun` starts one process per GPU
# (--ntasks-per-node=$GPUS_PER_NODE), each process sees all GPUs of its node and
# `jax.distributed.initialize()` reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
# SLURM_STEP_NODELIST to find the coordinator (first node) and its own GPU. Nothing to configure.
# Extra arguments are passed to fipo_jax.main (e.g. --config.rl.decay_rate=64).
#SBATCH --job-name=fipo
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --output=fipo-%j.out
set -euo pipefail

: "${CONFIG:=configs/fipo_qwen2_5_7b_math.py}"
: "${RUN_NAME:=$(basename "${CONFIG}" .py)-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}"
: "${WORKDIR:=${PWD}/runs/${RUN_NAME}}"     # a shared filesystem path (or gs://) on multi-node
: "${LOG_DIR:=${WORKDIR}/logs}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
: "${PYTHON:=python3}"
# Let XLA take most of the GPU memory up front, as on TPU; leave a little for NCCL and cuDNN.
: "${XLA_PYTHON_CLIENT_MEM_FRACTION:=0.92}"
export XLA_PYTHON_CLIENT_MEM_FRACTION
# Latency-hiding scheduler overlaps the FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

cmd="${1:-}"
shift || true
case "${cmd}" in
  install)
    "${PYTHON}" -m pip install -e "$(dirname "$0")/..[cuda]"
    "${PYTHON}" -c 'import jax; print(jax.devices())'
    ;;
  local)
    mkdir -p "${LOG_DIR}"
    "${PYTHON}" -m fipo_jax.main --config "${CONFIG}" --workdir "${WORKDIR}" "$@" \
      2>&1 | tee "${LOG_DIR}/host-0.log"
    ;;
  slurm)
    [[ -n "${SLURM_JOB_ID:-}" ]] || { echo "submit with: sbatch launch/gpu.sh slurm" >&2; exit 2; }
    mkdir -p "${LOG_DIR}"
    # One process per GPU; only process 0 writes metrics and plots (fipo_jax.main decides).
    srun --ntasks-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1 \
      --output="${LOG_DIR}/proc-%t.log" \
      "${PYTHON}" -m fipo_jax.main --config "${CONFIG}" --workdir "${WORKDIR}" "$@"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
