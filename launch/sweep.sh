#!/usr/bin/env bash
# Create a W&B sweep and start its agents, here or as a Slurm array (one node per agent).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/sweep.sh [options] SWEEP_FILE
       launch/sweep.sh [options] --sweep-id ENTITY/PROJECT/ID

Create a W&B sweep from SWEEP_FILE (configs/sweeps/*.yaml) and start agents that run its trials.

Options:
  --project NAME   W&B project (default: $WANDB_PROJECT, else safemt-moderator)
  --entity NAME    W&B entity (default: $WANDB_ENTITY, else your default entity)
  --agents N       number of agents (default 1)
  --count K        trials per agent (default: until the sweep stops; 1 per array task with --slurm)
  --slurm          submit the agents as a Slurm array of launch/slurm/sweep_agent.sbatch (a node each);
                   without it the agents run here and share this machine (a 7B trial uses 8 GPUs)
  --sweep-id PATH  add agents to an existing sweep instead of creating one
  --dry-run        print the commands instead of running them
  -h, --help       show this help

Examples:
  launch/sweep.sh --dry-run configs/sweeps/tiny_cpu.yaml
  launch/sweep.sh --agents 4 --slurm configs/sweeps/qwen2_5_vl_7b_lora.yaml
EOF
}

die() {
  echo "sweep.sh: error: $*" >&2
  exit 2
}
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

project=${WANDB_PROJECT:-safemt-moderator}
entity=${WANDB_ENTITY:-}
agents=1
count=
slurm=0
sweep_path=
dry_run=0
sweep_file=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) need_value "$@" && project=$2 && shift 2 ;;
    --entity) need_value "$@" && entity=$2 && shift 2 ;;
    --agents) need_value "$@" && agents=$2 && shift 2 ;;
    --count) need_value "$@" && count=$2 && shift 2 ;;
    --sweep-id) need_value "$@" && sweep_path=$2 && shift 2 ;;
    --slurm) slurm=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$sweep_file" ]] || die "one sweep file at a time (got $sweep_file and $1)"
      sweep_file=$1 && shift
      ;;
  esac
done
[[ "$agents" =~ ^[1-9][0-9]*$ ]] || die "--agents must be a positive integer, got '$agents'"
[[ -z "$count" || "$count" =~ ^[1-9][0-9]*$ ]] || die "--count must be a positive integer, got '$count'"
if ((slurm)) && [[ -z "$count" ]]; then
  count=1 # an array task has a time limit: one trial per task unless asked otherwise
fi

# The sweep's command uses paths relative to the repository root, and agents run it in their cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh
if [[ -z "$sweep_path" ]]; then
  [[ -n "$sweep_file" ]] || die "no sweep file given (see --help)"
  [[ -f "$sweep_file" ]] || die "sweep file $sweep_file not found (paths are relative to the repository root)"
fi
if ((!dry_run)); then
  activate_venv
  command -v wandb >/dev/null || die "wandb is not on PATH: activate the training environment"
  if ((slurm)); then
    command -v sbatch >/dev/null || die "sbatch is not on PATH: --slurm needs a Slurm login node"
  fi
fi

if [[ -z "$sweep_path" ]]; then
  create=(wandb sweep --project "$project")
  if [[ -n "$entity" ]]; then
    create+=(--entity "$entity")
  fi
  create+=("$sweep_file")
  if ((dry_run)); then
    show_command "${create[@]}"
    sweep_path="${entity:+$entity/}$project/SWEEP_ID"
    echo "sweep.sh: dry run: SWEEP_ID stands for the id that wandb sweep prints" >&2
  else
    # wandb prints "Run sweep agent with: wandb agent ENTITY/PROJECT/ID" (on stderr, maybe coloured).
    output=$("${create[@]}" 2>&1) || {
      echo "$output" >&2
      die "wandb sweep failed"
    }
    echo "$output" >&2
    sweep_path=$(sed -E 's/\x1b\[[0-9;]*m//g' <<<"$output" | grep -oE 'wandb agent [^[:space:]]+' | tail -n 1 | cut -d' ' -f3 || true)
    [[ -n "$sweep_path" ]] || die "could not read the sweep id from the output of: $(show_command "${create[@]}")"
  fi
fi

if ((slurm)); then
  submit=(sbatch "--array=0-$((agents - 1))" "--export=ALL,AGENT_COUNT=$count" launch/slurm/sweep_agent.sbatch "$sweep_path")
  show_command "${submit[@]}"
  if ((!dry_run)); then
    "${submit[@]}"
  fi
  exit 0
fi

agent=(wandb agent)
if [[ -n "$count" ]]; then
  agent+=(--count "$count")
fi
agent+=("$sweep_path")
pids=()
# Background jobs of a script ignore Ctrl-C: stop the agents with the script.
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < agents; i++)); do
  show_command "${agent[@]}"
  if ((!dry_run)); then
    "${agent[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
