#!/usr/bin/env bash
# COCO caption fine-tuning of the stage-2 OPT-2.7B baseline:
#   configs/blip2_opt/caption_coco_ft_opt2.7b.yaml
# STAGE2_OPT_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_opt/caption_coco_ft_opt2.7b.yaml "$@"
