"""Experiment tracking: the training runner's scalars sent to TensorBoard and Weights & Biases.

LAVIS writes ``log.txt`` only (one line per epoch).  ``run.report_to`` names the trackers a run
also logs to; ``open_tracker`` builds them from ``TrackingSettings`` on rank 0 and a ``Tracker``
that does nothing on every other rank (they create no writer and no file).  The runner calls
``log_scalars(step, {name: value})`` with its global step (iterations trained since the run
began, continued by a resumed run), ``flush()`` at its log points and ``close()`` at the end.
What is logged, and under which names: docs/tracking.md.

A backend whose package is missing, or wandb without a login while online, is a
``TrackingError`` at start (``check_backends``), naming ``run.report_to`` and what to do.
"""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from blip2_internlm.settings import Kind, Nullable, Text, setting

logger = logging.getLogger(__name__)

#: The trackers ``run.report_to`` may name, and the package each one needs.
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: The project of a wandb run when neither ``run.wandb_project`` nor ``$WANDB_PROJECT`` names one.
DEFAULT_WANDB_PROJECT = "blip2-internlm"
#: The pip command that installs every tracker's package (the package's ``track`` extra).
INSTALL_HINT = "pip install 'blip2-internlm[track]'"


class Backends(Kind):
    """One tracker name or a list of them; ``none``, null or an empty list: no tracker."""

    expected = "a tracker name or a list of them, among " + ", ".join(BACKENDS) + " (or none)"

    def accepts(self, value) -> bool:
        if value is None:
            return True
        if isinstance(value, str):
            value = [value]
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    def inner_problems(self, key, value) -> list[str]:
        unknown = [name for name in self.cast(value) if name not in BACKENDS]
        if not unknown:
            return []
        known = ", ".join(BACKENDS)
        return [f"{key} = {value!r}: unknown tracker {', '.join(map(repr, unknown))}; known: {known} (or none)"]

    def cast(self, value):
        names = [value] if isinstance(value, str) else list(value or ())
        return tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip().lower() != "none"))


@dataclass(frozen=True)
class TrackingSettings:
    """The `run:` keys of experiment tracking (docs/tracking.md): what the training runner logs to,
    from rank 0 only, besides LAVIS's `log.txt`."""

    report_to: tuple = setting(
        (), Backends(), "trackers the run logs to: tensorboard (the job directory's tensorboard/), wandb; empty: none"
    )
    wandb_project: str | None = setting(
        None, Nullable(Text()), f"W&B project; null: $WANDB_PROJECT, else {DEFAULT_WANDB_PROJECT}"
    )


class TrackingError(RuntimeError):
    """A tracker ``run.report_to`` names cannot be used on this machine."""


# --- the trackers ------------------------------------------------------------------------


class Tracker:
    """Where a run's scalars go.  This base class drops them: it is the tracker of every rank but 0
    and of a run that reports to nothing."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` ({name: number}) at global ``step``."""

    def flush(self) -> None:
        """Write what is buffered, so a crash loses little."""

    def close(self) -> None:
        """Flush and release the writer; logging after this is an error of the caller."""


class TensorBoardTracker(Tracker):
    """A ``SummaryWriter`` on ``log_dir``; with ``purge_step``, TensorBoard drops the events of an
    earlier writer of that directory at or past it (the steps a killed run trained past its checkpoint)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One wandb run per job: named by the job id, the run's whole config as its config, its files
    under ``directory``; ``$WANDB_MODE`` (``offline``, ``disabled``) is wandb's own to read."""

    def __init__(self, project: str, name: str, config: dict, directory: Path):
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, config=config, dir=str(directory))

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """Several trackers fed the same scalars."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(step, scalars)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


# --- building them -----------------------------------------------------------------------


def wandb_project(settings: TrackingSettings) -> str:
    return settings.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT


def wandb_logged_in() -> bool:
    """An API key in the environment, an identity-token file, or ``wandb login``'s netrc entry for
    the W&B host (``$WANDB_BASE_URL``, default api.wandb.ai); read without the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def check_backends(settings: TrackingSettings) -> None:
    """Raise ``TrackingError`` if a tracker of ``run.report_to`` has no package here, or wandb would
    have to ask for a login (online, no key): a run must never stop at a prompt."""
    found = []
    for name in settings.report_to:
        module = "torch.utils.tensorboard" if name == "tensorboard" else BACKENDS[name]
        try:
            __import__(module)
        except ImportError as error:
            found.append(
                f"run.report_to names {name}, but its package is not installed ({error}): "
                f"{INSTALL_HINT} (or pip install {BACKENDS[name]})"
            )
    mode = os.environ.get("WANDB_MODE", "").lower()
    if "wandb" in settings.report_to and mode not in ("offline", "disabled", "dryrun") and not wandb_logged_in():
        found.append(
            "run.report_to names wandb, but no W&B login was found and WANDB_MODE is not offline: run `wandb login` "
            "or set WANDB_API_KEY; or set WANDB_MODE=offline and upload later with `wandb sync <job dir>/wandb`"
        )
    if found:
        raise TrackingError("\n".join(found))


def open_tracker(
    settings: TrackingSettings,
    *,
    job_dir: Path,
    job_id: str,
    config: dict,
    start_step: int = 0,
    main_process: bool = True,
) -> Tracker:
    """The trackers of ``run.report_to`` for the job in ``job_dir``, on rank 0 (``main_process``);
    on every other rank, or with no tracker named, a ``Tracker`` that drops everything.
    ``start_step``: the global step a resumed run starts from (its logs continue the numbering)."""
    if not (main_process and settings.report_to):
        return Tracker()
    check_backends(settings)
    trackers: list[Tracker] = []
    for name in settings.report_to:
        if name == "tensorboard":
            tracker = TensorBoardTracker(Path(job_dir) / "tensorboard", purge_step=start_step or None)
            logger.info("TensorBoard log: %s (tensorboard --logdir %s)", tracker.log_dir, Path(job_dir).parent)
        else:
            tracker = WandbTracker(wandb_project(settings), job_id, config, Path(job_dir))
        trackers.append(tracker)
    return trackers[0] if len(trackers) == 1 else Trackers(trackers)


def scalars(prefix: str, values: dict) -> dict[str, float]:
    """``{prefix/name: number}`` from a stats or metrics mapping: numbers and numeric strings (LAVIS
    formats the epoch stats as text) kept, nested mappings flattened (``prefix/a/b``), the rest dropped."""
    found = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            found.update(scalars(name, value))
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        try:
            found[name] = float(value)
        except (TypeError, ValueError):
            continue
    return found
