"""Weights loading in LAVIS models (``load_checkpoint``, ``load_from_pretrained``): safe, offline, and reported.

A training run's own checkpoints are ``blip2_internlm.checkpoint.CheckpointManager``'s."""

import logging

from blip2_internlm.compat.fixes import fix

logger = logging.getLogger(__name__)


@fix
def safe_model_checkpoint_loading():
    """LAVIS models unpickle checkpoints with bare torch.load, load with strict=False silently, and ignore load_pretrained: False."""
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models.blip2 import Blip2Base

    from blip2_internlm.checkpoint import load_weights, required_prefixes, resolve_checkpoint

    def load_checkpoint(self, url_or_filename):
        path = resolve_checkpoint("model.finetuned", url_or_filename)
        return load_weights(self, path, required_prefixes=required_prefixes(self, finetuned=True))

    def load_from_pretrained(self, url_or_filename, **kwargs):
        path = resolve_checkpoint("model.pretrained", url_or_filename)
        return load_weights(self, path, required_prefixes=required_prefixes(self))

    def load_checkpoint_from_config(self, cfg, **kwargs):
        if cfg.get("load_finetuned", True):
            return self.load_checkpoint(url_or_filename=cfg.get("finetuned", None))
        if cfg.get("load_pretrained", True):
            return self.load_from_pretrained(url_or_filename=cfg.get("pretrained", None), **kwargs)
        logger.info("model.load_finetuned and model.load_pretrained are False: weights stay as initialised.")
        return None

    BaseModel.load_checkpoint = load_checkpoint
    BaseModel.load_checkpoint_from_config = load_checkpoint_from_config
    BaseModel.load_from_pretrained = load_from_pretrained
    Blip2Base.load_from_pretrained = load_from_pretrained
