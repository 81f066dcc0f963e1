#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice (v4/v5e/v5p/v6e), at once.
#
#   launch/tpu_pod.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=ID] [--dir=~/long-vita] \
#       -- python -m vita_jax.train --config=configs/stage4.py --workdir=gs://BUCKET/stage4
#
# Every worker runs the command in --dir (a clone of this repository with `make setup` done,
# e.g. via `launch/tpu_pod.sh ... -- 'git clone URL ~/long-vita && cd ~/long-vita && make setup'`
# with --dir=~). JAX finds the other workers from the TPU metadata: `vita_jax.train` calls
# `jax.distributed.initialize()` with no arguments when VITA_DISTRIBUTED=auto, which this script
# sets. Use a gs:// or shared-disk --workdir: only process 0 writes metrics, all write their
# checkpoint shards. --dry-run prints the exact gcloud command.
set -euo pipefail

show_help() {  # the header comment of this file, then exit 0
  awk 'NR > 1 && /^#SBATCH/ {next} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 0
}

usage() {
  echo "usage: $0 [--dry-run] --tpu=NAME --zone=ZONE [--project=ID] [--dir=DIR] -- <command...>" >&2
  exit 2
}

dry_run=0; tpu=""; zone=""; project=""; dir="~/long-vita"
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -h|--help) show_help ;;
    --dry-run) dry_run=1 ;;
    --tpu=*) tpu="${1#--tpu=}" ;;
    --zone=*) zone="${1#--zone=}" ;;
    --project=*) project="${1#--project=}" ;;
    --dir=*) dir="${1#--dir=}" ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 2 && "$1" == "--" ]] || usage
shift
[[ -n "$tpu" && -n "$zone" ]] || { echo "error: --tpu=NAME and --zone=ZONE are required" >&2; usage; }

# One shell line run on each worker; a single-string command is passed through unquoted so a
# user can write pipelines, several words are quoted one by one.
quote() {  # words as a shell would need them, quoting only where necessary
  local w out=""
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}
if [[ $# -eq 1 ]]; then user_cmd="$1"; else user_cmd="$(quote "$@")"; fi
remote="cd $dir && export VITA_DISTRIBUTED=auto && $user_cmd"

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z "$project" ]] || cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if [[ $dry_run == 1 ]]; then
  quote "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
