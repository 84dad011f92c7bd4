#!/usr/bin/env bash
# Launch `jaxbatch train` on every worker of a Cloud TPU VM pod slice.
#
# Each worker gets the same command; jaxbatch.parallel.initialize() finds the other workers through
# the TPU metadata (jax.distributed.initialize() without arguments), and every worker feeds its own
# shard of the data. See BUILD.md ("TPU pods").
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE --config CONFIG [options] [-- TRAIN_ARGS...]

Copies this checkout (git archive of HEAD) to every worker of the TPU VM NAME, installs it with
jax[tpu] into ~/jaxbatch/.venv, and runs on all workers at once:
    .venv/bin/jaxbatch train --config CONFIG --workdir WORKDIR TRAIN_ARGS...

Required:
  --tpu NAME          TPU VM name (gcloud compute tpus tpu-vm list)
  --zone ZONE         its zone, e.g. us-central2-b
  --config CONFIG     config file path inside the repository, e.g. configs/imagenet_resnet50_32k.py
Options:
  --project PROJECT   GCP project (default: gcloud's configured project)
  --workdir DIR       run directory; use a gs:// path so that the checkpoint shards written by
                      all workers land in one place (default: runs/<config name> under
                      ~/jaxbatch on each worker, fine for a single-host slice)
  --skip-install      do not copy or install; run the already installed checkout
  --dry-run           print the gcloud commands instead of running them
  -h, --help          this help
Everything after `--` is passed to `jaxbatch train` (e.g. --config.batch_size=32768).
EOF
}

die() { echo "launch_tpu_pod.sh: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

TPU="" ZONE="" CONFIG="" PROJECT="" WORKDIR="" SKIP_INSTALL=0 DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) [[ $# -ge 2 ]] || die "--tpu needs a value"; TPU="$2"; shift 2 ;;
    --zone) [[ $# -ge 2 ]] || die "--zone needs a value"; ZONE="$2"; shift 2 ;;
    --config) [[ $# -ge 2 ]] || die "--config needs a value"; CONFIG="$2"; shift 2 ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a value"; PROJECT="$2"; shift 2 ;;
    --workdir) [[ $# -ge 2 ]] || die "--workdir needs a value"; WORKDIR="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$TPU" ]] || die "missing --tpu NAME"
[[ -n "$ZONE" ]] || die "missing --zone ZONE"
[[ -n "$CONFIG" ]] || die "missing --config CONFIG"
[[ "$CONFIG" == *.py ]] || die "--config '$CONFIG' must be a configs/*.py file"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO_ROOT/$CONFIG" ]] || die "--config '$CONFIG' not found under $REPO_ROOT"
if [[ -z "$WORKDIR" ]]; then
  name="$(basename "$CONFIG" .py)"
  WORKDIR="runs/$name"
fi

GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project "$PROJECT")
ARCHIVE="/tmp/jaxbatch-$$.tar.gz"

# Shell-quote one word for display, readably: plain words bare, anything else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    for word in "$@"; do printf ' '; quote "$word"; done
    printf '\n'
  else
    "$@"
  fi
}

train_cmd="cd ~/jaxbatch && .venv/bin/jaxbatch train --config $(printf '%q' "$CONFIG")"
train_cmd+=" --workdir $(printf '%q' "$WORKDIR")"
for arg in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do
  train_cmd+=" $(printf '%q' "$arg")"
done

if [[ "$SKIP_INSTALL" == 0 ]]; then
  if ! git -C "$REPO_ROOT" cat-file -e "HEAD:$CONFIG" 2>/dev/null; then
    echo "launch_tpu_pod.sh: warning: $CONFIG is not committed; git archive HEAD will not ship it" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:jaxbatch.tar.gz" --worker=all "${LOCATION[@]}"
  # Unpack over the previous copy (keeping .venv and runs/), then install.
  install_cmd="mkdir -p ~/jaxbatch && tar -xzf ~/jaxbatch.tar.gz -C ~/jaxbatch && cd ~/jaxbatch"
  install_cmd+=" && { test -d .venv || python3 -m venv .venv; }"
  install_cmd+=" && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
  run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${LOCATION[@]}" --command="$install_cmd"
  run rm -f "$ARCHIVE"
fi
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${LOCATION[@]}" --command="$train_cmd"
