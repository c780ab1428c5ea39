#!/usr/bin/env bash
# Instruction tuning (LoRA on the LLM) on LLaVA-Instruct-150K from a stage-2 checkpoint:
#   configs/blip2_internlm/instruct_llava_internlm2_1.8b.yaml
# STAGE2_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/instruct_llava_internlm2_1.8b.yaml "$@"
