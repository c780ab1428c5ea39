#!/usr/bin/env bash
# Stage-1 pretraining for the OPT baseline: the shared stage-1 config (one stage-1 checkpoint serves both LLMs):
#   configs/blip2_internlm/pretrain_stage1.yaml
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/pretrain_stage1.yaml "$@"
