#!/usr/bin/env bash
# Multi-node training without Slurm: run this once on every node, with torchrun's variables set.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multinode.sh [--dry-run] [-- TRAIN_ARGS...]

Runs `accelerate launch ... train/sft.py --config RECIPE [TRAIN_ARGS...]` for this node of a
multi-node run. Start it on every node with the same MASTER_ADDR / MASTER_PORT / NNODES and the
node's own NODE_RANK (0 on the MASTER_ADDR node). Arguments for train/sft.py go after `--`; anything
else before `--` that is not an option below is an error.

Environment:
  MASTER_ADDR        address of node 0 (required when NNODES > 1)
  MASTER_PORT        port on node 0 (default 29500)
  NNODES             number of nodes (default 1)
  NODE_RANK          this node's rank, 0..NNODES-1 (default 0)
  GPUS_PER_NODE      GPUs per node (default: CUDA_VISIBLE_DEVICES, else nvidia-smi)
  RECIPE             training recipe (default configs/sft/qwen2_5_vl_7b_lora.yaml)
  ACCELERATE_CONFIG  default configs/accelerate/zero3_multinode.yaml
  VENV               virtual environment activated when present (default .venv; empty to skip)
  PYTHON             interpreter that builds the command (default python)

Options:
  --dry-run   print the command instead of running it
  -h, --help  show this help

Example (2 nodes x 8 GPUs), on the second node:
  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 GPUS_PER_NODE=8 launch/multinode.sh -- --learning_rate 5e-5
EOF
}

die() {
  echo "multinode.sh: error: $*" >&2
  exit 2
}

# Every argument before `--` is a launcher option, wherever it stands: a misspelt one must stop the
# launch, not slip through to training with --dry-run after it (which would then launch for real).
dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    --) shift && train_args=("$@") && break ;;
    -*) die "unknown option $1 (train/sft.py arguments go after --; see --help)" ;;
    *) die "unexpected argument $1 (train/sft.py arguments go after --; see --help)" ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh
activate_venv
launch_args=(
  --recipe "${RECIPE:-configs/sft/qwen2_5_vl_7b_lora.yaml}"
  --accelerate-config "${ACCELERATE_CONFIG:-configs/accelerate/zero3_multinode.yaml}"
)
# Time the workers get to checkpoint after a SIGTERM before the launcher SIGKILLs them (torch: 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
if ((!dry_run)); then
  launch_args+=(--exec)
fi
exec "${PYTHON:-python}" -m launch.commands torchrun-env "${launch_args[@]}" -- "${train_args[@]}"
