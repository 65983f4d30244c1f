#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo when there is no GPU).
#   bash launch/deepspeed_single.sh 8 configs/pretrain/gpt-350m.yaml [key=value ...]
set -euo pipefail
NPROC=${1:?number of processes}; CONFIG=${2:?config}; shift 2
# One OpenMP thread per process unless told otherwise: N processes x all cores oversubscribes the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module llmstack pretrain "$CONFIG" "$@"
