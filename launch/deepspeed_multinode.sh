#!/usr/bin/env bash
# Multi-node with the deepspeed launcher and a hostfile.
#   With passwordless ssh (pdsh) from the first node:
#     bash launch/deepspeed_multinode.sh launch/hostfile configs/pretrain/gpt-1.3b.yaml
#   Without ssh: run on every node, NODE_RANK=0..N-1, MASTER_ADDR = the first node's address:
#     NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/deepspeed_multinode.sh launch/hostfile CONFIG
# NCCL settings that matter: NCCL_SOCKET_IFNAME (the interface nodes talk over), NCCL_IB_HCA
# (InfiniBand adapters), NCCL_DEBUG=WARN for failures. Put exports in ~/.deepspeed_env to forward
# them to every node under pdsh.
# launch/hostfile is each cluster's own (git ignores it): cp launch/hostfile.example launch/hostfile, then edit.
set -euo pipefail
if (($# < 2)); then
  echo "usage: bash launch/deepspeed_multinode.sh HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
HOSTFILE=$1; CONFIG=$2; shift 2
# The deepspeed launcher runs on this machine alone when its hostfile is missing (a warning in its
# log): a multi-node job would quietly become a one-node one.
if [[ ! -f $HOSTFILE ]]; then
  echo "error: hostfile not found: $HOSTFILE; copy the example there and list your nodes in it, one" \
    "'<host> slots=<GPUs>' line each: cp launch/hostfile.example $HOSTFILE" >&2
  exit 2
fi
# OpenMP threads per process: left unset here, every rank sets its node's cores / its node's
# processes (at least 1) itself. This script cannot know other nodes' cores, and under pdsh the
# variables of this shell do not reach the ranks (only ~/.deepspeed_env and a few prefixes such as NCCL_):
# put OMP_NUM_THREADS=N in ~/.deepspeed_env to choose.
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NO_SSH:-}" ]]; then
  if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NO_SSH=1 needs NODE_RANK (this node's, 0..N-1) and MASTER_ADDR (the first node's address)" >&2
    exit 2
  fi
  ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
fi
exec deepspeed "${ARGS[@]}" --module llmstack pretrain "$CONFIG" "$@"
