#!/usr/bin/env bash
# AI Challenger caption evaluation:
#   configs/blip2_internlm/caption_aic_zh_eval_internlm2_1.8b.yaml
# CAPTION_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/caption_aic_zh_eval_internlm2_1.8b.yaml "$@"
