#!/usr/bin/env bash
# COCO-CN caption fine-tuning of the Chinese stage-2 model:
#   configs/blip2_internlm/caption_coco_cn_zh_ft_internlm2_1.8b.yaml
# STAGE2_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/caption_coco_cn_zh_ft_internlm2_1.8b.yaml "$@"
