"""The ``run:`` section of a LAVIS config: every key it may hold, checked before anything is built.

LAVIS reads run settings one at a time, where they are used: a misspelt key silently falls
back to its default, and a bad value fails only after the model, the datasets and perhaps a
feature cache have been built (its own validator is commented out in ``Config.__init__``).
``validate_run_config`` checks the whole section against ``RUN_KEYS`` at once and raises
``RunConfigError`` naming the key, the value and what is expected; the compat fix
``run_config_validated_at_start`` runs it as soon as LAVIS's ``Config`` is built.

Numbers follow their readers: a key that LAVIS (or this package) reads through ``float()``
or ``int()`` accepts what those accept (``init_lr: "3e-3"``, ``max_iters: 2e4``); a key used
as it is (``batch_size_train``, ``warmup_lr``) must already be a number.  A plugin with run
settings of its own adds them to ``RUN_KEYS``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class RunConfigError(ValueError):
    """One or more bad ``run.*`` settings; ``problems`` holds one sentence per setting."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- kinds of value ------------------------------------------------------------------------


class Kind:
    """What a setting's value must be: ``accepts`` its shape, ``expected`` in words; a mapping's
    entries are checked one by one (``inner_problems``), so each bad entry is named."""

    expected = ""

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def inner_problems(self, key: str, value) -> list[str]:
        return []

    def problems(self, key: str, value) -> list[str]:
        if not self.accepts(value):
            return [f"{key} = {value!r}: expected {self.expected}"]
        return self.inner_problems(key, value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(lowest, highest, lowest_open: bool) -> str:
    if lowest is not None and highest is not None:
        return f" in {'(' if lowest_open else '['}{lowest}, {highest}]"
    if lowest is not None:
        return f" {'>' if lowest_open else '>='} {lowest}"
    return ""


class Integer(Kind):
    """``cast``: the reader calls ``int()``, so ``2e4`` (a float to YAML) and ``"8"`` are fine."""

    def __init__(self, lowest=None, cast=False):
        self.lowest, self.cast = lowest, cast
        self.expected = "an integer" + _bounds(lowest, None, False)

    def accepts(self, value) -> bool:
        if self.cast and _is_number(value) and float(value).is_integer():
            value = int(value)
        elif self.cast and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                return False
        return _is_int(value) and (self.lowest is None or value >= self.lowest)


class Number(Kind):
    """``cast``: the reader calls ``float()``, so a quoted ``"3e-3"`` is fine, as in LAVIS."""

    def __init__(self, lowest=None, highest=None, lowest_open=False, cast=True):
        self.lowest, self.highest, self.lowest_open, self.cast = lowest, highest, lowest_open, cast
        self.expected = "a number" + _bounds(lowest, highest, lowest_open)
        if not cast:
            self.expected += ", unquoted (it is used without float())"

    def accepts(self, value) -> bool:
        if self.cast and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        if not _is_number(value):
            return False
        if self.lowest is not None and (value <= self.lowest if self.lowest_open else value < self.lowest):
            return False
        return self.highest is None or value <= self.highest


class Boolean(Kind):
    # a quoted "false" is truthy wherever LAVIS tests the value, so strings are refused
    expected = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


def _yaml(value) -> str:
    """``value`` as a config spells it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else repr(value)


class Choice(Kind):
    def __init__(self, *options):
        self.options = options
        self.expected = "one of " + ", ".join(_yaml(o) for o in options)

    def accepts(self, value) -> bool:
        # type-checked: False == 0 and True == 1 would let a number through
        return any(value == o and type(value) is type(o) for o in self.options)


class Text(Kind):
    def __init__(self, empty=False):
        self.empty = empty
        self.expected = "a string" if empty else "a non-empty string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (self.empty or value != "")


class Splits(Kind):
    # a bare string would be iterated character by character
    expected = "a list of split names, e.g. [train]"

    def accepts(self, value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


class Device(Kind):
    expected = "'cpu', 'cuda' or 'cuda:N'"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None


class Registered(Kind):
    """A name in LAVIS's registry; ``what`` names the kind of thing in messages."""

    def __init__(self, what: str, names: Callable[[], list[str]]):
        self.what, self.names = what, names

    @property
    def expected(self) -> str:
        return f"a registered LAVIS {self.what}: one of {', '.join(sorted(self.names()))}"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.names()


class CheckpointFile(Kind):
    """A local file that exists, or a URL (fetched, if allowed, when the run loads it)."""

    expected = "an existing checkpoint file or a URL"

    def accepts(self, value) -> bool:
        from lavis.common.utils import is_url

        return isinstance(value, str) and (is_url(value) or Path(value).expanduser().is_file())


class Nullable(Kind):
    """``null`` or ``kind``."""

    def __init__(self, kind: Kind):
        self.kind = kind

    @property
    def expected(self) -> str:
        return f"null or {self.kind.expected}"

    def accepts(self, value) -> bool:
        return value is None or self.kind.accepts(value)

    def inner_problems(self, key, value) -> list[str]:
        return [] if value is None else self.kind.inner_problems(key, value)


class Unsupported(Kind):
    """A key LAVIS reads but cannot honour: any value but null is an error saying why."""

    expected = "null"

    def __init__(self, reason: str):
        self.reason = reason

    def accepts(self, value) -> bool:
        return value is None

    def problems(self, key: str, value) -> list[str]:
        return [] if value is None else [f"{key} = {value!r}: {self.reason}"]


class Table(Kind):
    """A mapping whose keys are settings of their own (``run.feature_cache``)."""

    def __init__(self, settings: Callable[[], dict[str, Setting]]):
        self.settings = settings

    @property
    def expected(self) -> str:
        return f"a mapping with keys among {', '.join(sorted(self.settings()))}"

    def accepts(self, value) -> bool:
        return isinstance(value, dict)

    def inner_problems(self, key, value) -> list[str]:
        return table_problems(key, value, self.settings())


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


# --- the table -----------------------------------------------------------------------------


class Setting(NamedTuple):
    kind: Kind
    meaning: str


def _registered(what: str, module: str) -> Callable[[], list[str]]:
    """Names LAVIS's registry holds for ``what`` once ``module``, whose import registers them, ran."""

    def names():
        import importlib

        from lavis.common.registry import registry

        importlib.import_module(module)
        return list(registry.mapping[f"{what}_name_mapping"])

    return names


def _feature_cache_settings() -> dict[str, Setting]:
    from blip2_internlm.feature_cache import STORE_DTYPES

    return {
        "enabled": Setting(Boolean(), "build and read the frozen-ViT feature cache (default false)"),
        "dir": Setting(Nullable(Text()), "where the stores live (default <cache dir>/features)"),
        "views": Setting(Integer(1, cast=True), "augmented views cached per training image (default 1)"),
        "dtype": Setting(Choice(*STORE_DTYPES), "on-disk dtype of the features (default fp16)"),
        "splits": Setting(Splits(), "splits to cache (default [train, val, test])"),
        "seed": Setting(Integer(0, cast=True), "seed of the augmentations drawn for the views (default 0)"),
        "batch_size": Setting(Nullable(Integer(1, cast=True)), "batch size of the build (default batch_size_eval)"),
        "num_workers": Setting(Nullable(Integer(0, cast=True)), "loader workers of the build (default 0)"),
    }


_INT_1 = Integer(1)
_INT_0 = Integer(0)

#: Every key a ``run:`` section may hold: its kind of value and what it means.
RUN_KEYS: dict[str, Setting] = {
    # what runs
    "task": Setting(Registered("task", _registered("task", "lavis.tasks")), "the LAVIS task (required)"),
    "runner": Setting(
        Registered("runner", _registered("runner", "lavis.runners")),
        "epoch-based runner_base (default) or iteration-based runner_iter",
    ),
    "evaluate": Setting(Boolean(), "evaluate only, no training"),
    "device": Setting(Device(), "where the model runs"),
    "amp": Setting(Boolean(), "mixed precision on CUDA (autocast, GradScaler)"),
    "seed": Setting(Integer(0), "random seed; each rank adds its rank"),  # LAVIS's train.py adds it unconverted
    "output_dir": Setting(Text(), "directory of the job directories (relative to the working directory)"),
    # schedule and optimiser
    "max_epoch": Setting(Integer(1, cast=True), "training epochs (runner_base)"),
    "max_iters": Setting(Integer(1, cast=True), "training iterations (runner_iter)"),
    "iters_per_inner_epoch": Setting(Integer(1, cast=True), "iterations between validations/checkpoints (runner_iter)"),
    "lr_sched": Setting(
        Registered("LR scheduler", _registered("lr_scheduler", "lavis.common.optims")), "learning-rate schedule"
    ),
    "init_lr": Setting(Number(0), "learning rate after warm-up"),
    "min_lr": Setting(Number(0), "learning rate at the end of the decay"),
    "warmup_lr": Setting(Number(cast=False), "learning rate the warm-up starts from; negative: init_lr (default -1)"),
    "warmup_steps": Setting(_INT_0, "warm-up iterations in epoch 0 (default 0)"),
    "lr_decay_rate": Setting(
        Nullable(Number(0, lowest_open=True, cast=False)), "per-epoch decay (linear_warmup_step_lr)"
    ),
    "weight_decay": Setting(Number(0), "AdamW weight decay of the weight matrices"),
    "beta2": Setting(Number(0, 1, cast=False), "AdamW beta2 (default 0.999)"),
    "accum_grad_iters": Setting(Integer(1, cast=True), "iterations whose gradients are summed per optimiser step"),
    "grad_clip_norm": Setting(Nullable(Number(0, lowest_open=True)), "clip gradients to this total norm; null: off"),
    # data
    "batch_size_train": Setting(_INT_1, "training batch size per rank"),
    "batch_size_eval": Setting(_INT_1, "evaluation batch size per rank"),
    "num_workers": Setting(_INT_0, "data-loader worker processes per rank"),
    "train_splits": Setting(Splits(), "splits trained on"),
    "valid_splits": Setting(Splits(), "splits validated on after every epoch (the best checkpoint is kept)"),
    "test_splits": Setting(Splits(), "splits tested at the end"),
    "train_dataset_ratios": Setting(
        Unsupported(
            "LAVIS 1.0.2 cannot sample by these weights: runner_base concatenates the training datasets and "
            "ignores them (or hands the mapping to MultiIterLoader as if it were a list), runner_iter stops on "
            "a NameError in RunnerIter.dataloaders; remove the key (the training datasets are then concatenated)"
        ),
        "sampling weights of the training datasets: not supported (the reason is the error)",
    ),
    "use_dist_eval_sampler": Setting(Boolean(), "split evaluation data across ranks (default true)"),
    "length_sorted_eval": Setting(Boolean(), "evaluate VQA in question-length order: less padding (default false)"),
    "feature_cache": Setting(Nullable(Table(_feature_cache_settings)), "frozen-ViT feature cache (feature_cache.py)"),
    "bad_samples": Setting(Choice("skip", "error"), "an unreadable training sample is skipped or stops the run"),
    "max_bad_sample_fraction": Setting(Number(0, 1), "fraction of skipped samples that still stops the run"),
    "epoch_transition_sleep": Setting(Number(0), "seconds IterLoader sleeps at an epoch boundary (default 2)"),
    # checkpoints
    "resume_ckpt_path": Setting(Nullable(CheckpointFile()), "runner checkpoint to resume training from"),
    "resume": Setting(Nullable(Choice(False, "auto")), "auto: from the newest loadable checkpoint in output_dir"),
    "save_every_iters": Setting(Nullable(_INT_0), "also checkpoint every N iterations inside an epoch; 0 or null: off"),
    "keep_last_n": Setting(Nullable(_INT_1), "per-epoch and mid-epoch checkpoints kept; null: all"),
    "allow_unsafe_checkpoints": Setting(Nullable(Boolean()), "load checkpoints that need pickle (trusted files only)"),
    # non-finite losses
    "nonfinite_check": Setting(Boolean(), "watch for non-finite losses and gradients (default true)"),
    "max_nonfinite_steps": Setting(_INT_1, "consecutive non-finite steps that stop the run (default 10)"),
    # logging
    "log_freq": Setting(_INT_1, "iterations between training log lines (default 50)"),
    # distributed (rank, world_size, gpu, distributed and dist_backend are set by init_distributed_mode)
    "distributed": Setting(Boolean(), "use torch.distributed when launched by torchrun"),
    "dist_url": Setting(Text(), "init_method of the process group, e.g. env://"),
    "dist_backend": Setting(Choice("nccl", "gloo", "mpi"), "process-group backend (default nccl on CUDA, else gloo)"),
    "dist_timeout_minutes": Setting(Number(0, lowest_open=True), "collective timeout: a hung job ends (default 30)"),
    "world_size": Setting(_INT_1, "number of ranks"),
    "rank": Setting(_INT_0, "this process's rank"),
    "gpu": Setting(_INT_0, "this process's local CUDA device index"),
    "find_unused_parameters": Setting(Boolean(), "DDP find_unused_parameters (default false)"),
    # generation and evaluation (captioning, VQA, retrieval tasks)
    "num_beams": Setting(_INT_1, "beams of the beam search"),
    "max_len": Setting(_INT_1, "longest generated text, in tokens"),
    "min_len": Setting(_INT_0, "shortest generated text, in tokens"),
    "prompt": Setting(Text(empty=True), "VQA prompt, with {} for the question (default none)"),
    "report_metric": Setting(Boolean(), "score the results (default true)"),
    "inference_method": Setting(Choice("generate", "rank"), "VQA answers generated or ranked among candidates"),
    "num_ans_candidates": Setting(_INT_1, "answer candidates ranked per question (default 128)"),
    "k_test": Setting(_INT_1, "candidates re-ranked per query in retrieval"),
    "caption_tokenizer": Setting(CaptionTokenizer(), "tokenisation of captions for scoring (captioning_offline)"),
    "caption_metrics": Setting(CaptionMetrics(), "caption metrics computed (captioning_offline)"),
    # LAVIS's reading-comprehension VQA (PNP-VQA) tasks
    "internal_bsz_fid": Setting(_INT_1, "PNP-VQA: batch size of the fusion-in-decoder reader"),
    "num_captions": Setting(_INT_1, "PNP-VQA: captions generated per image"),
    "num_captions_fid": Setting(_INT_1, "PNP-VQA: captions read per question"),
    "cap_max_length": Setting(_INT_1, "PNP-VQA: longest caption"),
    "cap_min_length": Setting(_INT_0, "PNP-VQA: shortest caption"),
    "top_k": Setting(_INT_0, "PNP-VQA: top-k sampling of captions"),
    "top_p": Setting(Number(0, 1, cast=False), "PNP-VQA: nucleus sampling of captions"),
    "repetition_penalty": Setting(Number(0, lowest_open=True, cast=False), "PNP-VQA: caption repetition penalty"),
    "num_patches": Setting(_INT_1, "PNP-VQA: image patches sampled per caption"),
    "block_num": Setting(_INT_0, "PNP-VQA: text-encoder block whose attention picks the patches"),
}


# --- checking ------------------------------------------------------------------------------


def table_problems(prefix: str, values: dict, settings: dict[str, Setting]) -> list[str]:
    problems = []
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in settings:
            close = difflib.get_close_matches(str(name), list(settings), n=1)
            if close:
                hint = f"did you mean {prefix}.{close[0]}?"
            elif len(settings) <= 12:
                hint = f"known keys: {', '.join(sorted(settings))}"
            else:
                hint = "the known ones are listed in blip2_internlm/run_config.py"
            problems.append(f"{key} is not a known setting; {hint}")
            continue
        problems.extend(settings[name].kind.problems(key, value))
    return problems


def _plain(run_cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if run_cfg is None:
        return {}
    if isinstance(run_cfg, DictConfig):
        return OmegaConf.to_container(run_cfg, resolve=True)
    return dict(run_cfg)


def validate_run_config(run_cfg) -> None:
    """Raise ``RunConfigError`` listing every bad or unknown key of ``run_cfg`` (a DictConfig or dict).

    Only what the config itself decides: a config for a GPU machine validates on a laptop
    (the planner reads them there); ``check_device_available`` checks the machine.
    """
    problems = table_problems("run", _plain(run_cfg), RUN_KEYS)
    if problems:
        raise RunConfigError(problems)


def check_device_available(run_cfg) -> None:
    """Raise ``RunConfigError`` if ``run.device`` (default cuda, as LAVIS) names a CUDA device this machine lacks."""
    import torch

    device = str(_plain(run_cfg).get("device") or "cuda")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise RunConfigError(
            [f"run.device = {device!r} but this machine has no CUDA device; pass --options run.device=cpu"]
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RunConfigError([f"run.device = {device!r} but this machine has {torch.cuda.device_count()} CUDA devices"])
