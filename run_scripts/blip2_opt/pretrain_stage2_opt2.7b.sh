#!/usr/bin/env bash
# Stage-2 pretraining of the OPT-2.7B baseline from the stage-1 checkpoint:
#   configs/blip2_opt/pretrain_stage2_opt2.7b.yaml
# STAGE1_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_opt/pretrain_stage2_opt2.7b.yaml "$@"
