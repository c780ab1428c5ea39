"""Build any of this project's models on the ``meta`` device: no weights, no files, no downloads.

``build_on_meta(model_cfg)`` runs the registered class's own ``from_config`` (stage 1's ``blip2``,
``blip2_internlm``, ``blip2_opt_baseline``) with the ``meta`` weight source of
``blip2_internlm.models.builders``: the same builders as a real build, with architectures from
``blip2_internlm.models.architectures`` instead of checkpoints, tokenizer stand-ins, and no
checkpoint loading.

The result has the real module tree, parameter shapes, dtypes and ``requires_grad`` flags, which
is what ``blip2_internlm.plan`` and ``tests/test_real_size_configs.py`` need.  It cannot run a
forward pass (meta tensors have no data).  ``device`` other than ``meta`` builds the same model
with random weights there (the ``random`` source, for memory measurements).
"""

from __future__ import annotations

import inspect
import os

from torch import nn

from blip2_internlm.models.architectures import TokenizerStub, llm_config, qformer_bert_config
from blip2_internlm.models.builders import WeightSource


def build_on_meta(model_cfg, device="meta") -> nn.Module:
    """The model a LAVIS ``model:`` config describes, on ``meta`` (or with random weights on ``device``).

    ``model_cfg`` is the merged model config (the model type's default YAML under the project
    config's ``model:``, as LAVIS's ``Config.build_model_config`` builds it), a DictConfig or a
    plain dict with at least ``arch``.
    """
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import blip2_internlm  # noqa: F401  (compat fixes + registration)

    if not OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.create(dict(model_cfg))
    arch = model_cfg.get("arch")
    model_cls = registry.get_model_class(arch)
    if model_cls is None:
        raise ValueError(f"model.arch = {arch!r} is not a registered LAVIS model")
    if "weights" not in inspect.signature(model_cls.from_config).parameters:
        raise ValueError(f"model.arch = {arch!r} ({model_cls.__name__}) cannot be built without its weights")
    weights = WeightSource("meta") if str(device) == "meta" else WeightSource("random", str(device))
    return model_cls.from_config(model_cfg, weights=weights)


def merged_model_config(cfg_path, options=()):
    """The model config LAVIS's ``Config`` builds from a project config plus ``--options``."""
    from lavis.common.config import Config
    from omegaconf import OmegaConf

    import blip2_internlm  # noqa: F401

    config = OmegaConf.load(os.fspath(cfg_path))
    user = OmegaConf.from_dotlist(list(options))
    model = Config.build_model_config(config, **user)
    return OmegaConf.merge(model, user).model


__all__ = ["build_on_meta", "merged_model_config", "llm_config", "qformer_bert_config", "TokenizerStub"]
