#!/usr/bin/env bash
# MMBench-CN with the instruction-tuned InternLM2-chat-1.8B model:
#   configs/blip2_internlm/eval_mmbench_cn_instruct_internlm2_chat_1.8b.yaml
# INSTRUCT_CHECKPOINT is required; MMBENCH_ROOT is the folder of the benchmark's TSV files.
# Launch settings and arguments: see run_scripts/torchrun.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../torchrun.sh" blip2_internlm/eval_mmbench_cn_instruct_internlm2_chat_1.8b.yaml "$@"
