#!/usr/bin/env bash
# Stage-2 pretraining with InternLM2-1.8B from the stage-1 checkpoint:
#   configs/blip2_internlm/pretrain_stage2_internlm2_1.8b.yaml
# STAGE1_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/pretrain_stage2_internlm2_1.8b.yaml "$@"
