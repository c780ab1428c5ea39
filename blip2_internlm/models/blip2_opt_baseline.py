"""The OPT baseline: ``arch: blip2_opt_baseline``.

The project's headline comparison is InternLM2 vs OPT under identical training, so the
baseline is the same model code with OPT as the frozen LLM (transformers' native
``OPTForCausalLM``, loaded from a local ``facebook/opt-*`` directory), not LAVIS 1.0.2's
``blip2_opt``, whose vendored OPT predates today's ``generate`` and which has no
``predict_answers``.  Only the model types differ.
"""

import os

from lavis.common.registry import registry

from blip2_internlm.models.blip2_internlm import Blip2InternLM
from blip2_internlm.paths import MODEL_CONFIG_DIR


@registry.register_model("blip2_opt_baseline")
class Blip2OPTBaseline(Blip2InternLM):
    PRETRAINED_MODEL_CONFIG_DICT = {
        name: os.path.join(MODEL_CONFIG_DIR, f"blip2_opt_baseline_{name}.yaml")
        for name in ("tiny", "pretrain_opt2.7b", "caption_coco_opt2.7b")
    }
