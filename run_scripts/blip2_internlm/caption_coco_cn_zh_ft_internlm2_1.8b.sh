#!/usr/bin/env bash
# COCO-CN caption fine-tuning of the Chinese stage-2 model:
#   configs/blip2_internlm/caption_coco_cn_zh_ft_internlm2_1.8b.yaml
# GPUS (default 2), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set the launch; arguments go to
# blip2_internlm.train, e.g. --options run.batch_size_eval=8.  Asset and data paths are
# environment variables (docs/plan.md, "Real-size configs"; corpora: docs/chinese_data.md);
# STAGE2_CHECKPOINT is required.  Outputs go under the current directory (run.output_dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node=${GPUS:-2} --nnodes=${NNODES:-1} \
    --node_rank=${NODE_RANK:-0} --master_addr=${MASTER_ADDR:-127.0.0.1} --master_port=${MASTER_PORT:-29500} \
    -m blip2_internlm.train --cfg-path "$ROOT/configs/blip2_internlm/caption_coco_cn_zh_ft_internlm2_1.8b.yaml" "$@"
