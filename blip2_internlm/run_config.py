"""The ``run:`` section of a LAVIS config: every key it may hold, typed, checked before anything is built.

LAVIS reads run settings one at a time, where they are used: a misspelt key silently falls
back to its default, and a bad value fails only after the model, the datasets and perhaps a
feature cache have been built (its own validator is commented out in ``Config.__init__``).

Here each key belongs to one owner, a dataclass whose fields carry the key's default, kind of
value and meaning (``blip2_internlm.settings``): the runner's loop (``runner.RunnerSettings``),
checkpoints (``checkpoint.CheckpointSettings``), bad samples (``datasets.guard.DataGuardSettings``),
experiment tracking (``tracking.TrackingSettings``),
the feature cache (``feature_cache.FeatureCacheSettings``, the nested ``run.feature_cache``), the
process group (``compat.distributed.DistributedSettings``), and the keys only LAVIS reads
(``OptimizerSettings``, ``EvaluationSettings`` below).  ``validate_run_config`` checks the whole
section against them at once and raises ``RunConfigError`` naming each bad key; the compat fix
``run_config_validated_at_start`` runs it as soon as LAVIS's ``Config`` is built.
``RunSettings.read`` gives the typed section.  docs/run_config.md is generated from these classes
(``python -m blip2_internlm.run_config``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from blip2_internlm.checkpoint import CheckpointSettings
from blip2_internlm.compat.distributed import DistributedSettings
from blip2_internlm.datasets.guard import DataGuardSettings
from blip2_internlm.feature_cache import FeatureCacheSettings
from blip2_internlm.runner import RunnerSettings
from blip2_internlm.settings import (
    Boolean,
    Choice,
    Integer,
    Kind,
    Nullable,
    Number,
    Registered,
    Table,
    Text,
    fields_of,
    markdown_table,
    problems,
    read_settings,
    registered_names,
    setting,
)
from blip2_internlm.tracking import TrackingError, TrackingSettings, check_backends


class RunConfigError(ValueError):
    """One or more bad ``run.*`` settings; ``problems`` holds one sentence per setting."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CaptionMetrics(Kind):
    """What ``tasks.captioning.check_metrics`` accepts: a list, or ``Bleu,CIDEr`` from --options."""

    expected = "a list of caption metric names"

    def accepts(self, value) -> bool:
        return isinstance(value, (str, list))

    def inner_problems(self, key, value) -> list[str]:
        from blip2_internlm.tasks.captioning import check_metrics

        try:
            check_metrics(value)
        except ValueError as error:
            return [str(error)]  # it names the key and the metric
        return []


class CaptionTokenizer(Kind):
    @property
    def expected(self) -> str:
        from blip2_internlm.tasks.captioning import MODES

        return "one of " + ", ".join(repr(m) for m in MODES)

    def accepts(self, value) -> bool:
        from blip2_internlm.tasks.captioning import MODES

        return value in MODES


_INT_0, _INT_1 = Integer(0), Integer(1)


@dataclass(frozen=True)
class OptimizerSettings:
    """The ``run:`` keys of the optimizer and learning-rate schedule (LAVIS reads them)."""

    lr_sched: str | None = setting(
        None,
        Registered("LR scheduler", registered_names("lr_scheduler", "lavis.common.optims")),
        "learning-rate schedule",
        required=True,
    )
    init_lr: float | None = setting(None, Number(0), "learning rate after warm-up", required=True)
    min_lr: float | None = setting(None, Number(0), "learning rate at the end of the decay", required=True)
    warmup_lr: float = setting(-1, Number(cast=False), "learning rate the warm-up starts from; negative: init_lr")
    warmup_steps: int = setting(0, _INT_0, "warm-up iterations in epoch 0")
    lr_decay_rate: float | None = setting(
        None, Nullable(Number(0, lowest_open=True, cast=False)), "per-epoch decay (linear_warmup_step_lr)"
    )
    weight_decay: float | None = setting(None, Number(0), "AdamW weight decay of the weight matrices", required=True)
    beta2: float = setting(0.999, Number(0, 1, cast=False), "AdamW beta2")


@dataclass(frozen=True)
class EvaluationSettings:
    """The ``run:`` keys of generation and evaluation (LAVIS's captioning, VQA and retrieval tasks, and
    this package's); null: the task's own default."""

    num_beams: int | None = setting(None, _INT_1, "beams of the beam search")
    max_len: int | None = setting(None, _INT_1, "longest generated text, in tokens")
    min_len: int | None = setting(None, _INT_0, "shortest generated text, in tokens")
    prompt: str | None = setting(None, Text(empty=True), "VQA prompt, with {} for the question")
    report_metric: bool = setting(True, Boolean(), "score the results")
    inference_method: str | None = setting(
        None, Choice("generate", "rank"), "VQA answers generated or ranked among candidates"
    )
    num_ans_candidates: int | None = setting(None, _INT_1, "answer candidates ranked per question (LAVIS: 128)")
    k_test: int | None = setting(None, _INT_1, "candidates re-ranked per query in retrieval")
    length_sorted_eval: bool = setting(False, Boolean(), "evaluate VQA in question-length order: less padding")
    caption_tokenizer: str | None = setting(
        None, CaptionTokenizer(), "tokenisation of captions for scoring (captioning_offline)"
    )
    caption_metrics: list | str | None = setting(
        None, CaptionMetrics(), "caption metrics computed (captioning_offline)"
    )
    # LAVIS's reading-comprehension VQA (PNP-VQA) tasks
    internal_bsz_fid: int | None = setting(None, _INT_1, "PNP-VQA: batch size of the fusion-in-decoder reader")
    num_captions: int | None = setting(None, _INT_1, "PNP-VQA: captions generated per image")
    num_captions_fid: int | None = setting(None, _INT_1, "PNP-VQA: captions read per question")
    cap_max_length: int | None = setting(None, _INT_1, "PNP-VQA: longest caption")
    cap_min_length: int | None = setting(None, _INT_0, "PNP-VQA: shortest caption")
    top_k: int | None = setting(None, _INT_0, "PNP-VQA: top-k sampling of captions")
    top_p: float | None = setting(None, Number(0, 1, cast=False), "PNP-VQA: nucleus sampling of captions")
    repetition_penalty: float | None = setting(
        None, Number(0, lowest_open=True, cast=False), "PNP-VQA: caption repetition penalty"
    )
    num_patches: int | None = setting(None, _INT_1, "PNP-VQA: image patches sampled per caption")
    block_num: int | None = setting(None, _INT_0, "PNP-VQA: text-encoder block whose attention picks the patches")


@dataclass(frozen=True)
class NestedSettings:
    """The ``run:`` keys that hold a table of their own."""

    feature_cache: FeatureCacheSettings | None = setting(
        None, Nullable(Table(FeatureCacheSettings)), "the frozen-ViT feature cache (docs/feature_cache.md)"
    )


#: The owners of the ``run:`` section's keys, as docs/run_config.md lists them.
RUN_OWNERS = (
    RunnerSettings,
    OptimizerSettings,
    CheckpointSettings,
    DataGuardSettings,
    DistributedSettings,
    EvaluationSettings,
    TrackingSettings,
    NestedSettings,
)

#: Every key a ``run:`` section may hold, with its field (default, kind, doc).
RUN_KEYS = {name: field for owner in RUN_OWNERS for name, field in fields_of(owner).items()}


@dataclass(frozen=True)
class RunSettings:
    """The typed ``run:`` section, by owner."""

    runner: RunnerSettings
    optimizer: OptimizerSettings
    checkpoints: CheckpointSettings
    data: DataGuardSettings
    distributed: DistributedSettings
    evaluation: EvaluationSettings
    tracking: TrackingSettings
    feature_cache: FeatureCacheSettings | None

    @classmethod
    def read(cls, run_cfg) -> RunSettings:
        """The typed section of a validated ``run_cfg`` (a DictConfig or dict)."""
        return cls(
            runner=read_settings(RunnerSettings, run_cfg),
            optimizer=read_settings(OptimizerSettings, run_cfg),
            checkpoints=read_settings(CheckpointSettings, run_cfg),
            data=read_settings(DataGuardSettings, run_cfg),
            distributed=read_settings(DistributedSettings, run_cfg),
            evaluation=read_settings(EvaluationSettings, run_cfg),
            tracking=read_settings(TrackingSettings, run_cfg),
            feature_cache=read_settings(NestedSettings, run_cfg).feature_cache,
        )


def validate_run_config(run_cfg) -> None:
    """Raise ``RunConfigError`` listing every bad or unknown key of ``run_cfg`` (a DictConfig or dict).

    Only what the config itself decides: a config for a GPU machine validates on a laptop
    (the planner reads them there); ``check_device_available`` checks the machine.
    """
    found = problems("run", run_cfg, RUN_OWNERS)
    if found:
        raise RunConfigError(found)


def check_device_available(run_cfg) -> None:
    """Raise ``RunConfigError`` if ``run.device`` (default cuda, as LAVIS) names a CUDA device this machine lacks."""
    import torch

    device = read_settings(RunnerSettings, run_cfg or {}).device
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise RunConfigError(
            [f"run.device = {device!r} but this machine has no CUDA device; pass --options run.device=cpu"]
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RunConfigError([f"run.device = {device!r} but this machine has {torch.cuda.device_count()} CUDA devices"])


def check_tracking_available(run_cfg) -> None:
    """Raise ``RunConfigError`` if a tracker of ``run.report_to`` cannot be used on this machine: its
    package is missing (the message has the pip command), or wandb is online without a login."""
    try:
        check_backends(read_settings(TrackingSettings, run_cfg or {}))
    except TrackingError as error:
        raise RunConfigError(str(error).splitlines()) from None


def markdown() -> str:
    """docs/run_config.md: every key of ``run:``, by owner."""
    parts = [
        "# The `run:` section, key by key",
        "",
        "Generated from the settings classes by `python -m blip2_internlm.run_config > docs/run_config.md`;",
        "a spec checks that this page is current.  Every key is checked when LAVIS's `Config` is built: an",
        "unknown key is an error that suggests the closest known one, a bad value names the key and what is",
        'expected.  A missing or null key takes its default; "(required)" marks the keys LAVIS reads',
        "without one where it uses them.",
    ]
    for owner in RUN_OWNERS:
        doc = " ".join((owner.__doc__ or "").split()).replace("``", "`")
        parts += ["", f"## {owner.__name__} (`{owner.__module__}`)", "", doc, "", markdown_table("", owner)]
    doc = " ".join(FeatureCacheSettings.__doc__.split()).replace("``", "`")
    parts += ["", f"## run.feature_cache: FeatureCacheSettings (`{FeatureCacheSettings.__module__}`)", "", doc, ""]
    parts += [markdown_table("feature_cache.", FeatureCacheSettings)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    # the module's own classes, not this __main__ copy's, so that the page names their module
    from blip2_internlm import run_config

    sys.stdout.write(run_config.markdown())
