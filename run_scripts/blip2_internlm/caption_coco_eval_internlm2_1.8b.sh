#!/usr/bin/env bash
# COCO caption evaluation (Karpathy test) of the fine-tuned InternLM2-1.8B model:
#   configs/blip2_internlm/caption_coco_eval_internlm2_1.8b.yaml
# CAPTION_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/caption_coco_eval_internlm2_1.8b.yaml "$@"
