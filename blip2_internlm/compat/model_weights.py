"""Checkpoint loading in LAVIS models and runners: safe, offline, and reported."""

import logging

from blip2_internlm.compat.fixes import fix

logger = logging.getLogger(__name__)


def resolve_checkpoint(key: str, url_or_path) -> str:
    """A local checkpoint file for config ``key``; URLs only with downloads enabled."""
    from lavis.common.utils import is_url

    from blip2_internlm.assets import AssetMissingError, downloads_allowed, resolve_file

    if not url_or_path:
        raise AssetMissingError(key, url_or_path, "no checkpoint given", "Set it to a local checkpoint file.")
    if is_url(str(url_or_path)):
        if not downloads_allowed():
            raise AssetMissingError(
                key,
                url_or_path,
                "a URL, and downloads are disabled",
                "Download the file yourself and set the key to its local path, or set "
                "BLIP2_INTERNLM_ALLOW_DOWNLOADS=1 on a machine with network.",
            )
        from lavis.common.dist_utils import download_cached_file

        return download_cached_file(str(url_or_path), check_hash=False, progress=True)
    return str(resolve_file(key, url_or_path, "Set it to an existing checkpoint file."))


def required_prefixes(model) -> tuple:
    """Keys a pretrained/finetuned BLIP-2 checkpoint must provide: the Q-Former and its queries."""
    return tuple(
        getattr(
            model, "checkpoint_required_prefixes", ("Qformer.", "query_tokens") if hasattr(model, "Qformer") else ()
        )
    )


@fix
def safe_model_checkpoint_loading():
    """LAVIS models unpickle checkpoints with bare torch.load, load with strict=False silently, and ignore load_pretrained: False."""
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models.blip2 import Blip2Base

    from blip2_internlm.checkpoint import load_weights

    def load_checkpoint(self, url_or_filename):
        path = resolve_checkpoint("model.finetuned", url_or_filename)
        return load_weights(self, path, required_prefixes=required_prefixes(self))

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


def trainable_keys(model) -> tuple:
    return tuple(name for name, param in model.named_parameters() if param.requires_grad)


def restore_training_state(runner, url_or_filename, checkpoint: dict | None = None) -> tuple[str, dict]:
    """Load a runner checkpoint's weights, optimizer and scaler into ``runner``, safely; returns
    (path, checkpoint) for what else the runner keeps in it.  ``checkpoint``: already read."""
    from blip2_internlm.checkpoint import load_checkpoint_file, load_weights, state_dict_of

    path = resolve_checkpoint("run.resume_ckpt_path", url_or_filename)
    if checkpoint is None:
        allow_unsafe = runner.config.run_cfg.get("allow_unsafe_checkpoints", None)
        checkpoint = load_checkpoint_file(path, map_location=runner.device, allow_unsafe=allow_unsafe)
    model = runner.unwrap_dist_model(runner.model)
    # every trainable parameter must come back, or training would silently restart it
    load_weights(model, path, required_prefixes=trainable_keys(model), state_dict=state_dict_of(checkpoint, path))
    runner.optimizer.load_state_dict(checkpoint["optimizer"])
    if runner.scaler and checkpoint.get("scaler"):
        runner.scaler.load_state_dict(checkpoint["scaler"])
    return path, checkpoint


@fix
def safe_runner_checkpoint_loading():
    """RunnerBase resumes with bare torch.load and a strict load that fails on checkpoints it saved itself (frozen weights are not saved)."""
    import os

    from lavis.runners.runner_base import RunnerBase

    from blip2_internlm.checkpoint import load_weights

    def load_resume_state(self, url_or_filename):
        path, checkpoint = restore_training_state(self, url_or_filename)
        self.start_epoch = checkpoint["epoch"] + 1
        logger.info("Resume checkpoint from %s", path)

    def reload_best_model(self, model):
        path = os.path.join(self.output_dir, "checkpoint_best.pth")
        load_weights(model, path, required_prefixes=trainable_keys(model))
        return model

    RunnerBase._load_checkpoint = load_resume_state
    RunnerBase._reload_best_model = reload_best_model
