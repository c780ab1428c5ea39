#!/usr/bin/env bash
# CCBench (Chinese culture, with answers) with the stage-2 InternLM2-1.8B model:
#   configs/blip2_internlm/eval_ccbench_internlm2_1.8b.yaml
# STAGE2_CHECKPOINT is required; MMBENCH_ROOT is the folder of the benchmark's TSV files.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/eval_ccbench_internlm2_1.8b.yaml "$@"
