#!/usr/bin/env bash
# Zero-shot GQA (balanced test-dev) with the stage-2 InternLM2-1.8B model:
#   configs/blip2_internlm/gqa_zeroshot_internlm2_1.8b_eval.yaml
# STAGE2_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/gqa_zeroshot_internlm2_1.8b_eval.yaml "$@"
