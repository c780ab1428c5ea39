"""The one way the tools build a model: ``build_model(arch, model_type, ...)``.

    model = build_model("blip2_internlm", "tiny")                                  # weights from files
    model = build_model(cfg_path="configs/tiny/caption_eval.yaml", checkpoint="checkpoint_0.pth")
    model = build_model(cfg_path="configs/blip2_internlm/pretrain_stage1.yaml", weights="meta")
    model = build_model("blip2_internlm", "tiny", options={"num_query_token": 4}, weights="random")

Inference (``load_model_and_preprocess``, and through it the caption CLI and the app), the
Hugging Face export, the memory planner and the benchmarks all build here, so a model name,
a config file, an option or a checkpoint means the same thing to each of them, and a model that
cannot be built as asked fails the same way: a :class:`ModelBuildError` naming the key or file.

It is LAVIS's ``load_model_and_preprocess`` (the model type's ``model:`` config through the
registered class's own ``from_config``) with:

* ``cfg_path``: a training or evaluation YAML in place of a model type: its ``model:`` section
  over its model type, as LAVIS's ``Config`` merges them, and the eval processors of its first
  dataset;
* ``options``: model-config keys over both, as ``--options model.KEY=VALUE`` in a run (``arch``
  and ``model_type`` among them); a key the model's config does not have is an error naming the
  closest one;
* ``checkpoint``: a stage-2 or fine-tuned file in place of the config's ``pretrained`` /
  ``finetuned``, which must initialise every trainable weight;
* ``weights``: where the numbers come from (``blip2_internlm.models.builders.WeightSource``):
  ``files`` (the weights the config names), ``random`` (the same architecture, randomly
  initialised on ``device``: memory measurements, benchmarks), ``meta`` (shapes, dtypes and
  ``requires_grad`` only; no file but the YAMLs is read: the planner).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

from blip2_internlm.checkpoint import CheckpointError, load_weights, required_prefixes, trainable_keys
from blip2_internlm.models.builders import WeightSource
from blip2_internlm.settings import did_you_mean

DEFAULT_ARCH = "blip2_internlm"
#: The sections of a whole run's ``--options`` that are not the model's.
RUN_SECTIONS = ("run", "datasets")


class ModelBuildError(ValueError):
    """The model cannot be built as asked; the message names the key or the file."""


class ModelOptionError(ModelBuildError):
    """A model option the model's config has no key for, or an ``--options`` pair that is not KEY=VALUE."""


class UnusableCheckpointError(ModelBuildError, CheckpointError):
    """``checkpoint=`` is missing or unreadable, or does not initialise the model's trainable weights.

    A :class:`CheckpointError` too, as ``blip2_internlm.checkpoint`` reports a file it cannot use."""


def build_model(
    arch: str | None = None,
    model_type: str | None = None,
    *,
    cfg_path=None,
    options: Mapping | None = None,
    checkpoint=None,
    weights: str = "files",
    device=None,
    is_eval: bool = True,
) -> torch.nn.Module:
    """The model ``arch`` / ``model_type`` (or ``cfg_path``) and ``options`` describe, from ``weights``.

    Args:
        arch: a registered architecture (``blip2_internlm``, ``blip2_opt_baseline``, ``blip2``, ...);
            ``blip2_internlm`` by default, the config's ``model.arch`` with ``cfg_path``.
        model_type: a model type of ``arch`` (``tiny``, ``pretrain_internlm2_1.8b``, ...); with
            ``cfg_path`` it overrides the config's ``model.model_type``.
        cfg_path: a LAVIS training/evaluation YAML to take the model section from.
        options: model-config keys and values over the model type's and the config's
            (:func:`parse_model_options` turns ``--options`` pairs into them).
        checkpoint: a stage-2 or fine-tuned ``.pth`` / ``.safetensors``, read without unpickling
            code; it must give every trainable weight (Q-Former, ``query_tokens``, ``llm_proj``,
            ...).  What it loaded is kept as ``model.checkpoint_report``.
        weights: ``files``, ``random`` or ``meta`` (see the module's docstring).
        device: where the model goes: the CPU by default, ``meta`` for a meta build.
        is_eval: put the model in eval mode.
    """
    config = merged_model_config(arch, model_type, cfg_path=cfg_path, options=options)
    return config.build(checkpoint=checkpoint, weights=weights, device=device, is_eval=is_eval)


@dataclass(frozen=True)
class MergedModelConfig:
    """What a model is built from: its registered class, its merged ``model:`` config, the
    ``preprocess:`` config of its processors, and the options applied (they decide the CPU rule)."""

    model_class: type
    model: DictConfig
    preprocess: DictConfig
    options: Mapping

    def build(self, *, checkpoint=None, weights: str = "files", device=None, is_eval: bool = True):
        """The model, as :func:`build_model` documents its arguments."""
        source = _weight_source(weights, device)
        device = torch.device(device) if device is not None else source.target_device
        model_cfg = copy.deepcopy(self.model)
        if source.loads_files:
            self._run_fp16_vit_in_fp32_on_cpu(model_cfg, device)
            if checkpoint is not None:  # the checkpoint is the weight source: nothing else is loaded before it
                model_cfg.load_finetuned = False
                model_cfg.load_pretrained = False
            model = self.model_class.from_config(model_cfg)
        else:
            if "weights" not in inspect.signature(self.model_class.from_config).parameters:
                raise ModelBuildError(
                    f"model.arch = {model_cfg.arch!r} ({self.model_class.__name__}) cannot be built without its "
                    f"weights (weights={weights!r})"
                )
            if checkpoint is not None and source.kind == "meta":
                raise ModelBuildError(f"checkpoint {os.fspath(checkpoint)}: a meta build has no data to load it into")
            model = self.model_class.from_config(model_cfg, weights=source)
        if checkpoint is not None:
            model.checkpoint_report = _load_checkpoint(model, checkpoint)
        if is_eval:
            model.eval()
        return model.to(device)

    def _run_fp16_vit_in_fp32_on_cpu(self, model_cfg, device: torch.device) -> None:
        """LAVIS's fp16 ViT keeps fp32 LayerNorms and runs only under fp16 autocast, which the model types'
        autocast_dtype (fp16 / auto) never turns on on a CPU: there it is built in fp32, unless the
        options ask for a precision.  The rest keeps its configured precision (LAVIS casts the whole
        model, a bf16 LLM included, to fp32).  Random and meta builds stand for a configured run
        elsewhere (the planner's, the benchmarks') and keep the config as it is."""
        if device.type == "cpu" and model_cfg.get("vit_precision") == "fp16" and "vit_precision" not in self.options:
            model_cfg.vit_precision = "fp32"


def merged_model_config(
    arch: str | None = None, model_type: str | None = None, *, cfg_path=None, options: Mapping | None = None
) -> MergedModelConfig:
    """The config :func:`build_model` builds from, every name and option checked; nothing is built."""
    options = dict(options or {})
    model_type = _model_type_of(model_type, options)
    if cfg_path is not None:
        project = _project_config(cfg_path, arch)
    else:
        project = OmegaConf.create({"model": {"arch": arch or DEFAULT_ARCH}})
    section = project.model
    model_type = model_type or section.get("model_type")
    if model_type is None:
        where = f"{cfg_path}: the model section has no model_type; pass" if cfg_path else "name"
        raise ModelBuildError(f"{where} a model type of {section.arch} (one of {_model_types(section.arch)})")
    if model_type not in _model_class(section.arch).PRETRAINED_MODEL_CONFIG_DICT:
        types = _model_types(section.arch)
        raise ModelBuildError(f"{section.arch} has no model type {model_type!r}; model types: {types}")
    # LAVIS's Config reads the model type named here, the config's section over it
    merged = Config.build_model_config(project, **{"model.model_type": model_type})
    merged.model.model_type = model_type
    # as in a run, an option may name another arch: the class built, over the model type's defaults
    model_class = _model_class(options.get("arch", section.arch))
    known = _known_model_keys(model_class, merged.model)
    for key, value in options.items():
        if key not in known:
            hint = _closest(key, known, "known keys")
            raise ModelOptionError(f"model option {key!r} is not a key of the {merged.model.arch} model config{hint}")
        merged.model[key] = value
    preprocess = merged.get("preprocess") or OmegaConf.create()
    eval_processors = _dataset_eval_processors(project) if cfg_path is not None else {}
    if eval_processors:
        preprocess = OmegaConf.merge(preprocess, eval_processors)
    return MergedModelConfig(model_class, merged.model, preprocess, options)


def parse_model_options(pairs: Sequence[str], *, run_sections: bool = False) -> dict:
    """Model options from ``--options`` pairs: ``model.KEY=VALUE`` as train/evaluate take them, or ``KEY=VALUE``,
    the values typed as LAVIS's ``Config`` types them.

    ``run_sections``: the pairs are a whole run's (the planner's, the export's), whose ``run.`` and
    ``datasets.`` keys are not the model's and are left out here; otherwise they are model keys (and errors).
    """
    options = {}
    for pair in pairs:
        key, equals, _ = pair.partition("=")
        if not equals or not key:
            raise ModelOptionError(f"--options {pair!r}: expected KEY=VALUE, e.g. model.llm_model=/path/to/llm")
        if run_sections and key.split(".", 1)[0] in RUN_SECTIONS:
            continue
        options[key.removeprefix("model.")] = OmegaConf.select(OmegaConf.from_dotlist([pair]), key)
    return options


def _weight_source(weights: str, device) -> WeightSource:
    try:
        if weights == "files":
            return WeightSource("files", str(torch.device(device or "cpu")))
        return WeightSource(weights, None if device is None else str(torch.device(device)))
    except ValueError as err:
        raise ModelBuildError(f"weights={weights!r}, device={device!r}: {err}") from err


def _model_type_of(model_type: str | None, options: dict) -> str | None:
    """The ``model_type`` argument or option (``--options model.model_type=T``): it picks the defaults merged."""
    from_options = options.pop("model_type", None)
    if model_type is not None and from_options is not None and from_options != model_type:
        raise ModelOptionError(f"model_type {model_type!r} and the option model_type={from_options!r} disagree")
    return model_type or from_options


def _model_class(arch: str):
    model_class = registry.get_model_class(arch)
    if model_class is None:
        hint = _closest(arch, registry.mapping["model_name_mapping"], "registered")
        raise ModelBuildError(f"model.arch {arch!r} is not a registered model{hint}")
    return model_class


def _model_types(arch: str) -> list[str]:
    return sorted(_model_class(arch).PRETRAINED_MODEL_CONFIG_DICT)


def _closest(name, known, listed_as: str) -> str:
    """``; did you mean 'x'?`` for a near miss, else ``; <listed_as>: [every known name]``."""
    close = did_you_mean(name, known)
    return f"; did you mean {close!r}?" if close else f"; {listed_as}: {sorted(known)}"


def _known_model_keys(model_class, model_cfg) -> set[str]:
    """The keys ``model_class.from_config`` reads: those of its typed config (``config_class``, as this package's
    models declare), else those of its model type's config (LAVIS's own models read theirs with ``cfg.get``)."""
    config_class = getattr(model_class, "config_class", None)
    if config_class is not None and hasattr(config_class, "keys"):
        return set(config_class.keys())
    return set(model_cfg.keys())


def _project_config(cfg_path, arch: str | None) -> DictConfig:
    """``cfg_path`` loaded, with a model section naming a registered arch (``arch``, if given)."""
    if not os.path.isfile(cfg_path):
        raise ModelBuildError(f"cfg_path {cfg_path}: no such file")
    project = OmegaConf.load(cfg_path)
    section = project.get("model")
    if section is None or "arch" not in section:
        raise ModelBuildError(f"{cfg_path}: no model section with an arch")
    if arch is not None and arch != section.arch:
        raise ModelBuildError(f"{cfg_path} builds model.arch {section.arch!r}, not {arch!r}")
    _model_class(section.arch)
    return project


def _dataset_eval_processors(project) -> dict:
    """The eval processors of the config's first dataset that has them, over its builder's defaults."""
    if not project.get("datasets"):
        return {}
    datasets = Config.build_dataset_config(project).datasets
    for dataset in datasets.values():
        found = {
            kind: {"eval": dataset[kind]["eval"]}
            for kind in ("vis_processor", "text_processor")
            if dataset.get(kind) and dataset[kind].get("eval")
        }
        if found:
            return found
    return {}


def _load_checkpoint(model: torch.nn.Module, checkpoint):
    """Load ``checkpoint`` into ``model``; every trainable weight and the Q-Former must come from it."""
    path = os.fspath(checkpoint)
    try:
        report = load_weights(model, path, required_prefixes=required_prefixes(model))
    except CheckpointError as err:
        raise UnusableCheckpointError(str(err)) from err
    # a stage-1 checkpoint passes the Q-Former check but would leave llm_proj random
    missing = sorted(set(trainable_keys(model)) & set(report.missing))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... (+{len(missing) - 5})" if len(missing) > 5 else "")
        raise UnusableCheckpointError(
            f"{path} does not initialise {len(missing)} trainable weights of {type(model).__name__} ({shown}); "
            "pass a stage-2 or fine-tuned checkpoint"
        )
    return report
