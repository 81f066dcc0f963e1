#!/usr/bin/env bash
# Run one command as NPROC JAX processes on this machine, each with DEVICES_PER_PROC fake CPU
# devices, joined by `jax.distributed` through a coordinator on 127.0.0.1.
#
#   launch/local.sh [--dry-run] [--port=N] NPROC DEVICES_PER_PROC -- <command...>
#   launch/local.sh 2 4 -- python -m vita_jax.train --config=configs/stage3.py:tiny --workdir=runs/mp \
#       --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.seq=2
#   (the tiny batch of 4 cannot split over the 8 data shards the default mesh would use)
#
# Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=N (any
# other XLA flags are kept), JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# `vita_jax.train` reads. Output lines are prefixed [p0], [p1], ... When a process fails, the
# others are stopped (TERM, then KILL after LOCAL_KILL_GRACE seconds, default 5) and the launcher
# exits with the first failing exit code; it exits 0 when every process does. Exit code 143
# (a worker saved a checkpoint after a SIGTERM) is not a failure: the others, which save the
# same step, are left to finish, and the launcher exits 143. --dry-run prints the exact
# commands instead of running them.
set -euo pipefail

show_help() {  # the header comment of this file, then exit 0
  awk 'NR > 1 && /^#SBATCH/ {next} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 0
}

usage() {
  echo "usage: $0 [--dry-run] [--port=N] NPROC DEVICES_PER_PROC -- <command...>" >&2
  exit 2
}

dry_run=0
port=""
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    -h|--help) show_help ;;
    --dry-run) dry_run=1 ;;
    --port=*) port="${1#--port=}" ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 3 ]] || usage
nproc="$1"; devices="$2"; shift 2
[[ "$1" == "--" ]] || { echo "error: expected -- before the command, got $1" >&2; usage; }
shift
[[ $# -ge 1 ]] || { echo "error: no command after --" >&2; usage; }
for value in "$nproc" "$devices"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || {
    echo "error: NPROC and DEVICES_PER_PROC must be positive integers, got '$value'" >&2; exit 2; }
done

if [[ -z "$port" ]]; then  # a port the kernel says is free right now
  port="$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# Keep the caller's XLA flags except a device count (pytest's conftest sets one).
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

worker_env() {  # the environment of process $1, as NAME=VALUE words
  printf '%s\n' "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags" \
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$nproc" "JAX_PROCESS_ID=$1"
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < nproc; i++)); do
    line=""
    while IFS= read -r kv; do line+="$(printf '%q' "$kv") "; done < <(worker_env "$i")
    echo "${line}$(printf '%q ' "$@" | sed 's/ $//')"
  done
  exit 0
fi

pids=()
stop_all() {  # TERM every process group still running, KILL what survives the grace ($1 s)
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + ${1:-${LOCAL_KILL_GRACE:-5}}))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
# A TERM to the launcher is a preemption notice: the workers agree on a step, save it and exit
# 143, so they get LOCAL_PREEMPT_GRACE seconds (default 120) before being killed.
trap 'stop_all "${LOCAL_PREEMPT_GRACE:-120}"; exit 143' TERM

for ((i = 0; i < nproc; i++)); do
  mapfile -t env_words < <(worker_env "$i")
  # setsid: each worker leads its own process group, so stopping it stops its children too.
  env "${env_words[@]}" setsid "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  finished=""
  set +e
  wait -n -p finished "${live[@]}"
  code=$?
  set -e
  [[ -n "$finished" ]] || break
  next=()
  for pid in "${live[@]}"; do [[ "$pid" == "$finished" ]] || next+=("$pid"); done
  live=("${next[@]}")
  if ((code == 143)); then   # preempted: it saved with the others, which exit 143 too
    status=143
    continue
  fi
  if ((code != 0)); then
    for ((i = 0; i < nproc; i++)); do [[ "${pids[$i]}" == "$finished" ]] && who=$i; done
    echo "[launch] process $who exited with code $code; stopping the others" >&2
    status=$code
    stop_all
    break
  fi
done
wait 2>/dev/null || true  # let the log prefixers flush
exit "$status"
