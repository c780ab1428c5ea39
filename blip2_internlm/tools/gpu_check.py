"""``make gpu-check``: every check that needs a GPU, prepared to run in one go on a borrowed card.

    python -m blip2_internlm.tools.gpu_check [--out output/gpu-check] [--only NAME,...] [--dry-run] [--device cuda|cpu]

A GPU may be available for minutes at a time; this script is what runs in them, so that no such minute goes
to writing code.  It runs the checks of :data:`CHECKS` in order, each against its own time budget
(all of them together within :data:`TOTAL_BUDGET_S`), each wrapped so that a check that fails, raises
or overruns is recorded (status, error, the tail of its traceback) and the next one still runs.  The
exit code is 0 only if every check that ran passed; 2 when there is no CUDA device.

The checks use the package's own code paths: the training runner (``blip2_internlm._entry``, the
path of ``python -m blip2_internlm.train``), the model's ``generate``, the feature cache, and the
``export``, ``plan`` and ``bench`` command lines (in subprocesses, with a timeout).  Nothing they
measure is reimplemented here.

Output: ``<out>/<card>-<YYYYMMDD-HHMMSS>.json`` (the card, torch and CUDA versions, per check its
status, seconds and numbers), a ``.md`` beside it with one table row per check and the lines to
paste into the README's GPU table, a ``.log`` with everything printed and every subprocess's output,
and the benchmark's own JSON files in ``<out>/<card>-<stamp>/``: five files, two folders down at
most.  The report is rewritten after every check, so a run cut short still leaves its results.

Before the first check, the preparation generates what the checks read into the asset cache
(``$BLIP2_INTERNLM_CACHE``): the tiny models, the shapes data and the bench size's tokenizer
directories, which takes a while the first time (docs/performance.md).  For a machine available for
minutes, fill a cache inside the checkout beforehand (a few MB; e.g.
``BLIP2_INTERNLM_CACHE=.cache/blip2_internlm python -m blip2_internlm.tools.gpu_check --device cpu --only
bf16_step``) and take it along: the preparation then takes seconds.

``--dry-run`` (no GPU needed) lists the checks with their budgets and what each runs, and verifies
that every config file, command-line module, option, model key and function they use exists:
exit 0 if all do, 1 otherwise.  ``--device cpu`` rehearses the checks on the CPU at test sizes (the
``tiny`` bench size and stage-2 config instead of the real ones, budgets x4): it proves the script,
not the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import importlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from blip2_internlm.paths import REPO_CONFIG_DIR, TINY_RUN_CONFIG_DIR

NO_CUDA_MESSAGE = "no CUDA device: make gpu-check needs a GPU; --dry-run lists the checks"
#: What the whole run may take on one GPU: the start-up, the preparation and the checks' budgets together.
TOTAL_BUDGET_S = 480.0
#: The start-up before the first clock runs (imports, the CUDA context, the machine's description).
STARTUP_ALLOWANCE_S = 15.0
#: A CPU rehearsal runs the same checks at test sizes, on a slower device.
REHEARSAL_BUDGET_FACTOR = 4.0
GiB = 1024**3

TINY_STAGE2 = TINY_RUN_CONFIG_DIR / "pretrain_stage2.yaml"
REAL_STAGE2 = REPO_CONFIG_DIR / "blip2_internlm" / "pretrain_stage2_internlm2_1.8b.yaml"
#: The card the planner's batch is chosen for (an RTX 4090), as the README's plan is.
PLANNER_GPU_GIB = 24.0
#: plan --measure against the planner: docs/plan.md has the real-size rows, all within this tolerance.
PLAN_TOLERANCE = 0.10
#: The tiny shapes data the in-process checks train on: 8 batches of 8.
TINY_DATA = (
    "datasets.shapes_caption.generator.train=64",
    "datasets.shapes_caption.generator.val=16",
    "datasets.shapes_caption.generator.test=16",
)
#: The iteration whose gradients get a NaN in ``amp_fp16_nan`` (of 8).
NAN_ITERATION = 3
#: Generation settings of the decoding and export comparisons.
PROMPT = "图片描述："
MAX_NEW_TOKENS, BEAMS = 10, 3


# --- what the checks run, for the checks and for --dry-run alike ---------------------------------------


def shown_path(path) -> str:
    """A path as a reader types it: relative to the working directory when under it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def is_placeholder(value: str) -> bool:
    return value.startswith("<") and value.endswith(">")


@dataclass(frozen=True)
class Scale:
    """The sizes a check runs at: the real ones on a GPU, test sizes in a CPU rehearsal."""

    plan_config: Path
    bench_size: str
    bench_repeats: int
    batch_cap: int | None  # the planner's batch, capped (a test-size model fits thousands)


SCALES = {
    "cuda": Scale(REAL_STAGE2, "real", 3, None),
    "cpu": Scale(TINY_STAGE2, "tiny", 1, 8),
}


@dataclass(frozen=True)
class Command:
    """A package command line: ``python -m <module> <args>``."""

    module: str
    args: tuple[str, ...]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def __str__(self) -> str:
        shown = [shown_path(a) if a.endswith((".yaml", ".yml")) else a for a in self.args]
        return " ".join(["python", "-m", self.module, *(a if "<" in a else shlex.quote(a) for a in shown)])

    def shown(self) -> str:
        return str(self)

    def problems(self) -> list[str]:
        """Options the module's parser lacks, values outside an option's choices, config files that are missing."""
        try:
            options = cli_options(self.module)
        except Exception as err:
            return [f"{self.module}: cannot read its command line: {type(err).__name__}: {err}"]
        found = []
        args = list(self.args)
        for i, arg in enumerate(args):
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                if flag not in options:
                    known = ", ".join(sorted(options))
                    found.append(f"python -m {self.module} has no option {flag} (its options: {known})")
                    continue
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
                choices = options[flag]
                if choices is not None and value is not None and not is_placeholder(value):
                    if value not in [str(c) for c in choices]:
                        found.append(f"python -m {self.module} {flag} {value}: not one of {list(choices)}")
            elif arg.endswith((".yaml", ".yml")) and not Path(arg).is_file():
                found.append(f"config file {shown_path(arg)} does not exist")
        return found


@dataclass(frozen=True)
class Script:
    """``python -c <code> <args>``: a program that must not import this package (``label`` shows it)."""

    code: str
    args: tuple[str, ...]
    label: str

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.code, *self.args]

    def __str__(self) -> str:
        return f"python -c <{self.label}>"


class _Parsed(Exception):
    """Raised in place of parsing: the parser has been read."""


def cli_options(module: str) -> dict[str, tuple | None]:
    """The option strings of a package command's ``argparse`` parser -> their choices (None: any value).

    Read from the parser its ``main`` really builds: ``main([])`` runs with ``parse_args`` intercepted,
    so nothing after the parsing runs."""
    main = importlib.import_module(module).main
    parsers = []

    def read(parser, args=None, namespace=None):
        parsers.append(parser)
        raise _Parsed

    with mock.patch("argparse.ArgumentParser.parse_args", read), contextlib.suppress(_Parsed):
        main([])
    if not parsers:
        raise RuntimeError(f"{module}.main() parsed no command line")
    return {
        option: (tuple(action.choices) if action.choices is not None else None)
        for action in parsers[-1]._actions
        for option in action.option_strings
    }


@dataclass(frozen=True)
class ConfigWithOptions:
    """A run config and ``--options`` as the training entry merges them: the run keys checked by
    ``run_config.validate_run_config`` and the model keys by ``Blip2InternLMConfig``."""

    cfg_path: Path
    options: tuple[str, ...]

    def shown(self) -> str:
        return f"config {shown_path(self.cfg_path)} with --options {' '.join(self.options)}"

    def problems(self) -> list[str]:
        if not Path(self.cfg_path).is_file():
            return [f"config file {shown_path(self.cfg_path)} does not exist"]
        try:
            cfg = load_run_config(self.cfg_path, self.options)
            from blip2_internlm.models.config import Blip2InternLMConfig
            from blip2_internlm.run_config import validate_run_config

            validate_run_config(cfg.run_cfg)
            Blip2InternLMConfig.from_lavis(cfg.model_cfg)
        except Exception as err:
            return [f"{self.shown()}: {type(err).__name__}: {err}"]
        return []


@dataclass(frozen=True)
class ModelOverrides:
    """Model-config keys set on the ``tiny`` model type (checked by ``Blip2InternLMConfig``)."""

    overrides: tuple[tuple[str, object], ...]

    def shown(self) -> str:
        return "tiny blip2_internlm with " + ", ".join(f"model.{k}={v}" for k, v in self.overrides)

    def problems(self) -> list[str]:
        try:
            from blip2_internlm.models.config import Blip2InternLMConfig

            Blip2InternLMConfig.from_lavis(tiny_model_config(dict(self.overrides)))
        except Exception as err:
            return [f"{self.shown()}: {type(err).__name__}: {err}"]
        return []


@dataclass(frozen=True)
class Uses:
    """Names a check calls: ``module.attribute`` (``module.Class.attribute`` too), each of ``members`` in it
    when given (e.g. the bench's ``SECTIONS``)."""

    name: str
    members: tuple[str, ...] = ()

    def shown(self) -> str:
        return self.name + (f" ({', '.join(self.members)})" if self.members else "")

    def problems(self) -> list[str]:
        parts = self.name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attribute in parts[split:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                return [f"{self.name} does not exist"]
            if dataclasses.is_dataclass(obj) and isinstance(obj, type):
                obj = [f.name for f in dataclasses.fields(obj)]
            missing = [m for m in self.members if m not in obj]
            return [f"{self.name} has no {', '.join(missing)}"] if missing else []
        return [f"{self.name}: no such module"]


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: float
    description: str
    run: Callable[[Context], str | None]
    #: what the check runs and uses, for a device: shown by --dry-run, and each verified there
    uses: Callable[[str], list] = lambda device: []


class CheckFailed(Exception):
    """A check ran and its result is not what it should be."""


class BudgetExceeded(BaseException):
    """A check overran its budget.  A BaseException, so that no ``except Exception`` inside the
    check's code swallows it."""


class CommandTimeout(Exception):
    """A command line ran past the time left to its check."""


class CommandFailed(Exception):
    """A command line exited with an error."""


# --- the context a check runs in ------------------------------------------------------------------------


@dataclass
class Context:
    device: str  # "cuda", or "cpu" for a rehearsal
    work: Path  # scratch space, removed at the end
    artifacts: Path  # files kept beside the report
    log_path: Path | None = None  # where subprocesses' output goes
    numbers: dict = field(default_factory=dict)  # the running check's numbers
    deadline: float = math.inf  # time.monotonic() at which the running check's budget ends
    cache: dict = field(default_factory=dict)  # shared between checks (the planner's batches, datasets)

    @property
    def scale(self) -> Scale:
        return SCALES[self.device]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def run(self, command: Command | Script, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``command``, stopping it (its whole process group) when the check's time is up or
        ``timeout`` seconds have passed; its output goes to the log.  ``CommandTimeout`` /
        ``CommandFailed`` (with the end of its output) when it does not finish well."""
        limit = self.remaining() - 2.0
        if timeout is not None:
            limit = min(limit, timeout)
        if limit <= 1:
            raise CommandTimeout(f"no time left for {command}")
        self.say(f"$ {command}  (timeout {limit:.0f} s)")
        start = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with subprocess.Popen(
            command.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=limit)
            except BaseException as err:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
                self._keep_output(command, stdout, stderr, f"killed after {time.monotonic() - start:.0f} s")
                if isinstance(err, subprocess.TimeoutExpired):
                    raise CommandTimeout(f"{command} ran past {limit:.0f} s{_tail(stdout, stderr)}") from None
                raise
        seconds = time.monotonic() - start
        self._keep_output(command, stdout, stderr, f"exit {process.returncode} after {seconds:.0f} s")
        self.say(f"  exit {process.returncode} after {seconds:.1f} s")
        if process.returncode != 0:
            raise CommandFailed(f"{command} exited with {process.returncode}{_tail(stdout, stderr)}")
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def _keep_output(self, command: Command | Script, stdout: str, stderr: str, how: str) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n----- {command} ({how})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n----- end\n")


def _tail(stdout: str, stderr: str, lines: int = 12) -> str:
    text = "\n".join((stderr or stdout or "").rstrip().splitlines()[-lines:])
    return f":\n{text}" if text else ""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``BudgetExceeded`` in this (main) thread after ``seconds``; elsewhere, no limit."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise BudgetExceeded(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- shared set-up: the tiny model, the tiny stage-2 config and data ---------------------------------


def load_run_config(cfg_path, options: Sequence[str]):
    """LAVIS's ``Config`` of a run config with ``--options``, as the entry points build it."""
    from types import SimpleNamespace

    from lavis.common.config import Config

    return Config(SimpleNamespace(cfg_path=str(cfg_path), options=list(options)))


def tiny_stage2_options(device: str, output_dir) -> tuple[str, ...]:
    """The tiny stage-2 run on ``device``, one process, one epoch of 8 batches, no stage-1 checkpoint."""
    return (
        "model.load_pretrained=False",
        f"run.device={device}",
        "run.distributed=False",
        "run.max_epoch=1",
        "run.batch_size_train=8",
        "run.log_freq=1",
        f"run.output_dir={output_dir}",
        *TINY_DATA,
    )


def tiny_model_config(overrides: dict):
    """The ``tiny`` model type's ``model:`` section with ``overrides``."""
    from omegaconf import OmegaConf

    from blip2_internlm.models.blip2_internlm import Blip2InternLM

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def tiny_model(device: str, **overrides):
    """The ``tiny`` blip2_internlm on ``device``, seeded: the same weights for the same overrides."""
    import torch

    from blip2_internlm.factory import build_model

    torch.manual_seed(0)
    return build_model("blip2_internlm", "tiny", options=overrides, is_eval=False).to(device)


def tiny_dataset(ctx: Context):
    """The tiny stage-2 config's training data (shapes captions), built once per run."""
    if "tiny_dataset" not in ctx.cache:
        from lavis import tasks

        cfg = load_run_config(TINY_STAGE2, tiny_stage2_options(ctx.device, ctx.work / "data"))
        datasets = tasks.setup_task(cfg).build_datasets(cfg)
        ctx.cache["tiny_dataset"] = datasets["shapes_caption"]["train"]
    return ctx.cache["tiny_dataset"]


def tiny_batch(ctx: Context, size: int, start: int = 0) -> dict:
    """``size`` collated training samples, on the device as the runner moves them."""
    from lavis.datasets.data_utils import prepare_sample

    dataset = tiny_dataset(ctx)
    batch = dataset.collater([dataset[i] for i in range(start, start + size)])
    return prepare_sample(batch, cuda_enabled=ctx.cuda)


def trainable_snapshot(model) -> list:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def same_tensors(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class CallCounter:
    """Counts the forward calls of a module."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1


def free_cuda_memory() -> None:
    """Give the caching allocator's memory back, so that the next check (or its subprocess) has the card."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def planner_batch(ctx: Context, gpu_mem_gib: float) -> int:
    """The planner's largest batch for the stage-2 config on one GPU of ``gpu_mem_gib``
    (``plan.make_plan``, what ``python -m blip2_internlm.tools.plan`` prints), capped in a rehearsal."""
    key = ("planner_batch", round(gpu_mem_gib, 1))
    if key not in ctx.cache:
        from blip2_internlm.tools.plan import make_plan

        plan = make_plan(str(ctx.scale.plan_config), 1, gpu_mem_gib)
        ctx.cache[key] = plan.max_batch
    batch = ctx.cache[key]
    return min(batch, ctx.scale.batch_cap) if ctx.scale.batch_cap else batch


# --- the preparation: generated assets, before the clocks of the checks start -----------------------------


def prepare(ctx: Context) -> str:
    """Generate what the checks read (tiny models, shapes data, the bench size's tokenizer and config
    directories) into the asset cache; seconds when it is already there."""
    import torch

    from blip2_internlm.tools.bench import internlm2_dir, load_size, opt_dir, qformer_dir

    start = time.monotonic()
    tiny_model("cpu")
    tiny_dataset(ctx)
    size = load_size(ctx.scale.bench_size)
    for build in (qformer_dir, internlm2_dir, opt_dir):
        build(size)
    ctx.numbers["assets_s"] = round(time.monotonic() - start, 1)
    if ctx.cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        ctx.numbers.update(gpu_free_gib=round(free / GiB, 2), gpu_total_gib=round(total / GiB, 2))
    from blip2_internlm.assets import cache_dir

    return f"assets ready in {ctx.numbers['assets_s']} s under {cache_dir()}"


# --- the checks -----------------------------------------------------------------------------------------


def train_command(device: str, output_dir) -> Command:
    """``python -m blip2_internlm.train`` on the tiny stage-2 config with LAVIS's mixed precision."""
    options = (*tiny_stage2_options(device, output_dir), "run.amp=True")
    return Command("blip2_internlm.train", ("--cfg-path", str(TINY_STAGE2), "--options", *options))


def check_amp_fp16_nan(ctx: Context) -> str:
    """The tiny stage-2 run of ``python -m blip2_internlm.train`` (``_entry.setup`` and ``build``, then
    ``ReliableRunner.train``) with ``run.amp: True``: on CUDA fp16 autocast and GradScaler (the tiny
    model type's ``autocast_dtype`` is LAVIS's fp16).  A gradient hook on ``query_tokens`` records the
    trainable weights before every optimizer step and puts a NaN into the gradient of iteration
    ``NAN_ITERATION``: that step must leave every weight as it was and be counted, by the GradScaler
    (``progress.scaler_skips``) on CUDA, by the non-finite guard (``nonfinite_steps``) in a CPU
    rehearsal, where there is no scaler.  Steps GradScaler skips by itself (fp16 overflow while its
    scale settles) are counted too and must also leave the weights unchanged."""
    import torch

    from blip2_internlm import _entry

    command = train_command(ctx.device, ctx.work / "amp_fp16_nan")
    cfg, job_id = _entry.setup("gpu-check: amp_fp16_nan", list(command.args))
    runner = _entry.build(cfg, job_id)
    model = runner.unwrap_dist_model(runner.model)  # on the device now
    snapshots = []

    def inject(grad):
        snapshots.append(trainable_snapshot(model))  # the weights before this iteration's optimizer step
        if len(snapshots) - 1 == NAN_ITERATION:
            return torch.full_like(grad, float("nan"))
        return grad

    handle = model.query_tokens.register_hook(inject)
    try:
        runner.train()
    finally:
        handle.remove()
    snapshots.append(trainable_snapshot(model))
    iterations = len(snapshots) - 1
    unchanged = [i for i in range(iterations) if same_tensors(snapshots[i], snapshots[i + 1])]
    progress = runner.progress
    scaler = runner.scaler
    ctx.numbers.update(
        iterations=iterations,
        nan_iteration=NAN_ITERATION,
        steps_leaving_weights_unchanged=unchanged,
        scaler_skips=progress.scaler_skips,
        nonfinite_steps=progress.nonfinite_steps,
        grad_scaler=scaler is not None,
        final_scale=scaler.get_scale() if scaler is not None else None,
        final_weights_finite=all(bool(torch.isfinite(t).all()) for t in snapshots[-1]),
    )
    counted = progress.scaler_skips if ctx.cuda else progress.nonfinite_steps
    counter = "progress.scaler_skips" if ctx.cuda else "progress.nonfinite_steps"
    problems = []
    if iterations <= NAN_ITERATION + 1:
        problems.append(f"only {iterations} iterations ran")
    if ctx.cuda and scaler is None:
        problems.append("run.amp: True on CUDA built no GradScaler")
    if NAN_ITERATION not in unchanged:
        problems.append(f"the NaN gradient of iteration {NAN_ITERATION} changed the weights")
    if counted != len(unchanged):
        problems.append(f"{counter} = {counted}, but {len(unchanged)} steps left the weights unchanged")
    if len(unchanged) == iterations:
        problems.append("no step changed the weights")
    if not ctx.numbers["final_weights_finite"]:
        problems.append("the weights are not finite after the run")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (
        f"NaN gradient at iteration {NAN_ITERATION} skipped (weights unchanged), {counter} = {counted} "
        f"of {iterations} steps (unchanged: {unchanged})"
    )


def check_bf16_step(ctx: Context) -> str:
    """One training step of the tiny model with ``autocast_dtype: bf16`` (no GradScaler): the LLM's
    linears compute in bf16, the loss is finite and near the fp32 model's (same weights, eval mode),
    every trainable parameter and only those gets a finite gradient, and AdamW's step moves them."""
    import torch

    from blip2_internlm.tools.measure import measure_steps
    from blip2_internlm.tools.plan_validation import lavis_adamw

    samples = tiny_batch(ctx, 8)
    reference = tiny_model(ctx.device, autocast_dtype="off").eval()
    with torch.no_grad():
        fp32_loss = float(reference(samples)["loss"])
    del reference
    model = tiny_model(ctx.device, autocast_dtype="bf16").eval()
    dtypes = set()
    linear = next(m for m in model.llm_model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda module, args, out: dtypes.add(str(out.dtype)))
    with torch.no_grad():
        bf16_loss = float(model(samples)["loss"])
    hook.remove()
    model.train()
    optimizer = lavis_adamw(model)
    before = trainable_snapshot(model)
    loss = model(samples)["loss"]
    loss.backward()
    train_loss = loss.item()
    named = dict(model.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    with_grad = {name for name, p in named.items() if p.grad is not None}
    finite = all(bool(torch.isfinite(named[name].grad).all()) for name in with_grad)
    grad_norm = float(torch.nn.utils.get_total_norm([named[name].grad for name in sorted(with_grad)]))
    optimizer.step()
    optimizer.zero_grad()
    moved = not same_tensors(before, trainable_snapshot(model))

    def step():
        optimizer.zero_grad()
        model(samples)["loss"].backward()
        optimizer.step()

    timing = measure_steps(step, ctx.device, repeats=5, flops=False)
    ctx.numbers.update(
        train_loss=train_loss,
        eval_loss_bf16=bf16_loss,
        eval_loss_fp32=fp32_loss,
        relative_difference=abs(bf16_loss - fp32_loss) / abs(fp32_loss),
        llm_linear_output_dtypes=sorted(dtypes),
        grad_norm=grad_norm,
        trainable_parameters=len(trainable),
        trainable_without_gradient=sorted(trainable - with_grad),
        frozen_with_gradient=sorted(with_grad - trainable),
        step_ms=timing["median_s"] * 1e3,
        peak_memory_growth_bytes=timing["peak_memory_growth_bytes"],
    )
    problems = []
    if not math.isfinite(train_loss) or not math.isfinite(bf16_loss):
        problems.append("the bf16 loss is not finite")
    if dtypes != {"torch.bfloat16"}:
        problems.append(f"the LLM's linear computed in {sorted(dtypes)}, not bf16")
    if ctx.numbers["relative_difference"] > 0.05:
        problems.append(f"bf16 loss {bf16_loss:.4f} vs fp32 {fp32_loss:.4f}")
    if ctx.numbers["frozen_with_gradient"] or ctx.numbers["trainable_without_gradient"]:
        problems.append("gradients are not exactly on the trainable parameters")
    if not finite:
        problems.append("a gradient is not finite")
    if not moved:
        problems.append("AdamW's step did not change the trainable weights")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (
        f"bf16 loss {bf16_loss:.4f} (fp32 {fp32_loss:.4f}), gradients on all {len(trainable)} trainable "
        f"parameters only, step {ctx.numbers['step_ms']:.1f} ms"
    )


def check_qlora_step(ctx: Context) -> str:
    """The tiny instruction model with QLoRA (``llm_lora.load_in_4bit``: the frozen LLM's linears in 4-bit NF4
    through bitsandbytes, LoRA adapters on them): its linears are 4-bit, one training step gives finite
    gradients on the adapters and the bridge only, and AdamW's step moves them; then it chats."""
    import torch

    from blip2_internlm.factory import build_model
    from blip2_internlm.models.lora import lora_layers
    from blip2_internlm.tools.plan_validation import lavis_adamw

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CheckFailed("bitsandbytes is not installed: pip install bitsandbytes") from None
    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "load_in_4bit": True}
    model = build_model("blip2_internlm_instruct", "tiny", options={"llm_lora": lora}, device=ctx.device, is_eval=False)
    bases = {type(layer.get_base_layer()).__name__ for layer in lora_layers(model.llm_model)}
    samples = {**tiny_batch(ctx, 8), "prompt": "图片描述："}  # captions as one-turn instructions
    model.train()
    optimizer = lavis_adamw(model)
    before = trainable_snapshot(model)
    loss = model(samples)["loss"]
    loss.backward()
    named = dict(model.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    with_grad = {name for name, p in named.items() if p.grad is not None}
    finite = all(bool(torch.isfinite(named[name].grad).all()) for name in with_grad)
    optimizer.step()
    moved = not same_tensors(before, trainable_snapshot(model))
    model.eval()
    answer = model.chat(samples["image"][0], [{"role": "user", "content": "图里有什么？"}], max_length=8)
    ctx.numbers.update(
        loss=loss.item(),
        base_layers=sorted(bases),
        adapters=len(lora_layers(model.llm_model)),
        trainable_without_gradient=sorted(trainable - with_grad),
        frozen_with_gradient=sorted(with_grad - trainable),
        answer=answer,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    )
    problems = []
    if bases != {"Linear4bit"}:
        problems.append(f"the adapted linears are {sorted(bases)}, not bitsandbytes' Linear4bit")
    if not math.isfinite(loss.item()) or not finite:
        problems.append("the loss or a gradient is not finite")
    if ctx.numbers["frozen_with_gradient"] or ctx.numbers["trainable_without_gradient"]:
        problems.append("gradients are not exactly on the trainable parameters")
    if not moved:
        problems.append("AdamW's step did not change the trainable weights")
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"4-bit base, {len(lora_layers(model.llm_model))} adapters, loss {loss.item():.4f}, chat {answer!r}"


def generate_ids(model, images, **kwargs):
    """``model.generate`` of ``images`` with the comparison's prompt and lengths: the token ids it decoded
    (recorded at its tokenizer's ``batch_decode``) and the seconds the call took."""
    import torch

    tokenizer = model.llm_tokenizer
    had_own = "batch_decode" in vars(tokenizer)
    decode = tokenizer.batch_decode
    decoded = []

    def recording(sequences, *args, **kw):
        decoded.append(torch.as_tensor(sequences).detach().cpu().clone())
        return decode(sequences, *args, **kw)

    tokenizer.batch_decode = recording
    try:
        start = time.monotonic()
        model.generate({"image": images, "prompt": PROMPT}, max_length=MAX_NEW_TOKENS, min_length=1, **kwargs)
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds = time.monotonic() - start
    finally:
        if had_own:
            tokenizer.batch_decode = decode
        else:
            del tokenizer.batch_decode
    return decoded[0], seconds


def check_compiled_decode(ctx: Context) -> str:
    """``model.generate`` of the tiny model with the static decoding loop compiled
    (``decode_compile: True``) against the same loop eager, greedy and beam 3, in the model type's
    precision (fp16 autocast on CUDA): the same tokens; the time of a call each way, after a first call
    that compiles."""
    import torch

    images = tiny_batch(ctx, 4)["image"]
    model = tiny_model(ctx.device, decode_compile=False).eval()
    ctx.numbers["autocast_dtype"] = model.autocast_dtype
    mismatches = []
    for name, beams in (("greedy", 1), (f"beam {BEAMS}", BEAMS)):
        tokens, entry = {}, {}
        for label, compiled in (("eager", False), ("compiled", True)):
            model.model_config = dataclasses.replace(model.model_config, decode_compile=compiled)
            first, entry[f"{label}_first_call_s"] = generate_ids(model, images, num_beams=beams)
            tokens[label], seconds = generate_ids(model, images, num_beams=beams)
            entry[f"{label}_call_ms"] = seconds * 1e3
            if not torch.equal(first, tokens[label]):
                mismatches.append(f"{name} {label}: two calls gave different tokens")
        eager, compiled = tokens["eager"], tokens["compiled"]
        same_shape = eager.shape == compiled.shape
        entry.update(
            equal=same_shape and torch.equal(eager, compiled),
            rows=eager.shape[0],
            rows_differing=int((eager != compiled).any(dim=1).sum()) if same_shape else eager.shape[0],
            tokens_eager=eager.tolist(),
        )
        ctx.numbers[name] = entry
        if not entry["equal"]:
            mismatches.append(
                f"{name}: compiled tokens differ from eager in {entry['rows_differing']} of {entry['rows']} rows"
            )
    if mismatches:
        raise CheckFailed("; ".join(mismatches))
    greedy, beam = ctx.numbers["greedy"], ctx.numbers[f"beam {BEAMS}"]
    return (
        f"same tokens, greedy and beam {BEAMS}; ms per call eager/compiled: greedy {greedy['eager_call_ms']:.0f}/"
        f"{greedy['compiled_call_ms']:.0f}, beam {beam['eager_call_ms']:.0f}/{beam['compiled_call_ms']:.0f}"
    )


def feature_cache_options(device: str, work, dtype: str) -> tuple[str, ...]:
    return (
        *tiny_stage2_options(device, f"{work}/feature_cache"),
        "run.feature_cache.enabled=True",
        f"run.feature_cache.dir={work}/features",
        f"run.feature_cache.dtype={dtype}",
        "run.feature_cache.splits=[train]",
    )


def check_feature_cache_gpu(ctx: Context) -> str:
    """``run.feature_cache`` (``feature_cache.apply_feature_cache``, as the training entry applies it)
    built on the device for the tiny stage-2 config, fp32 and fp16 stores: the training loss of the
    same batches (train mode, seeded dropout) from the cache equals the loss from the images, and the
    ViT does not run for the cached batches."""
    import torch
    from lavis import tasks
    from lavis.datasets.data_utils import prepare_sample

    from blip2_internlm.feature_cache import CachedFeatures, apply_feature_cache
    from blip2_internlm.run_config import RunSettings

    losses = {}
    for dtype in ("fp32", "fp16"):
        cfg = load_run_config(TINY_STAGE2, feature_cache_options(ctx.device, ctx.work, dtype))
        task = tasks.setup_task(cfg)
        datasets = task.build_datasets(cfg)
        plain = datasets["shapes_caption"]["train"]
        torch.manual_seed(0)
        model = task.build_model(cfg)
        start = time.monotonic()
        cached = apply_feature_cache(RunSettings.read(cfg.run_cfg), model, datasets)["shapes_caption"]["train"]
        if ctx.cuda:
            torch.cuda.synchronize()
        ctx.numbers[f"{dtype}_store_build_s"] = round(time.monotonic() - start, 2)
        if not isinstance(cached, CachedFeatures):
            raise CheckFailed("run.feature_cache did not wrap the training split")
        vit = CallCounter(model.visual_encoder)
        ctx.numbers[f"{dtype}_vit_calls_for_cached_batches"] = 0
        model.train()
        for first in (0, 8):
            indices = range(first, first + 8)
            pair = []
            for dataset in (plain, cached):
                batch = prepare_sample(dataset.collater([dataset[i] for i in indices]), cuda_enabled=ctx.cuda)
                calls_before = vit.calls
                torch.manual_seed(1)  # the same dropout masks in the Q-Former
                with torch.no_grad():
                    pair.append(float(model(batch)["loss"]))
                if dataset is cached:
                    ctx.numbers[f"{dtype}_vit_calls_for_cached_batches"] += vit.calls - calls_before
            losses.setdefault(dtype, []).append(pair)
        vit.handle.remove()
        del model
        free_cuda_memory()
    worst = {
        dtype: max(abs(cached - images) / abs(images) for images, cached in pairs) for dtype, pairs in losses.items()
    }
    ctx.numbers.update(losses_images_vs_cache=losses, worst_relative_difference=worst)
    problems = [
        f"{dtype} store: training loss differs by {worst[dtype]:.2e} relative (tolerance 2e-3)"
        for dtype in worst
        if worst[dtype] > 2e-3
    ]
    problems += [
        f"{dtype} store: the ViT ran for cached batches"
        for dtype in worst
        if ctx.numbers[f"{dtype}_vit_calls_for_cached_batches"] != 0
    ]
    if problems:
        raise CheckFailed("; ".join(problems))
    return "training loss from the cache = from the images: " + ", ".join(
        f"{dtype} store {worst[dtype]:.1e} relative" for dtype in worst
    )


def export_command(to_hf, checkpoint) -> Command:
    return Command(
        "blip2_internlm.tools.export", ("--to-hf", str(to_hf), "--model-type", "tiny", "--checkpoint", str(checkpoint))
    )


#: Run in a fresh interpreter: plain transformers, neither this package nor LAVIS (as tests/test_export_hf.py).
HF_SIDE = """
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

export, device, prompt, text, max_new, beams, out_json, logits_file, *images = sys.argv[1:]
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 as fp32, as ours
model, info = Blip2ForConditionalGeneration.from_pretrained(export, output_loading_info=True)
model = model.to(device).eval()
processor = AutoProcessor.from_pretrained(export)
pictures = [Image.open(path).convert("RGB") for path in images]
prompted = processor(images=pictures, text=[prompt] * len(pictures), return_tensors="pt").to(device)
scored = processor(images=pictures, text=[prompt + text] * len(pictures), return_tensors="pt").to(device)

def captions(**kwargs):
    with torch.no_grad():
        new = model.generate(**prompted, **kwargs)[:, prompted["input_ids"].shape[1]:]
    return [caption.strip() for caption in processor.batch_decode(new, skip_special_tokens=True)]

with torch.no_grad():
    torch.save(model(**scored).logits.float().cpu(), logits_file)
result = {
    "greedy": captions(num_beams=1, max_new_tokens=int(max_new), min_new_tokens=1),
    "beam": captions(num_beams=int(beams), max_new_tokens=int(max_new), min_new_tokens=1),
    "missing_keys": sorted(info["missing_keys"]),
    "unexpected_keys": sorted(info["unexpected_keys"]),
    "device": str(next(model.parameters()).device),
    "imported": sorted({name.split(".")[0] for name in sys.modules} & {"blip2_internlm", "lavis"}),
}
with open(out_json, "w", encoding="utf-8") as f:
    json.dump(result, f, ensure_ascii=False)
"""
#: The caption the logits are compared on, and their tolerance: fp32 on both sides; the export's
#: ``ln_vision`` eps differs from ours (one ``layer_norm_eps`` in ``Blip2VisionConfig``; docs/export.md has
#: the difference measured on the CPU with the spec's fitted bridge, which tests/test_export_hf.py allows
#: 5e-3); a GPU's kernels add summation-order differences.  The difference must also be a tenth of what
#: changing the image does, or the seeded, untrained bridge (whose logits hardly depend on the image)
#: would hide a broken image path.
EXPORT_TEXT = "左边有一个红色的圆形"
EXPORT_LOGITS_ATOL = 1e-2


def hf_side_script(export, device: str, out_json, logits_file, images: Sequence[str]) -> Script:
    args = (str(export), device, PROMPT, EXPORT_TEXT, str(MAX_NEW_TOKENS), str(BEAMS), str(out_json), str(logits_file))
    return Script(HF_SIDE, (*args, *map(str, images)), "plain transformers: load the export, score and caption images")


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions in fp32 on CUDA (cuDNN's convolutions default to TF32), as the
    transformers side sets them: the comparison is then of the two models, not of TF32 roundings."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def our_logits(model, pixels):
    """Our LLM's logits over ``[queries] <s> prompt text``: what the export's processor feeds its model."""
    import torch

    tokenizer = model.llm_tokenizer
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT + EXPORT_TEXT, add_special_tokens=False).input_ids
    ids = torch.tensor(ids, device=pixels.device)
    with torch.no_grad():
        queries = model.query_embeds(pixels)  # (B, n_query, llm_width)
        text = model.llm_model.get_input_embeddings()(ids).expand(len(pixels), -1, -1)
        return model.llm_model(inputs_embeds=torch.cat([queries, text], 1)).logits.float().cpu()


def check_export_gpu(ctx: Context) -> str:
    """``python -m blip2_internlm.tools.export`` of a tiny stage-2 checkpoint (the trained parts of the seeded tiny
    model), loaded by plain transformers (``Blip2ForConditionalGeneration``, a fresh interpreter with neither
    this package nor LAVIS) on the device, both in fp32: every weight comes from the file, its logits over
    a prompt and caption are ours (well within what changing the image changes), and its greedy and beam-3
    captions of three shapes images are ours (the seeded, untrained bridge may give one caption for all)."""
    import torch
    from PIL import Image

    from blip2_internlm.checkpoint import save_checkpoint_file

    work = ctx.work / "export"
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(ctx.device, autocast_dtype="off").eval()
    frozen = ("visual_encoder.", "llm_model.")
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(frozen)}
    checkpoint = save_checkpoint_file({"model": trained}, work / "stage2.pth")
    ctx.run(export_command(work / "hf", checkpoint), timeout=0.5 * ctx.remaining())

    dataset = tiny_dataset(ctx)
    paths = [os.path.join(dataset.vis_root, dataset.annotation[i]["image"]) for i in range(3)]
    pixels = torch.stack([dataset.vis_processor(Image.open(path).convert("RGB")) for path in paths]).to(ctx.device)
    with no_tf32():
        ours = {
            name: model.generate(
                {"image": pixels, "prompt": PROMPT}, num_beams=beams, max_length=MAX_NEW_TOKENS, min_length=1
            )
            for name, beams in (("greedy", 1), ("beam", BEAMS))
        }
        logits = our_logits(model, pixels)
    out_json, logits_file = work / "hf_side.json", work / "hf_logits.pt"
    ctx.run(hf_side_script(work / "hf", ctx.device, out_json, logits_file, paths))
    theirs = json.loads(out_json.read_text(encoding="utf-8"))
    their_logits = torch.load(logits_file, weights_only=True)[..., : logits.shape[-1]]  # the last column: <image>
    difference = float((their_logits - logits).abs().max()) if their_logits.shape == logits.shape else math.inf
    between_images = float((logits[0] - logits[1]).abs().max())
    ctx.numbers.update(
        ours=ours, theirs=theirs, logits_max_difference=difference, logits_difference_between_images=between_images
    )
    problems = []
    if theirs["missing_keys"] or theirs["unexpected_keys"]:
        problems.append(f"loading keys: missing {theirs['missing_keys']}, unexpected {theirs['unexpected_keys']}")
    if theirs["imported"]:
        problems.append(f"the transformers side imported {theirs['imported']}")
    if not theirs["device"].startswith(ctx.device):
        problems.append(f"the export ran on {theirs['device']}")
    if not (difference <= EXPORT_LOGITS_ATOL and difference <= between_images / 10):
        problems.append(
            f"logits differ from ours by {difference:.2e} (tolerance {EXPORT_LOGITS_ATOL:g}, and a tenth of the "
            f"{between_images:.2e} two images make; shape {tuple(their_logits.shape)}, ours {tuple(logits.shape)})"
        )
    for name in ("greedy", "beam"):
        if theirs[name] != ours[name]:
            problems.append(f"{name} captions differ: ours {ours[name]}, transformers {theirs[name]}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (
        f"plain transformers on {theirs['device']}: logits within {difference:.1e} of ours "
        f"(images apart by {between_images:.1e}), our greedy and beam-{BEAMS} captions of 3 images"
    )


def plan_measure_command(scale: Scale, device: str, batch: int | str | None = None) -> Command:
    args = ["--cfg-path", str(scale.plan_config), "--measure", "--device", device]
    if batch is not None:
        args += ["--batch", str(batch)]
    return Command("blip2_internlm.tools.plan", tuple(args))


def last_json_object(text: str) -> dict:
    """The last top-level JSON object a command printed (``plan --measure`` prints one, indented)."""
    starts = [m.start() for m in re.finditer(r"^\{", text, re.M)]
    for start in reversed(starts):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(text[start:])
    raise CheckFailed("the command printed no JSON object")


def check_plan_measure_real(ctx: Context) -> str:
    """``python -m blip2_internlm.tools.plan --measure`` on the InternLM2-1.8B stage-2 config (real sizes,
    random weights, LAVIS's training step with ``run.amp``) at the config's batch and at the planner's
    largest batch for the card's free memory (at most 24 GiB): measured peak within 10% of the
    prediction."""
    import torch

    gpu_gib = PLANNER_GPU_GIB
    if ctx.cuda:
        gpu_gib = min(gpu_gib, torch.cuda.mem_get_info()[0] / GiB)
    fitting = planner_batch(ctx, gpu_gib)
    runs = {"config batch": None, f"planner's largest batch for {gpu_gib:.1f} GiB": fitting}
    ctx.numbers["config"] = shown_path(ctx.scale.plan_config)
    problems, shown = [], []
    for share, (label, batch) in zip((0.45, 1.0), runs.items()):
        try:
            result = ctx.run(plan_measure_command(ctx.scale, ctx.device, batch), timeout=share * ctx.remaining())
        except (CommandFailed, CommandTimeout) as err:
            ctx.numbers[label] = {"batch": batch, "error": str(err)[-2000:]}
            problems.append(f"{label}: {str(err).splitlines()[0]}")
            continue
        data = last_json_object(result.stdout)
        row = {
            "batch": data["batch"],
            "measured_gib": data["measured_peak"] / GiB,
            "reserved_gib": (data.get("measured_reserved") or 0) / GiB,
            "predicted_gib": data["predicted_peak"] / GiB,
            "error": data["error"],
            "device_used_gib": (data.get("device_used") or 0) / GiB,
            "amp": data["amp"],
        }
        ctx.numbers[label] = row
        shown.append(
            f"batch {row['batch']}: {row['measured_gib']:.2f} GiB vs {row['predicted_gib']:.2f} ({row['error']:+.1%})"
        )
        if abs(row["error"]) > PLAN_TOLERANCE:
            problems.append(f"{label}: prediction off by {row['error']:+.1%} (tolerance {PLAN_TOLERANCE:.0%})")
    if problems:
        raise CheckFailed("; ".join(problems))
    return "measured vs predicted peak: " + "; ".join(shown)


def bench_command(scale: Scale, device: str, section: str, batch: int | str | None, out_dir) -> Command:
    args = ["--size", scale.bench_size, "--device", device, "--sections", section, "--skip-toggles"]
    args += ["--repeats", str(scale.bench_repeats), "--out-dir", str(out_dir)]
    if batch is not None:
        args += ["--batch-size", str(batch)]
    return Command("blip2_internlm.tools.bench", tuple(args))


#: The bench's rows read here: its stage-2 step, beam-5 captioning and VQA.
BENCH_TASKS = ("train_step", "caption", "vqa")


def bench_rows(result: dict, ours: bool) -> dict:
    """task -> the row of our default (``ours``) or of the first LAVIS variant that ran."""
    rows = {}
    for row in result["rows"]:
        if row["task"] not in BENCH_TASKS or row["status"] != "ok" or row["task"] in rows:
            continue
        if (row["variant"] == "ours: default") if ours else row["variant"].startswith("LAVIS"):
            rows[row["task"]] = row
    return rows


def check_bench_real(ctx: Context) -> str:
    """``python -m blip2_internlm.tools.bench --size real`` (ViT-g, bert-base Q-Former, InternLM2-1.8B-shaped
    LLM against LAVIS's Blip2OPT with OPT of the same width and depth, random weights) at the
    planner's batch for a 24 GiB card: LAVIS as shipped, then our default (whose first generation
    compiles the decoding step, hence the larger share of the time), each in its own run so that one
    that overruns does not cost the other's numbers: the training step, beam-5 captioning and VQA,
    their ratios, the decoding step against its roofline floor and the peak memory."""
    batch = planner_batch(ctx, PLANNER_GPU_GIB)
    ctx.numbers.update(size=ctx.scale.bench_size, batch=batch)
    results, problems = {}, []
    for section, share in (("lavis", 0.35), ("ours", 1.0)):
        out_dir = ctx.work / f"bench-{section}"
        try:
            ctx.run(bench_command(ctx.scale, ctx.device, section, batch, out_dir), timeout=share * ctx.remaining())
        except (CommandFailed, CommandTimeout) as err:
            ctx.numbers[f"{section}_error"] = str(err)[-2000:]
            problems.append(f"{section}: {str(err).splitlines()[0]}")
            continue
        (written,) = sorted(out_dir.glob("*.json"))
        ctx.artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, ctx.artifacts / f"bench-{section}.json")
        results[section] = json.loads(written.read_text())
    ours = bench_rows(results["ours"], True) if "ours" in results else {}
    lavis = bench_rows(results["lavis"], False) if "lavis" in results else {}
    for task in BENCH_TASKS:
        entry = {}
        for side, rows in (("ours", ours), ("lavis", lavis)):
            row = rows.get(task)
            if row is None:
                continue
            entry[f"{side}_variant"] = row["variant"]
            entry[f"{side}_ms"] = row["median_s"] * 1e3
            entry[f"{side}_images_per_s"] = row["images_per_s"]
            entry[f"{side}_peak_memory_growth_gb"] = (row.get("peak_memory_growth_bytes") or 0) / 1e9
            decode = row.get("decode", {})
            if decode.get("status") == "ok":
                entry[f"{side}_decode_step_ms"] = decode["step_ms"]
                entry[f"{side}_decode_step_vs_floor"] = decode["step_vs_floor"]
        if "ours_ms" in entry and "lavis_ms" in entry:
            entry["ours_time_vs_lavis"] = entry["ours_ms"] / entry["lavis_ms"]
        ctx.numbers[task] = entry
    for section, rows in (("ours", ours), ("lavis", lavis)):
        if section in results and set(rows) != set(BENCH_TASKS):
            problems.append(f"{section}: no result for {sorted(set(BENCH_TASKS) - set(rows))} (see the bench JSON)")
    if problems:
        raise CheckFailed("; ".join(problems))
    step, vqa = ctx.numbers["train_step"], ctx.numbers["vqa"]
    return (
        f"batch {batch}: step ours {step['ours_ms']:.1f} ms vs LAVIS {step['lavis_ms']:.1f} "
        f"({step['ours_time_vs_lavis']:.2f}x); VQA {1 / vqa['ours_time_vs_lavis']:.2f}x LAVIS's img/s"
    )


# --- the table ----------------------------------------------------------------------------------------


def _uses_amp(device: str) -> list:
    return [
        train_command(device, "<work>/amp_fp16_nan"),
        ConfigWithOptions(TINY_STAGE2, train_command(device, "<work>/amp_fp16_nan").args[3:]),
        Uses("blip2_internlm._entry.setup"),
        Uses("blip2_internlm._entry.build"),
        Uses("blip2_internlm.runner.ReliableRunner.train"),
        Uses("blip2_internlm.runner.Progress", ("scaler_skips", "nonfinite_steps")),
    ]


def _uses_bf16(device: str) -> list:
    return [
        ModelOverrides((("autocast_dtype", "bf16"),)),
        ModelOverrides((("autocast_dtype", "off"),)),
        Uses("blip2_internlm.tools.plan_validation.lavis_adamw"),
        Uses("blip2_internlm.tools.measure.measure_steps"),
    ]


def _uses_qlora(device: str) -> list:
    return [
        Uses("blip2_internlm.factory.build_model"),
        Uses("blip2_internlm.models.builders.four_bit_loading"),
        Uses("blip2_internlm.models.lora.lora_layers"),
        Uses("blip2_internlm.tools.plan_validation.lavis_adamw"),
    ]


def _uses_compiled(device: str) -> list:
    return [
        ModelOverrides((("decode_compile", True),)),
        ModelOverrides((("decode_compile", False),)),
        Uses("blip2_internlm.models.blip2_internlm.Blip2InternLM.generate"),
    ]


def _uses_feature_cache(device: str) -> list:
    return [
        ConfigWithOptions(TINY_STAGE2, feature_cache_options(device, "<work>", "fp32")),
        Uses("blip2_internlm.feature_cache.apply_feature_cache"),
        Uses("blip2_internlm.feature_cache.CachedFeatures"),
    ]


def _uses_export(device: str) -> list:
    return [
        export_command("<work>/export/hf", "<work>/export/stage2.pth"),
        Uses("blip2_internlm.checkpoint.save_checkpoint_file"),
        Uses("transformers.Blip2ForConditionalGeneration.from_pretrained"),
        Uses("transformers.AutoProcessor.from_pretrained"),
    ]


def _uses_plan(device: str) -> list:
    scale = SCALES[device]
    return [
        plan_measure_command(scale, device),
        plan_measure_command(scale, device, "<planner's largest batch for min(24 GiB, free)>"),
        Uses("blip2_internlm.tools.plan.make_plan"),
    ]


def _uses_bench(device: str) -> list:
    scale = SCALES[device]
    batch = f"<planner's batch for {PLANNER_GPU_GIB:g} GiB>"
    return [
        bench_command(scale, device, "lavis", batch, "<work>/bench-lavis"),
        bench_command(scale, device, "ours", batch, "<work>/bench-ours"),
        Uses("blip2_internlm.tools.bench.SECTIONS", ("ours", "lavis")),
        Uses("blip2_internlm.tools.plan.make_plan"),
    ]


#: Budget of the preparation (asset generation on a fresh machine; seconds when cached).
PREPARE_BUDGET_S = 35.0

#: The checks, in the order they run.
CHECKS: tuple[Check, ...] = (
    Check(
        "amp_fp16_nan",
        30,
        "tiny stage-2 training with run.amp (fp16 autocast + GradScaler): a NaN gradient step is skipped and counted",
        check_amp_fp16_nan,
        _uses_amp,
    ),
    Check(
        "bf16_step",
        15,
        "a bf16-autocast training step of the tiny model: finite loss, gradients on the trainable parameters only",
        check_bf16_step,
        _uses_bf16,
    ),
    Check(
        "qlora_step",
        20,
        "the tiny instruction model with QLoRA (4-bit NF4 base, LoRA adapters): one finite step on the adapters only",
        check_qlora_step,
        _uses_qlora,
    ),
    Check(
        "compiled_decode",
        65,
        "model.generate with the static decoding loop compiled gives the eager tokens (greedy, beam 3)",
        check_compiled_decode,
        _uses_compiled,
    ),
    Check(
        "feature_cache_gpu",
        20,
        "the frozen-ViT feature cache built on the GPU gives the training loss the images give",
        check_feature_cache_gpu,
        _uses_feature_cache,
    ),
    Check(
        "export_gpu",
        35,
        "the transformers export of a tiny checkpoint, loaded by plain transformers on the GPU, captions like ours",
        check_export_gpu,
        _uses_export,
    ),
    Check(
        "plan_measure_real",
        70,
        "plan --measure at real size (InternLM2-1.8B stage 2, random weights) against the planner's prediction",
        check_plan_measure_real,
        _uses_plan,
    ),
    Check(
        "bench_real",
        175,
        "bench --size real at the planner's batch for 24 GiB: our default against LAVIS's Blip2OPT",
        check_bench_real,
        _uses_bench,
    ),
)


# --- running the checks and the report ----------------------------------------------------------------------


def run_one(name: str, budget_s: float, fn: Callable[[Context], str | None], ctx: Context) -> dict:
    """Run one check against its budget; whatever happens, its entry for the report."""
    ctx.numbers = {}
    start = time.monotonic()
    ctx.deadline = start + budget_s
    entry = {"name": name, "budget_s": budget_s}
    try:
        with time_limit(budget_s):
            summary = fn(ctx)
        entry.update(status="passed", summary=summary or "")
    except (BudgetExceeded, CommandTimeout) as err:
        entry.update(status="timeout", summary=f"timed out: {err}", error=f"{type(err).__name__}: {err}")
        entry["traceback"] = _traceback_tail()
    except CheckFailed as err:
        entry.update(status="failed", summary=str(err), error=f"CheckFailed: {err}")
        entry["traceback"] = _traceback_tail()
    except (Exception, SystemExit) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        entry.update(status="failed", summary=f"{type(err).__name__}: {first}", error=f"{type(err).__name__}: {err}")
        entry["traceback"] = _traceback_tail()
    entry["seconds"] = round(time.monotonic() - start, 2)
    entry["numbers"] = _plain(ctx.numbers)
    with contextlib.suppress(Exception):
        free_cuda_memory()
    return entry


def _traceback_tail(lines: int = 25) -> str:
    return "\n".join(traceback.format_exc().rstrip().splitlines()[-lines:])


def _plain(value):
    """Numbers and containers as JSON holds them (tensors, paths and other objects as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def describe_machine(device: str) -> dict:
    """The card (or the CPU of a rehearsal), torch, CUDA and the rest of the stack; ``slug`` names the files."""
    import torch

    from blip2_internlm.tools.bench import machine_info

    info = machine_info(device)
    info.update(device=device, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(
            card=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(properties.total_memory / GiB, 2),
            compute_capability=f"{properties.major}.{properties.minor}",
            gpu_count=torch.cuda.device_count(),
        )
        info["slug"] = slug(info["card"])
    else:
        info["card"] = f"CPU rehearsal ({info.get('cpu', 'cpu')})"
        info["slug"] = "cpu-rehearsal"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
    return info


def report_stem(machine: dict, started: _dt.datetime) -> str:
    """``<card>-<YYYYMMDD-HHMMSS>``: the name of the report's files."""
    return f"{machine['slug']}-{started:%Y%m%d-%H%M%S}"


def run_checks(
    checks: Sequence[Check],
    ctx: Context,
    out_dir,
    machine: dict,
    prepare_step: Callable | None = None,
    started: _dt.datetime | None = None,
) -> tuple[int, dict, Path, Path]:
    """Run ``checks`` in order (``prepare_step`` first, if given), rewriting the report after each;
    return (exit code, report, JSON path, Markdown path).  Exit code 0 only if every check passed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = started or _dt.datetime.now()
    stem = report_stem(machine, started)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    ctx.artifacts = out_dir / stem
    factor = 1.0 if ctx.cuda else REHEARSAL_BUDGET_FACTOR
    report = {
        "tool": "python -m blip2_internlm.tools.gpu_check",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "rehearsal": not ctx.cuda,
        "total_budget_s": TOTAL_BUDGET_S * factor,
        "prepare": None,
        "checks": [],
    }
    clock = time.monotonic()
    if prepare_step is not None:
        print(f"== prepare (budget {PREPARE_BUDGET_S * factor:.0f} s)", flush=True)
        report["prepare"] = run_one("prepare", PREPARE_BUDGET_S * factor, prepare_step, ctx)
        print(f"   {report['prepare']['status']}: {report['prepare']['summary']}", flush=True)
    for index, check in enumerate(checks, 1):
        budget = check.budget_s * factor
        print(f"== [{index}/{len(checks)}] {check.name} (budget {budget:.0f} s): {check.description}", flush=True)
        entry = run_one(check.name, budget, check.run, ctx)
        entry["description"] = check.description
        report["checks"].append(entry)
        print(f"   {entry['status']} in {entry['seconds']:.1f} s: {entry['summary']}", flush=True)
        if entry["status"] != "passed" and entry.get("traceback"):
            print(textwrap_indent(entry["traceback"], "     | "), flush=True)
        _finish(report, clock)
        write_report(report, json_path, md_path)
    _finish(report, clock)
    write_report(report, json_path, md_path)
    return report["exit_code"], report, json_path, md_path


def textwrap_indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _finish(report: dict, clock: float) -> None:
    statuses = [entry["status"] for entry in report["checks"]]
    report["seconds"] = round(time.monotonic() - clock, 1)
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["passed"] = sum(status == "passed" for status in statuses)
    report["exit_code"] = 0 if statuses and all(status == "passed" for status in statuses) else 1
    report["readme_lines"] = readme_lines(report)


def _numbers(report: dict, name: str) -> dict:
    return next((entry["numbers"] for entry in report["checks"] if entry["name"] == name), {})


def readme_lines(report: dict) -> list[str]:
    """Rows for the README's GPU table and docs/plan.md's validation table, and a one-line summary."""
    machine = report["machine"]
    card, date = machine.get("card", "?"), report["started"][:10]
    stack = f"torch {machine.get('torch', '?')}, CUDA {machine.get('cuda') or '-'}"
    lines = []
    bench = _numbers(report, "bench_real")
    step, vqa = bench.get("train_step", {}), bench.get("vqa", {})
    if "ours_time_vs_lavis" in step and "ours_time_vs_lavis" in vqa:
        lines.append(
            f"| {card}, {bench['size']} size, batch {bench['batch']} (planner's for {PLANNER_GPU_GIB:g} GiB), "
            f"{date}, {stack} "
            f"| {step['lavis_ms']:.1f} | {step['ours_ms']:.1f} ({step['ours_time_vs_lavis']:.2f}x) "
            f"| {1 / vqa['ours_time_vs_lavis']:.2f}x | {step['ours_peak_memory_growth_gb']:.1f} GB "
            f"(LAVIS {step['lavis_peak_memory_growth_gb']:.1f} GB) |"
        )
    plan = _numbers(report, "plan_measure_real")
    for label, row in plan.items():
        if isinstance(row, dict) and "measured_gib" in row:
            lines.append(
                f"| {Path(plan['config']).stem}, the config's precision, {label}, {card} ({date}, {stack}) "
                f"| {row['batch']} | {row['measured_gib']:.2f} | {row['reserved_gib']:.2f} "
                f"| {row['predicted_gib']:.2f} | {row['error']:+.1%} |"
            )
    results = ", ".join(f"{entry['name']} {entry['status']}" for entry in report["checks"])
    lines.append(
        f"GPU checks on {card}, {date} ({stack}): {report.get('passed', 0)}/{len(report['checks'])} passed ({results})"
    )
    return lines


def write_report(report: dict, json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps(_plain(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(report), encoding="utf-8")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# GPU check: {machine.get('card', '?')}, {report['started']}",
        "",
        f"torch {machine.get('torch')}, CUDA {machine.get('cuda')}, transformers {machine.get('transformers')}, "
        f"Python {machine.get('python')}, commit {machine.get('commit', '?')}; "
        f"{report.get('passed', 0)} of {len(report['checks'])} checks passed in {report.get('seconds', 0):.0f} s "
        f"(budget {report['total_budget_s']:.0f} s)"
        + (" -- a CPU rehearsal, not a GPU result" if report["rehearsal"] else ""),
        "",
        "| # | check | status | seconds (budget) | result |",
        "|---|---|---|---|---|",
    ]
    for index, entry in enumerate(report["checks"], 1):
        lines.append(
            f"| {index} | {entry['name']} | {entry['status']} | {entry['seconds']:.1f} ({entry['budget_s']:.0f}) "
            f"| {_cell(entry['summary'])} |"
        )
    failures = [entry for entry in report["checks"] if entry["status"] != "passed"]
    for entry in failures:
        lines += [
            "",
            f"## {entry['name']}: {entry['status']}",
            "",
            "```",
            entry.get("error", ""),
            "",
            entry.get("traceback", ""),
            "```",
        ]
    lines += ["", "## Lines for the README's GPU table (and docs/plan.md's validation table)", "", "```"]
    lines += report.get("readme_lines", [])
    lines += ["```", ""]
    return "\n".join(lines)


# --- --dry-run ------------------------------------------------------------------------------------------------


def dry_run(checks: Sequence[Check], device: str) -> int:
    """List the checks and what each runs; verify every reference.  0 if all exist, 1 otherwise."""
    factor = 1.0 if device == "cuda" else REHEARSAL_BUDGET_FACTOR
    total = (STARTUP_ALLOWANCE_S + PREPARE_BUDGET_S + sum(check.budget_s for check in checks)) * factor
    limit = TOTAL_BUDGET_S * factor
    print(
        f"make gpu-check on {device}: {len(checks)} checks, {total:.0f} s with the start-up and the preparation "
        f"(limit {limit:.0f} s)"
    )
    print(
        f" 0. prepare ({PREPARE_BUDGET_S * factor:.0f} s): generate the tiny assets, shapes data and bench directories"
    )
    missing = []
    for index, check in enumerate(checks, 1):
        print(f" {index}. {check.name} ({check.budget_s * factor:.0f} s): {check.description}")
        for reference in check.uses(device):
            problems = reference.problems()
            print(f"      {'MISSING' if problems else 'ok     '} {reference.shown()}")
            for problem in problems:
                print(f"              {problem}")
            missing += problems
    if total > TOTAL_BUDGET_S * factor:
        missing.append(f"the budgets add up to {total:.0f} s, over the {TOTAL_BUDGET_S * factor:.0f} s limit")
    print(f"{len(missing)} problem(s)" + ("" if not missing else ":\n  " + "\n  ".join(missing)))
    return 1 if missing else 0


def select(checks: Sequence[Check], only: str | None) -> list[Check]:
    if not only:
        return list(checks)
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = [check.name for check in checks]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--only: unknown check(s) {', '.join(unknown)}; the checks: {', '.join(known)}")
    return [check for check in checks if check.name in names]


class _Tee(io.TextIOBase):
    """Writes to a stream and to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def fileno(self):
        return self.stream.fileno()

    def isatty(self):
        return self.stream.isatty()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("output/gpu-check"), help="where the report goes")
    parser.add_argument("--only", help="comma-separated check names, run in the table's order (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and verify what they use; run nothing")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: rehearse the checks at test sizes (no GPU result)",
    )
    args = parser.parse_args(argv)
    try:
        checks = select(CHECKS, args.only)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        return dry_run(checks, args.device)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    machine = describe_machine(args.device)
    print(f"gpu-check on {machine['card']}: torch {machine['torch']}, CUDA {machine['cuda']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = _dt.datetime.now()
    log_path = args.out / f"{report_stem(machine, started)}.log"
    ctx = Context(args.device, work, args.out, log_path)
    with open(log_path, "a", encoding="utf-8") as log:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
        try:
            code, report, json_path, md_path = run_checks(checks, ctx, args.out, machine, prepare, started)
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_markdown(report))
    print(f"wrote {json_path}, {md_path} and {log_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
