#!/usr/bin/env bash
# Launch examples/pretrain_gdn.py for a Qwen3.5-like config at a tensor-parallel size and length.
#
#   bash examples/launch/pretrain.sh [--dry-run] [--rdzv-endpoint HOST:PORT] MODEL TP LENGTH [flags...]
#
#   MODEL   0p8b | 4b | 9b | 27b       (examples/configs/qwen35_MODEL.args)
#   TP      1 | 2 | 4 | 8              tensor-parallel size (sequence parallelism on when TP > 1;
#                                      KV groups raised to TP where the config has fewer)
#   LENGTH  32k | 64k | 128k | 256k    tokens per sequence; context parallelism CP = LENGTH / 64k
#                                      (at least 1: each CP rank holds at most 64k tokens)
#   flags   more pretrain_gdn.py / Megatron flags, after ours (so they win): the data
#           (--mock-data or --data-path PREFIX plus your tokenizer), --train-iters, --save, ...
#
# GPUs: TP x CP; above 8 the job spans ceil(TP x CP / 8) nodes: run the same command on each
# node with --rdzv-endpoint of the first. With CP > 1 the GDN layers pass states between CP ranks
# and the attention layers all-gather keys and values (SDPA attention; TE's own with TE).
# Examples:
#   bash examples/launch/pretrain.sh 4b 1 32k --mock-data --train-iters 20     # one H200
#   bash examples/launch/pretrain.sh 27b 8 32k --mock-data --train-iters 20    # one 8-GPU node
#   bash examples/launch/pretrain.sh 9b 4 256k --mock-data --rdzv-endpoint node0:29500   # 16 GPUs
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=0
rdzv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --rdzv-endpoint) rdzv="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ]; then
  sed -n '2,22p' "$0" >&2
  exit 2
fi
model=$1 tp=$2 length=$3
shift 3

config=examples/configs/qwen35_${model}.args
[ -f "$config" ] || { echo "pretrain.sh: MODEL must be 0p8b, 4b, 9b or 27b (no $config)" >&2; exit 2; }
case "$tp" in 1|2|4|8) ;; *) echo "pretrain.sh: TP must be 1, 2, 4 or 8, got $tp" >&2; exit 2 ;; esac
case "$length" in
  32k) tokens=32768 ;; 64k) tokens=65536 ;; 128k) tokens=131072 ;; 256k) tokens=262144 ;;
  *) echo "pretrain.sh: LENGTH must be 32k, 64k, 128k or 256k, got $length" >&2; exit 2 ;;
esac
cp=$(( (tokens + 65535) / 65536 ))
gpus=$(( tp * cp ))
nodes=$(( (gpus + 7) / 8 ))
per_node=$(( gpus < 8 ? gpus : 8 ))

flags=(--config "$config" --tensor-model-parallel-size "$tp" --context-parallel-size "$cp"
       --seq-length "$tokens" --max-position-embeddings "$tokens" --global-batch-size 8)
[ "$tp" -gt 1 ] && flags+=(--sequence-parallel)
# Megatron splits whole KV heads over TP ranks: where the config has fewer KV groups than TP
# (0.8B: 2; 4B, 9B, 27B: 4), the attention layers get TP groups (a change of the model, noted).
groups=$(grep -o -- '--num-query-groups [0-9]*' "$config" | awk '{print $2}')
if [ "$tp" -gt "$groups" ]; then
  echo "pretrain.sh: --num-query-groups raised from $groups to $tp for TP $tp" >&2
  flags+=(--num-query-groups "$tp")
fi

launcher=(torchrun --nproc-per-node "$per_node")
if [ "$nodes" -gt 1 ]; then
  [ -n "$rdzv" ] || [ "$dry_run" = 1 ] || {
    echo "pretrain.sh: TP $tp x CP $cp = $gpus GPUs on $nodes nodes needs --rdzv-endpoint HOST:PORT" >&2; exit 2; }
  rdzv=${rdzv:-HOST:PORT}
  launcher+=(--nnodes "$nodes" --rdzv-backend c10d --rdzv-endpoint "$rdzv")
else
  launcher+=(--standalone)
fi

cmd=("${launcher[@]}" examples/pretrain_gdn.py "${flags[@]}" "$@")
echo "${cmd[*]}"
[ "$dry_run" = 1 ] && exit 0
# One CUDA work queue per GPU, so that TP communication overlaps in issue order (Megatron's advice).
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "${cmd[@]}"
