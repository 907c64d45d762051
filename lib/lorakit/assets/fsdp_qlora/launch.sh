#!/usr/bin/env bash
# FSDP + QLoRA on GPUs (lesson 08). Needs NVIDIA GPUs: bitsandbytes runs 4-bit layers under FSDP on CUDA only.
#
#   bash launch.sh two-gpu [script args]      one machine, two GPUs, with accelerate and fsdp_qlora.yaml
#   bash launch.sh multi-node [script args]   on every node: NNODES, NODE_RANK, MASTER_ADDR (and GPUS_PER_NODE,
#                                             MASTER_PORT) set; torchrun starts GPUS_PER_NODE processes per node
#
# Script args, e.g.: --model_id meta-llama/Llama-2-70b-hf --batch_size 2 --seq_len 2048 --max_steps 100
# (the default model is the course's tiny model, so that the launch itself can be checked without downloads).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODE="${1:?usage: bash launch.sh two-gpu|multi-node [script args]}"
shift

case "$MODE" in
two-gpu)
    accelerate launch --config_file "$HERE/fsdp_qlora.yaml" \
        "$HERE/train_fsdp_qlora.py" --fsdp_config "$HERE/fsdp_qlora.yaml" "$@"
    ;;
multi-node)
    torchrun --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
        --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_id lorakit-fsdp-qlora --rdzv_backend c10d \
        --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
        "$HERE/train_fsdp_qlora.py" --fsdp_config "$HERE/fsdp_qlora.yaml" "$@"
    ;;
*)
    echo "unknown mode '$MODE': use two-gpu or multi-node" >&2
    exit 2
    ;;
esac
