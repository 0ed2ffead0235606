#!/usr/bin/env bash
# Start diffrl on N machines x M processes with the same command on every machine: the cluster comes from the
# environment (torchrun's rendezvous), the rest of the command line is `diffrl train`'s.
#
#   on every machine:  NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=10.0.0.1 bash scripts/launch.sh configs/ddpo_aesthetic.yaml
#
# NNODES (1), NODE_RANK (0), NPROC_PER_NODE (the visible GPUs, at least 1), MASTER_ADDR (127.0.0.1) and MASTER_PORT
# (29500) are read from the environment; SLURM's SLURM_NNODES / SLURM_NODEID fill in NNODES / NODE_RANK when set.
# Without GPUs the processes train over gloo on the CPU (tested: tests/recipes/test_multiprocess.py, two "machines"
# on one host).
set -euo pipefail
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec python -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m diffrl train "$@"
