#!/usr/bin/env bash
# Submit `jaxbatch train` to SLURM: one process per GPU or one per node, started by srun.
#
# jaxbatch.parallel.initialize() reads SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST inside
# each task: process 0 on the first node is the coordinator, on port 12000 + job id mod 20000 (or
# JAXBATCH_COORDINATOR_PORT). In per-GPU mode every task sees all GPUs of its node and takes
# GPU number SLURM_LOCALID. See BUILD.md ("SLURM clusters").
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_slurm.sh --nodes N --gpus-per-node G --config CONFIG [options] [-- TRAIN_ARGS...]

Writes a batch script and submits it with sbatch. Each task runs
    VENV/bin/jaxbatch train --config CONFIG --workdir WORKDIR TRAIN_ARGS...

Required:
  --nodes N            number of nodes
  --gpus-per-node G    GPUs per node
  --config CONFIG      config file, e.g. configs/bert_large_lamb_64k.py
Options:
  --mode MODE          per-gpu (default: N×G processes, one GPU each) or per-node (N processes,
                       each driving all G GPUs of its node)
  --workdir DIR        run directory on a filesystem all nodes share (default: runs/<config name>)
  --partition P        SLURM partition
  --account A          SLURM account
  --time T             time limit (default 24:00:00)
  --cpus-per-task C    CPU cores per task (default 8)
  --job-name NAME      job name (default jaxbatch-<config name>)
  --venv DIR           virtual environment on the nodes (default: this checkout's .venv)
  --port PORT          coordinator port (sets JAXBATCH_COORDINATOR_PORT)
  --dry-run            print the batch script and the sbatch command instead of submitting
  -h, --help           this help
Everything after `--` is passed to `jaxbatch train`.
EOF
}

die() { echo "launch_slurm.sh: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES="" GPUS="" CONFIG="" MODE="per-gpu" WORKDIR="" PARTITION="" ACCOUNT="" TIME="24:00:00"
CPUS=8 JOB_NAME="" VENV="$REPO_ROOT/.venv" PORT="" DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes|--gpus-per-node|--config|--mode|--workdir|--partition|--account|--time|\
    --cpus-per-task|--job-name|--venv|--port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --nodes) NODES="$2" ;;
        --gpus-per-node) GPUS="$2" ;;
        --config) CONFIG="$2" ;;
        --mode) MODE="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --partition) PARTITION="$2" ;;
        --account) ACCOUNT="$2" ;;
        --time) TIME="$2" ;;
        --cpus-per-task) CPUS="$2" ;;
        --job-name) JOB_NAME="$2" ;;
        --venv) VENV="$2" ;;
        --port) PORT="$2" ;;
      esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NODES" ]] || die "missing --nodes N"
[[ -n "$GPUS" ]] || die "missing --gpus-per-node G"
[[ -n "$CONFIG" ]] || die "missing --config CONFIG"
is_int "$NODES" || die "--nodes '$NODES' must be a positive integer"
is_int "$GPUS" || die "--gpus-per-node '$GPUS' must be a positive integer"
is_int "$CPUS" || die "--cpus-per-task '$CPUS' must be a positive integer"
[[ -z "$PORT" ]] || is_int "$PORT" || die "--port '$PORT' must be a positive integer"
[[ "$CONFIG" == *.py ]] || die "--config '$CONFIG' must be a configs/*.py file"
[[ -f "$REPO_ROOT/$CONFIG" || -f "$CONFIG" ]] || die "--config '$CONFIG' not found"
case "$MODE" in
  per-gpu) TASKS_PER_NODE="$GPUS" ;;
  per-node) TASKS_PER_NODE=1 ;;
  *) die "--mode '$MODE' must be per-gpu or per-node" ;;
esac
name="$(basename "$CONFIG" .py)"
[[ -n "$WORKDIR" ]] || WORKDIR="$REPO_ROOT/runs/$name"
[[ "$WORKDIR" == /* ]] || WORKDIR="$PWD/$WORKDIR"  # sbatch --output and srun's cd must agree
[[ -n "$JOB_NAME" ]] || JOB_NAME="jaxbatch-$name"

train=("$VENV/bin/jaxbatch" train --config "$CONFIG" --workdir "$WORKDIR")
train+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")

script="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS_PER_NODE
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out"
[[ -n "$PARTITION" ]] && script+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && script+=$'\n'"#SBATCH --account=$ACCOUNT"
script+="
set -euo pipefail
cd $(printf '%q' "$REPO_ROOT")"
[[ -n "$PORT" ]] && script+=$'\n'"export JAXBATCH_COORDINATOR_PORT=$PORT"
script+="
# One task per $( [[ "$MODE" == per-gpu ]] && echo GPU || echo node ); jaxbatch.parallel.initialize() reads the SLURM_* variables.
srun --kill-on-bad-exit=1 --gpus-per-node=$GPUS$(printf ' %q' "${train[@]}")"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s\n' "$script"
  echo "+ mkdir -p $(printf '%q' "$WORKDIR") && sbatch <batch script above>"
else
  mkdir -p "$WORKDIR"
  printf '%s\n' "$script" | sbatch
fi
