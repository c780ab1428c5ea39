#!/usr/bin/env bash
# Zero-shot OK-VQA with the stage-2 OPT-2.7B baseline:
#   configs/blip2_opt/okvqa_zeroshot_opt2.7b_eval.yaml
# STAGE2_OPT_CHECKPOINT is required.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_opt/okvqa_zeroshot_opt2.7b_eval.yaml "$@"
