#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo when there is no GPU).
#   bash launch/deepspeed_single.sh 8 configs/pretrain/gpt-350m.yaml [key=value ...]
set -euo pipefail
NPROC=${1:?number of processes}; CONFIG=${2:?config}; shift 2
if [[ ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the number of processes must be a whole number >= 1, got '$NPROC'" >&2
  exit 2
fi
# OpenMP threads per process, unless OMP_NUM_THREADS is set: this machine's cores (nproc: those
# this job may use) shared by the NPROC processes, at least 1. Torch on CPU and DeepSpeed's CPU Adam
# (zero.offload_optimizer) compute with them: 1 each starves the optimizer step, all cores each
# oversubscribes the CPU NPROC times.
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 1 ? cores / NPROC : 1 ))}
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module llmstack pretrain "$CONFIG" "$@"
