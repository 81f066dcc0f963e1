#!/usr/bin/env bash
# Long-context inference with the PyTorch mirror on Ascend NPUs (or GPUs): one process per
# device, the prompt split across them (context parallel ring over HCCL / NCCL).
#
#   launch/npu_torchrun.sh [--dry-run] [--devices=0,1,2,3,4,5,6,7] [--nnodes=1 --node_rank=0 \
#       --master_addr=127.0.0.1 --master_port=29500] -- --model=CKPT_DIR --video=clip.mp4 ...
#
# Runs `torchrun --nproc_per_node=<number of devices> -m vita_torch.generate <args>
# --context_parallel` with ASCEND_RT_VISIBLE_DEVICES set to --devices (also CUDA_VISIBLE_DEVICES
# when --gpu is given). vita_torch picks the device from LOCAL_RANK and the backend (hccl on NPU)
# by itself; every rank returns the generated tokens and rank 0 prints them. On several servers
# run the same line on each with its --node_rank. --dry-run prints the exact command.
set -euo pipefail

show_help() {  # the header comment of this file, then exit 0
  awk 'NR > 1 && /^#SBATCH/ {next} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 0
}

usage() {
  echo "usage: $0 [--dry-run] [--gpu] [--devices=LIST] [--nnodes=N --node_rank=R" \
       "--master_addr=HOST --master_port=PORT] -- <vita_torch.generate arguments...>" >&2
  exit 2
}

quote() {  # words as a shell would need them, quoting only where necessary
  local w out=""
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

dry_run=0; gpu=0; devices="0,1,2,3,4,5,6,7"
nnodes=1; node_rank=0; master_addr=127.0.0.1; master_port=29500
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -h|--help) show_help ;;
    --dry-run) dry_run=1 ;;
    --gpu) gpu=1 ;;
    --devices=*) devices="${1#--devices=}" ;;
    --nnodes=*) nnodes="${1#--nnodes=}" ;;
    --node_rank=*) node_rank="${1#--node_rank=}" ;;
    --master_addr=*) master_addr="${1#--master_addr=}" ;;
    --master_port=*) master_port="${1#--master_port=}" ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 1 && "$1" == "--" ]] || usage
shift
[[ "$devices" =~ ^[0-9]+(,[0-9]+)*$ ]] || {
  echo "error: --devices=$devices is not a comma-separated list of device numbers (e.g. 0,1,2,3)" >&2
  exit 2; }
IFS=, read -r -a device_list <<< "$devices"
nproc=${#device_list[@]}

visible=("ASCEND_RT_VISIBLE_DEVICES=$devices")
[[ $gpu == 0 ]] || visible+=("CUDA_VISIBLE_DEVICES=$devices")
cmd=(env "${visible[@]}" torchrun "--nproc_per_node=$nproc" "--nnodes=$nnodes"
     "--node_rank=$node_rank" "--master_addr=$master_addr" "--master_port=$master_port"
     -m vita_torch.generate "$@" --context_parallel)

if [[ $dry_run == 1 ]]; then
  quote "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
