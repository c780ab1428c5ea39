"""Models and model types this package adds to LAVIS's registry."""

import os

from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from blip2_internlm.paths import MODEL_CONFIG_DIR

# LAVIS's stage-1 model at test size; absolute, so it resolves from any working directory
Blip2Qformer.PRETRAINED_MODEL_CONFIG_DICT.setdefault("tiny", os.path.join(MODEL_CONFIG_DIR, "blip2_qformer_tiny.yaml"))

from blip2_internlm.models.blip2_internlm import Blip2InternLM  # noqa: E402,F401  (registers blip2_internlm)
from blip2_internlm.models.blip2_internlm_instruct import Blip2InternLMInstruct  # noqa: E402,F401  (registers blip2_internlm_instruct)
from blip2_internlm.models.blip2_opt_baseline import Blip2OPTBaseline  # noqa: E402,F401  (registers blip2_opt_baseline)
