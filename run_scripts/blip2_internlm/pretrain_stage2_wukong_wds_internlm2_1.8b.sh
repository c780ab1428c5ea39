#!/usr/bin/env bash
# Chinese stage-2 pretraining on webdataset shards (Wukong/LAION-style):
#   configs/blip2_internlm/pretrain_stage2_wukong_wds_internlm2_1.8b.yaml
# STAGE1_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/pretrain_stage2_wukong_wds_internlm2_1.8b.yaml "$@"
