#!/usr/bin/env bash
# run_scripts/torchrun.sh CONFIG [--options key=value ...]: torchrun over blip2_internlm.train, or
# blip2_internlm.evaluate when CONFIG sets run.evaluate: True.  CONFIG is a path, or relative to
# configs/ (e.g. blip2_internlm/pretrain_stage2_internlm2_1.8b.yaml).  GPUS (default 2), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT set the launch; PYTHON the interpreter.  Asset and data
# paths are environment variables (docs/plan.md, "Real-size configs").  Outputs go under the
# current directory (run.output_dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [--options key=value ...]" >&2
    exit 2
fi
GIVEN="$1"
shift
CONFIG="$GIVEN"
if [ ! -f "$CONFIG" ]; then
    CONFIG="$ROOT/configs/$GIVEN"
fi
if [ ! -f "$CONFIG" ]; then
    echo "$0: no config file $GIVEN (nor $CONFIG)" >&2
    exit 2
fi
ENTRY=train
if grep -Eq '^[[:space:]]+evaluate:[[:space:]]*(True|true)' "$CONFIG"; then
    ENTRY=evaluate
fi
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node=${GPUS:-2} --nnodes=${NNODES:-1} \
    --node_rank=${NODE_RANK:-0} --master_addr=${MASTER_ADDR:-127.0.0.1} --master_port=${MASTER_PORT:-29500} \
    -m "blip2_internlm.$ENTRY" --cfg-path "$CONFIG" "$@"
