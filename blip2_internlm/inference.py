"""Your own weights in one call: a LAVIS-style ``load_model_and_preprocess`` that also takes a checkpoint.

    from blip2_internlm import load_model_and_preprocess

    model, vis_processors, txt_processors = load_model_and_preprocess(
        "blip2_internlm", "pretrain_internlm2_1.8b", device="cuda",
        checkpoint="output/stage2/<job>/checkpoint_best.pth",
        llm_model="/models/internlm2-1_8b", vit_weights="/models/eva_vit_g.pth")

    # or the model section and eval processors of a training/evaluation YAML
    model, vis_processors, txt_processors = load_model_and_preprocess(
        cfg_path="configs/tiny/caption_eval.yaml", checkpoint="output/tiny/stage2/<job>/checkpoint_0.pth")

It is LAVIS's ``lavis.models.load_model_and_preprocess`` (the model type's ``model:`` config
through the model's own ``from_config``, its ``preprocess:`` through ``load_preprocess``) with
three additions: ``checkpoint`` (a stage-2 or fine-tuned ``.pth`` or ``.safetensors``),
``model_options`` (keys of the model config, as ``--options model.<key>=...`` in training), and
``cfg_path`` (a training or evaluation YAML instead of a model type: its ``model:`` section over
its model type, the eval processors of its first dataset).

Two deliberate differences from LAVIS's function: on the CPU the model keeps its configured
precisions except an fp16 ViT, which becomes fp32 (LAVIS casts the whole model, a bf16 LLM
included, to fp32; an fp16 ViT runs only under autocast, which the CPU does not get); and
``is_eval`` defaults to True.
"""

from __future__ import annotations

import difflib
import os

import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf

from blip2_internlm.checkpoint import CheckpointError, load_weights, required_prefixes, trainable_keys

DEFAULT_ARCH = "blip2_internlm"


class ModelOptionError(ValueError):
    """A model option (``model_options`` / ``--options``) that the model's config has no key for."""


def parse_model_options(pairs) -> dict:
    """``KEY=VALUE`` command-line options (``model.KEY=VALUE`` as train/evaluate take them) to model
    options, values typed as YAML as LAVIS reads ``--options``."""
    import yaml

    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ModelOptionError(f"--options {pair!r}: expected KEY=VALUE, e.g. model.llm_model=/path/to/llm")
        options[key.removeprefix("model.")] = yaml.safe_load(value)
    return options


def load_model_and_preprocess(
    name: str | None = None,
    model_type: str | None = None,
    is_eval: bool = True,
    device="cpu",
    checkpoint=None,
    *,
    cfg_path=None,
    **model_options,
):
    """``(model, vis_processors, txt_processors)`` as LAVIS's function of the same name returns them.

    Args:
        name: the registered architecture (``blip2_internlm``, ``blip2_opt_baseline``, ...);
            with ``cfg_path`` it defaults to the config's ``model.arch``.
        model_type: a model type of ``name`` (``tiny``, ``pretrain_internlm2_1.8b``, ...); with
            ``cfg_path`` it overrides the config's ``model.model_type``.
        is_eval: put the model in eval mode.
        device: where the model goes (``"cpu"``, ``"cuda"``, a ``torch.device``).
        checkpoint: a stage-2 or fine-tuned checkpoint.  Read without unpickling code
            (``blip2_internlm.checkpoint``); it must provide every trainable weight of the model
            (Q-Former, ``query_tokens``, ``llm_proj``, ...), else it is a ``CheckpointError``
            naming the file.  It replaces the config's ``pretrained`` / ``finetuned``.  What was
            loaded is logged and kept as ``model.checkpoint_report`` (a ``LoadReport``).
        cfg_path: a LAVIS training/evaluation YAML to take the model and processors from.
        **model_options: model-config keys overriding the model type's, e.g.
            ``llm_model="/path/to/internlm2-1_8b"``, ``vit_weights=...``, ``qformer_text_model=...``,
            ``prompt=...``.  A key the model's config does not have is a ``ModelOptionError``.
    """
    model_cls, model_cfg, preprocess_cfg = model_config(name, model_type, cfg_path, model_options)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and model_cfg.get("vit_precision") == "fp16" and "vit_precision" not in model_options:
        # LAVIS's fp16 ViT keeps fp32 LayerNorms and runs only under fp16 autocast, which the model
        # types' autocast_dtype (fp16 / auto) never turns on on a CPU
        model_cfg.vit_precision = "fp32"
    if checkpoint is not None:
        # the checkpoint is the weight source: nothing else is loaded before it
        model_cfg.load_finetuned = False
        model_cfg.load_pretrained = False
    model = model_cls.from_config(model_cfg)
    if checkpoint is not None:
        model.checkpoint_report = load_checkpoint(model, checkpoint)
    if is_eval:
        model.eval()
    vis_processors, txt_processors = load_preprocess(preprocess_cfg)
    return model.to(device), vis_processors, txt_processors


def load_checkpoint(model: torch.nn.Module, checkpoint):
    """Load ``checkpoint`` into ``model``; every trainable weight and the Q-Former must come from it."""
    path = os.fspath(checkpoint)
    report = load_weights(model, path, required_prefixes=required_prefixes(model))
    # a stage-1 checkpoint passes the Q-Former check but would leave llm_proj random
    missing = sorted(set(trainable_keys(model)) & set(report.missing))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... (+{len(missing) - 5})" if len(missing) > 5 else "")
        raise CheckpointError(
            f"{path} does not initialise {len(missing)} trainable weights of {type(model).__name__} ({shown}); "
            "pass a stage-2 or fine-tuned checkpoint"
        )
    return report


def model_config(name, model_type, cfg_path, model_options: dict):
    """``(model class, model config, preprocess config)`` after ``cfg_path`` and ``model_options``."""
    if cfg_path is not None:
        model_cls, merged = _config_from_yaml(name, model_type, cfg_path)
    else:
        model_cls = _model_class(name or DEFAULT_ARCH)
        if model_type is None:
            types = sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)
            raise ValueError(f"name a model type of {name or DEFAULT_ARCH} (one of {types}), or pass cfg_path")
        merged = OmegaConf.load(_model_type_path(model_cls, name or DEFAULT_ARCH, model_type))
        merged.model.model_type = model_type
    model_cfg = merged.model
    known = known_model_keys(model_cls, model_cfg)
    for key, value in model_options.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"
            raise ModelOptionError(f"model option {key!r} is not a key of the {model_cfg.arch} model config{hint}")
        model_cfg[key] = value
    return model_cls, model_cfg, merged.get("preprocess") or OmegaConf.create()


def known_model_keys(model_cls, model_cfg) -> set[str]:
    """The keys ``model_cls.from_config`` reads: those of its typed config (``config_class``, as this package's
    models declare), else those of its model type's config (LAVIS's own models read theirs with ``cfg.get``)."""
    config_class = getattr(model_cls, "config_class", None)
    if config_class is not None and hasattr(config_class, "keys"):
        return set(config_class.keys())
    return set(model_cfg.keys())


def _model_class(name: str):
    model_cls = registry.get_model_class(name)
    if model_cls is None:
        registered = sorted(registry.mapping["model_name_mapping"])
        raise ValueError(f"model {name!r} is not registered; registered: {registered}")
    return model_cls


def _model_type_path(model_cls, name: str, model_type: str) -> str:
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        types = sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)
        raise ValueError(f"{name} has no model type {model_type!r}; model types: {types}")
    return model_cls.default_config_path(model_type)


def _config_from_yaml(name, model_type, cfg_path):
    """The ``model:`` section of ``cfg_path`` over its model type (as LAVIS's ``Config`` merges
    them), and ``preprocess:`` with the eval processors of the config's first dataset that has them."""
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"cfg_path {cfg_path}: no such file")
    cfg = OmegaConf.load(cfg_path)
    section = cfg.get("model")
    if section is None or "arch" not in section:
        raise ValueError(f"{cfg_path}: no model section with an arch")
    if name is not None and name != section.arch:
        raise ValueError(f"{cfg_path} builds model.arch {section.arch!r}, not {name!r}")
    model_cls = _model_class(section.arch)
    model_type = model_type or section.get("model_type")
    if model_type is None:
        raise ValueError(f"{cfg_path}: model section has no model_type; pass model_type")
    _model_type_path(model_cls, section.arch, model_type)
    merged = Config.build_model_config(cfg, **{"model.model_type": model_type})
    merged.model.model_type = model_type
    eval_processors = _dataset_eval_processors(cfg)
    if eval_processors:
        merged.preprocess = OmegaConf.merge(merged.get("preprocess") or {}, eval_processors)
    return model_cls, merged


def _dataset_eval_processors(cfg) -> dict:
    if not cfg.get("datasets"):
        return {}
    datasets = Config.build_dataset_config(cfg).datasets  # the builders' defaults under the config's values
    for dataset in datasets.values():
        found = {
            kind: {"eval": dataset[kind]["eval"]}
            for kind in ("vis_processor", "text_processor")
            if dataset.get(kind) and dataset[kind].get("eval")
        }
        if found:
            return found
    return {}
