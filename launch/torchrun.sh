#!/usr/bin/env bash
# torchrun with c10d rendezvous; the same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh 8 configs/pretrain/gpt-350m.yaml
set -euo pipefail
NPROC=${1:?processes per node}; CONFIG=${2:?config}; shift 2
if [[ ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the number of processes per node must be a whole number >= 1, got '$NPROC'" >&2
  exit 2
fi
# OpenMP threads per process, unless OMP_NUM_THREADS is set: this node's cores (nproc) shared by its
# NPROC processes, at least 1 (torchrun alone would set 1, which starves CPU Adam under
# zero.offload_optimizer and CPU training).
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 1 ? cores / NPROC : 1 ))}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  -m llmstack pretrain "$CONFIG" "$@"
