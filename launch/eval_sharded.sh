#!/usr/bin/env bash
# A sharded SafeMT evaluation: thresholds, N shards at once (one GPU each), then the report.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/eval_sharded.sh [--local] [--dry-run] N [-- EVAL_ARGS...]

Runs `python -m eval.run --config $EVAL_CONFIG EVAL_ARGS` split into N shards:
  1. --thresholds-only: scores the validation split once and fixes the moderator's threshold
     (every shard needs it; quick without a detection_split);
  2. --shard I/N for I = 0..N-1, all at once, one GPU each (each writes <out_dir>/cache/shard-I-of-N/);
  3. the unsharded run: finds every item cached, computes nothing, writes the report.
Each step starts only when the previous one succeeded. A failed or requeued shard resumes from its
cache when resubmitted; rerunning the whole script redoes nothing that is cached.

Default: submit to Slurm (launch/slurm/eval.sbatch for steps 1 and 3, the array
launch/slurm/eval_shards.sbatch for step 2, chained with --dependency=afterok), so the shards
spread over any nodes with free GPUs. --local: run here without Slurm, shard I on GPU I mod G of the
G GPUs in CUDA_VISIBLE_DEVICES (default 0..N-1).

Environment:
  EVAL_CONFIG  eval config (default configs/eval/safemt_7b.yaml)
  VENV, PYTHON as for the other launchers; SBATCH (sbatch) to submit with

Options:
  --local     run the shards as processes on this machine's GPUs instead of submitting to Slurm
  --dry-run   print the commands instead of running or submitting them
  -h, --help  show this help

Examples:
  launch/eval_sharded.sh 8                      # Slurm: 8 one-GPU shards, on one node or several
  launch/eval_sharded.sh --local 8 -- --limit 100   # one node with 8 GPUs, no Slurm
USAGE
}

die() {
  echo "eval_sharded.sh: error: $*" >&2
  exit 2
}

dry_run=0 local_run=0 shards=""
eval_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 && shift ;;
    --local) local_run=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    --) shift && eval_args=("$@") && break ;;
    -*) die "unknown option $1 (eval.run arguments go after --; see --help)" ;;
    *)
      [[ -z "$shards" ]] || die "unexpected argument $1 (eval.run arguments go after --; see --help)"
      shards=$1 && shift
      ;;
  esac
done
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || die "N, the number of shards, must be a positive integer (got '${shards}')"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh
EVAL_CONFIG=${EVAL_CONFIG:-configs/eval/safemt_7b.yaml}
[[ -f "$EVAL_CONFIG" ]] || die "eval config $EVAL_CONFIG not found"
python=${PYTHON:-python}
eval_run=("$python" -m eval.run --config "$EVAL_CONFIG")

if ((local_run)); then
  if ((!dry_run)); then
    activate_venv
  fi
  IFS=, read -r -a gpus <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((shards - 1)))}"
  run_step() {
    if ((dry_run)); then
      show_command "$@"
    else
      "$@"
    fi
  }
  run_step "${eval_run[@]}" --thresholds-only "${eval_args[@]}"
  pids=()
  for ((index = 0; index < shards; index++)); do
    gpu=${gpus[index % ${#gpus[@]}]}
    if ((dry_run)); then
      echo "CUDA_VISIBLE_DEVICES=$gpu $(show_command "${eval_run[@]}" --shard "$index/$shards" "${eval_args[@]}") &"
    else
      CUDA_VISIBLE_DEVICES=$gpu "${eval_run[@]}" --shard "$index/$shards" "${eval_args[@]}" &
      pids+=($!)
    fi
  done
  failed=0
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  ((!failed)) || die "a shard failed (see its output above); rerun this command to resume"
  ((dry_run)) && echo "wait"
  run_step "${eval_run[@]}" "${eval_args[@]}"
  exit 0
fi

sbatch=${SBATCH:-sbatch}
export EVAL_CONFIG
thresholds=("$sbatch" --parsable --job-name=safemt-eval-thresholds launch/slurm/eval.sbatch --thresholds-only "${eval_args[@]}")
array=("$sbatch" --parsable "--array=0-$((shards - 1))" "--export=ALL,EVAL_SHARDS=$shards")
array+=(launch/slurm/eval_shards.sbatch "${eval_args[@]}")
report=("$sbatch" --parsable --job-name=safemt-eval-report launch/slurm/eval.sbatch "${eval_args[@]}")
if ((dry_run)); then
  show_command "${thresholds[@]}"
  show_command "${array[@]:0:2}" "--dependency=afterok:<thresholds job>" "${array[@]:2}"
  show_command "${report[@]:0:2}" "--dependency=afterok:<array job>" "${report[@]:2}"
  exit 0
fi
command -v "$sbatch" >/dev/null || die "$sbatch is not on PATH: submit from a Slurm login node (or use --local)"
first=$("${thresholds[@]}")
second=$("${array[@]:0:2}" "--dependency=afterok:${first%%;*}" "${array[@]:2}")
third=$("${report[@]:0:2}" "--dependency=afterok:${second%%;*}" "${report[@]:2}")
echo "eval_sharded.sh: thresholds job ${first%%;*}, shard array ${second%%;*} (0-$((shards - 1))), report job ${third%%;*}"
