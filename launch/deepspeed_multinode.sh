#!/usr/bin/env bash
# Multi-node with the deepspeed launcher and a hostfile.
#   With passwordless ssh (pdsh) from the first node:
#     bash launch/deepspeed_multinode.sh launch/hostfile configs/pretrain/gpt-1.3b.yaml
#   Without ssh: run on every node, NODE_RANK=0..N-1, MASTER_ADDR = the first node's address:
#     NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/deepspeed_multinode.sh launch/hostfile CONFIG
# NCCL settings that matter: NCCL_SOCKET_IFNAME (the interface nodes talk over), NCCL_IB_HCA
# (InfiniBand adapters), NCCL_DEBUG=WARN for failures. Put exports in ~/.deepspeed_env to forward
# them to every node under pdsh.
set -euo pipefail
HOSTFILE=${1:?hostfile}; CONFIG=${2:?config}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NO_SSH:-}" ]]; then
  ARGS+=(--no_ssh --node_rank "${NODE_RANK:?NODE_RANK}" --master_addr "${MASTER_ADDR:?MASTER_ADDR}")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
fi
exec deepspeed "${ARGS[@]}" --module llmstack pretrain "$CONFIG" "$@"
