"""Stage 1 (LAVIS's ``Blip2Qformer``: ITC + ITM + ITG), built from its config.

LAVIS's ``Blip2Qformer`` and ``Blip2ITM`` download bert-base-uncased and eva_vit_g.pth inside their
constructors.  These subclasses take the two as config keys (``qformer_text_model``,
``vit_weights``; see ``blip2_internlm.assets``) through :class:`~blip2_internlm.models.config.Stage1Config`
and build through ``blip2_internlm.models.builders`` with any weight source; LAVIS's registry
names ``blip2``, ``blip2_feature_extractor`` and ``blip2_image_text_matching`` resolve to them
(``blip2_internlm.compat.blip2.stage1_models_built_from_config``).  The loss itself is LAVIS's,
with image-id-aware contrastive targets (``blip2_internlm.models.stage1``).
"""

from __future__ import annotations

from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from blip2_internlm.models.builders import FILES, AssetsFromConfig, WeightSource
from blip2_internlm.models.config import Stage1Config


class _BuiltFromStage1Config(AssetsFromConfig):
    def __init__(self, config: Stage1Config, weights: WeightSource = FILES):
        with weights.building():
            super().__init__(
                **config.lavis_kwargs(),
                qformer_text_model=config.qformer_text_model,
                vit_weights=config.vit_weights,
                weights=weights,
            )

    @classmethod
    def from_config(cls, cfg, weights: WeightSource = FILES):
        model = cls(Stage1Config.from_lavis(cfg), weights)
        if weights.loads_files:
            model.load_checkpoint_from_config(cfg)
        return model


class Blip2Stage1(_BuiltFromStage1Config, Blip2Qformer):
    """``arch: blip2`` / ``blip2_feature_extractor``."""


class Blip2Stage1ITM(_BuiltFromStage1Config, Blip2ITM):
    """``arch: blip2_image_text_matching``."""
