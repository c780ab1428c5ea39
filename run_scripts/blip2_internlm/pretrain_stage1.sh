#!/usr/bin/env bash
# Stage-1 pretraining (LAVIS's blip2 Q-Former, COCO + VG), shared by the InternLM2 and OPT runs:
#   configs/blip2_internlm/pretrain_stage1.yaml
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/pretrain_stage1.yaml "$@"
