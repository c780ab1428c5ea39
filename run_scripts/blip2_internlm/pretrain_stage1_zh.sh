#!/usr/bin/env bash
# Chinese stage-1 pretraining (LAVIS's blip2 Q-Former from bert-base-chinese, COCO-CN + AI Challenger):
#   configs/blip2_internlm/pretrain_stage1_zh.yaml
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/pretrain_stage1_zh.yaml "$@"
