#!/usr/bin/env bash
# Chinese stage-1 pretraining (LAVIS's blip2 Q-Former from bert-base-chinese, COCO-CN + AI Challenger):
#   configs/blip2_internlm/pretrain_stage1_zh.yaml
# GPUS (default 2), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set the launch; arguments go to
# blip2_internlm.train, e.g. --options run.batch_size_train=16.  Asset and data paths are
# environment variables (docs/plan.md, "Real-size configs"; BERT_BASE_CHINESE: docs/chinese_stage1.md).
# Outputs go under the current directory (run.output_dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node=${GPUS:-2} --nnodes=${NNODES:-1} \
    --node_rank=${NODE_RANK:-0} --master_addr=${MASTER_ADDR:-127.0.0.1} --master_port=${MASTER_PORT:-29500} \
    -m blip2_internlm.train --cfg-path "$ROOT/configs/blip2_internlm/pretrain_stage1_zh.yaml" "$@"
