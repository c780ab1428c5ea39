"""Checkpoints: safe loading with key reporting, atomic saving, and a training run's checkpoints.

LAVIS loads every checkpoint with a bare ``torch.load`` (arbitrary unpickling) and
``load_state_dict(strict=False)`` (missing keys silently ignored).  Here a checkpoint is
read with ``weights_only=True`` (or from ``.safetensors``), unpickling anything else is an
explicit opt-in, and every load reports what it left out.  ``CheckpointManager`` owns a
training run's checkpoints (save, load, find the newest, prune, the best); the runner only calls it.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blip2_internlm.settings import Boolean, CheckpointFile, Choice, Integer, Nullable, Number, setting

logger = logging.getLogger(__name__)

#: Environment switch for trusted legacy checkpoints that pickle more than tensors.
UNSAFE_ENV = "BLIP2_INTERNLM_ALLOW_UNSAFE_CHECKPOINTS"


class CheckpointError(RuntimeError):
    """A checkpoint could not be used as asked; the message names the file."""


def unsafe_loading_allowed(allow_unsafe: bool | None = None) -> bool:
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get(UNSAFE_ENV, "0").lower() in ("1", "true", "yes")


#: Every torch.save file since PyTorch 1.6 is a zip archive; older ones are a pickle that starts
#: with protocol 2 and torch's magic number.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"


def diagnose_checkpoint_file(path) -> str | None:
    """Why ``path`` cannot be a readable PyTorch checkpoint, judged from its bytes; None if it may be.

    torch's own messages for these cases are a miniz internal error, a bare ``EOFError`` or
    advice to unpickle the file unsafely, none of which tells a user that a save was cut short.
    """
    import zipfile

    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes): truncated, or the write never started"
    with open(path, "rb") as file:
        head = file.read(len(LEGACY_TORCH_MAGIC))
    if len(head) < len(ZIP_MAGIC) and (ZIP_MAGIC.startswith(head) or LEGACY_TORCH_MAGIC.startswith(head)):
        return f"is truncated ({size} bytes, the start of a checkpoint)"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes; its zip directory is missing: the write did not finish)"
        return None
    if head.startswith(LEGACY_TORCH_MAGIC[: len(head)]):
        return None
    return f"is not a PyTorch checkpoint (it starts with {head[:8]!r})"


def load_checkpoint_file(path, map_location="cpu", allow_unsafe: bool | None = None, mmap: bool = False) -> dict:
    """Read a ``.pth``/``.bin``/``.safetensors`` file without executing pickled code.

    A missing, empty, truncated or foreign file is a ``CheckpointError`` that names the file
    and says which.  ``allow_unsafe`` (or ``$BLIP2_INTERNLM_ALLOW_UNSAFE_CHECKPOINTS=1``) falls
    back to full unpickling for checkpoints from a source you trust; it is never suggested
    for a file that is merely broken.  ``mmap``: map the tensors instead of reading them (to look at
    a checkpoint's progress without reading its weights).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    problem = diagnose_checkpoint_file(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not _legacy_pickles_complete(path):
            raise CheckpointError(f"checkpoint {path} is truncated (it ends inside its pickled header)") from None
        if not unsafe_loading_allowed(allow_unsafe):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it was not "
                f"unpickled (that could run arbitrary code). If you trust its source, set "
                f"{UNSAFE_ENV}=1 (or pass allow_unsafe=True / run.allow_unsafe_checkpoints: true). "
                f"Detail: {str(err).splitlines()[0]}"
            ) from None
        logger.warning("Unpickling %s with weights_only=False (explicit opt-in).", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    except (EOFError, RuntimeError) as err:  # a legacy pickle cut short, or a damaged zip member
        detail = str(err).splitlines()[0] if str(err) else "unexpected end of file"
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: {detail})") from None


def _legacy_pickles_complete(path: Path) -> bool:
    """Whether the pickles at the start of a pre-1.6 torch file (magic, protocol, system info,
    object) are whole; a file cut inside them makes the unpickler read a clipped class name."""
    import pickletools

    with open(path, "rb") as file:
        if file.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            return True
        file.seek(0)
        try:
            for _ in range(4):
                for _ in pickletools.genops(file):
                    pass
        except ValueError:  # "pickle exhausted before seeing STOP"
            return False
    return True


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except SafetensorError as err:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file (truncated or foreign): {err}"
        ) from None


def save_checkpoint_file(obj, path) -> Path:
    """``torch.save`` that never leaves a partial file under ``path``.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and
    replace ``path`` in one ``os.replace``; a kill or a full disk during the save leaves the
    previous file intact.  The directory is fsynced so the rename survives a power loss.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:
        temporary.unlink(missing_ok=True)
        cause = _os_error_in(err)  # torch.save reports a failed write as a RuntimeError of its zip writer
        if cause is None:
            raise
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause.strerror or cause}; any previous file there is intact"
        ) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


#: errno values by which a filesystem says it cannot fsync a directory (some network and FUSE
#: filesystems): the rename is done, only its durability across a power loss is the filesystem's.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}
_fsync_warned: set[str] = set()


def fsync_directory(directory: Path) -> None:
    """fsync ``directory`` so a rename in it survives a power loss; a filesystem that does not support
    it is logged once per directory and tolerated."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
        if str(directory) not in _fsync_warned:
            _fsync_warned.add(str(directory))
            logger.warning("%s: this filesystem cannot fsync a directory (%s); renames are not fsynced", directory, err)
    finally:
        os.close(handle)


def _os_error_in(err: BaseException | None) -> OSError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def state_dict_of(checkpoint: Mapping, path="<checkpoint>") -> Mapping[str, torch.Tensor]:
    """The model weights of a LAVIS checkpoint (``{"model": ...}``) or of a bare state dict."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict nor a LAVIS checkpoint with a 'model' state dict")
    return state


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, {len(self.missing)} model keys not in the "
            f"checkpoint{_sample(self.missing)}, {len(self.unexpected)} checkpoint keys not in the "
            f"model{_sample(self.unexpected)}"
        )


def _sample(keys: list[str], n: int = 5) -> str:
    if not keys:
        return ""
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return " (" + ", ".join(keys[:n]) + more + ")"


def load_weights(
    model: torch.nn.Module,
    path,
    *,
    required_prefixes: Iterable[str] = (),
    allow_unsafe: bool | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> LoadReport:
    """Load ``path`` into ``model`` and report what matched.

    A partial load is normal (LAVIS checkpoints omit frozen modules), but every model key
    starting with one of ``required_prefixes`` must come from the checkpoint: a stage-1
    checkpoint that leaves the Q-Former uninitialised is an error, not a warning.
    """
    if state_dict is None:
        state_dict = state_dict_of(load_checkpoint_file(path, allow_unsafe=allow_unsafe), path)
    try:
        result = model.load_state_dict(state_dict, strict=False)  # partial by design; checked below
    except RuntimeError as err:  # shape mismatches are raised even with strict=False
        raise CheckpointError(f"{path} does not fit the model: {err}") from None
    unexpected = set(result.unexpected_keys)
    report = LoadReport(
        path=str(path),
        loaded=[k for k in state_dict if k not in unexpected],
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
    )
    required = tuple(required_prefixes)
    missing_required = [k for k in report.missing if required and k.startswith(required)]
    if missing_required:
        raise CheckpointError(
            f"{path} does not initialise {len(missing_required)} required weights "
            f"(prefixes {list(required)}){_sample(missing_required)}; is it the right checkpoint?"
        )
    logger.info("Loaded %s", report.summary())
    return report


# ----------------------------------------------------------------------------- checkpoint sources


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


def required_prefixes(model, finetuned: bool = False) -> tuple:
    """Keys a pretrained (or ``finetuned``) BLIP-2 checkpoint must provide: the Q-Former and its queries, or
    what the model names (``checkpoint_required_prefixes``, ``finetuned_required_prefixes``)."""
    if finetuned and hasattr(model, "finetuned_required_prefixes"):
        return tuple(model.finetuned_required_prefixes)
    return tuple(
        getattr(
            model, "checkpoint_required_prefixes", ("Qformer.", "query_tokens") if hasattr(model, "Qformer") else ()
        )
    )


def trainable_keys(model) -> tuple:
    """Every trainable parameter's name: what a training checkpoint must give back."""
    return tuple(name for name, param in model.named_parameters() if param.requires_grad)


# ----------------------------------------------------------------------------- a training run's checkpoints


@dataclass(frozen=True)
class CheckpointSettings:
    """The ``run:`` keys of a training run's checkpoints and resume."""

    resume_ckpt_path: str | None = setting(
        None, Nullable(CheckpointFile()), "runner checkpoint to resume training from (a local file or a URL)"
    )
    resume: str | bool | None = setting(
        None,
        Nullable(Choice(False, "auto", "required")),
        "auto: from the most advanced loadable checkpoint under output_dir, or from scratch when there is none; "
        "required: the same, but none is an error",
    )
    resume_allow_config_change: bool = setting(
        False,
        Boolean(),
        "resume even when the checkpoint's config differs in keys that change the model, optimizer or data",
    )
    save_every_iters: int = setting(
        0, Nullable(Integer(0)), "also write checkpoint_last.pth every N optimizer steps inside an epoch; 0: off"
    )
    save_every_minutes: float = setting(
        0.0,
        Nullable(Number(0)),
        "also write checkpoint_last.pth inside an epoch when this many minutes passed since the last save; 0: off",
    )
    keep_last_n: int | None = setting(None, Nullable(Integer(1)), "per-epoch checkpoints kept (the newest); null: all")
    allow_unsafe_checkpoints: bool | None = setting(
        None,
        Nullable(Boolean()),
        f"load checkpoints that need pickle (trusted files only); null: ${UNSAFE_ENV} decides",
    )


LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"
EPOCH_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pth$")

#: Fault-injection hook for the specs, ``"N"``: rank 0 SIGKILLs itself during its N-th save, after
#: writing the temporary file and before it replaces the previous checkpoint.
INJECT_KILL_IN_SAVE_ENV = "BLIP2_INTERNLM_INJECT_KILL_IN_SAVE"


def rng_state() -> dict:
    """This process's RNG states as tensors and plain containers (``weights_only``-loadable)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same bytes as ``source``, atomically (a hard link where possible)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


@dataclass
class TrainingState:
    """What a training checkpoint restores: the model's trainable weights, the optimizer, the
    loss scaler; the runner's own progress and RNG states travel beside them."""

    model: torch.nn.Module  # unwrapped from DDP
    optimizer: torch.optim.Optimizer
    scaler: object | None = None  # torch.amp.GradScaler


@dataclass
class CheckpointManager:
    """The one owner of a training run's checkpoints: save (atomic, refused when weights are not
    finite), load (safe: ``weights_only``, every trainable weight required), find the newest that
    loads, prune old epoch files, and the best checkpoint.

    Files in ``directory`` (the job's output directory): ``checkpoint_last.pth`` always,
    ``checkpoint_best.pth`` (a link to the last, when it was the best), and per-epoch files named by
    ``epoch_file`` when a run has no validation split, of which ``keep_last_n`` are kept.
    """

    directory: Path
    keep_last_n: int | None = None
    allow_unsafe: bool | None = None
    epoch_file: Callable[[int], str] = "checkpoint_{}.pth".format
    last: Path | None = None  # the newest checkpoint written or resumed from in this run
    lineage: list = field(default_factory=list)  # the job directories of the runs this one resumed
    _saves: int = 0

    def save(
        self,
        state: TrainingState,
        *,
        epoch: int,
        epoch_done: bool,
        progress: dict,
        extra: dict,
        is_best: bool = False,
        per_epoch_file: bool = False,
    ) -> Path:
        """Every rank calls this (every rank's RNG states are gathered); rank 0 writes.

        As LAVIS, only trainable parameters and buffers are saved; frozen weights come from their own
        files.  ``epoch`` is the one being trained: LAVIS's resume starts at a checkpoint's ``epoch`` + 1,
        so a mid-epoch checkpoint records the epoch before it (its own ``progress`` says where it is).
        """
        from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized, is_main_process

        frozen = {name for name, param in state.model.named_parameters() if not param.requires_grad}
        obj = {"model": {k: v for k, v in state.model.state_dict().items() if k not in frozen}}
        bad = nonfinite_tensors(obj["model"])
        if bad:  # same weights on every rank, so every rank refuses alike
            raise CheckpointError(
                f"refusing to save a checkpoint at epoch {epoch}: {len(bad)} tensors are not finite "
                f"({', '.join(bad[:5])}); last good checkpoint: {self.last or 'none'}"
            )
        rng = [None] * get_world_size()
        if is_dist_avail_and_initialized():
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        last = Path(self.directory) / LAST
        if is_main_process():
            obj.update(
                optimizer=state.optimizer.state_dict(),
                scaler=state.scaler.state_dict() if state.scaler else None,
                epoch=epoch if epoch_done else epoch - 1,
                progress=progress,
                rng=rng,
                world_size=get_world_size(),
                job_dirs=[str(d) for d in [*self.lineage, Path(self.directory)]],
                **extra,
            )
            if per_epoch_file:
                self._write(obj, Path(self.directory) / self.epoch_file(epoch))
                link_or_copy(Path(self.directory) / self.epoch_file(epoch), last)
                self.prune()
            else:
                self._write(obj, last)
            if is_best:
                link_or_copy(last, Path(self.directory) / BEST)
            batches = progress.get("iters_done", 0)
            logger.info("Saved checkpoint at epoch %d, %d batches into it, to %s", epoch, batches, last)
        self.last = last
        return last

    def _write(self, obj: dict, path: Path) -> None:
        self._saves += 1
        if str(self._saves) in os.environ.get(INJECT_KILL_IN_SAVE_ENV, "").replace(" ", "").split(","):
            torch.save(obj, path.with_name(f".{path.name}.{os.getpid()}.partial"))  # what an atomic save leaves
            os.kill(os.getpid(), signal.SIGKILL)
        save_checkpoint_file(obj, path)

    def remove_stale_partials(self, directory: Path | None = None) -> list[Path]:
        """Remove the temporary files that interrupted saves of this run's job directories left
        (``.checkpoint_*.partial``, never read by any loader); rank 0, at the start and after a resume."""
        removed = []
        for path in Path(directory or self.directory).glob(".checkpoint_*.partial"):
            path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            logger.info("Removed %d partial files of interrupted saves: %s", len(removed), [p.name for p in removed])
        return removed

    def prune(self) -> None:
        """Keep the newest ``keep_last_n`` per-epoch checkpoints (all when None), counted over this job
        directory and those of the runs it resumed."""
        if self.keep_last_n is None:
            return
        found = [
            (int(m.group(1)), path)
            for directory in [*self.lineage, Path(self.directory)]
            if directory.is_dir()
            for path in directory.iterdir()
            if (m := EPOCH_CHECKPOINT.match(path.name))
        ]
        newest = sorted({number for number, _ in found})[-self.keep_last_n :]
        for number, path in found:
            if number not in newest:
                path.unlink(missing_ok=True)

    def read(self, url_or_path, map_location) -> tuple[str, dict]:
        """(local path, checkpoint) of ``run.resume_ckpt_path``, read safely."""
        path = resolve_checkpoint("run.resume_ckpt_path", url_or_path)
        return path, load_checkpoint_file(path, map_location=map_location, allow_unsafe=self.allow_unsafe)

    def restore(self, state: TrainingState, path, checkpoint: dict) -> None:
        """Weights, optimizer and scaler from ``checkpoint`` (read from ``path``) into ``state``.

        Every trainable parameter must come back, or training would silently restart it."""
        weights = state_dict_of(checkpoint, path)
        load_weights(state.model, path, required_prefixes=trainable_keys(state.model), state_dict=weights)
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        if state.scaler and checkpoint.get("scaler"):
            state.scaler.load_state_dict(checkpoint["scaler"])
        self.last = Path(path)

    def find_latest(self, map_location) -> tuple[Path, dict] | None:
        """The most advanced checkpoint under this run's output root (any job directory beside this
        one) that loads, loaded; None when there is none.

        Rank 0 chooses, by the saved progress (global step; a LAVIS checkpoint, which has none, by its
        epoch; modification time only breaks ties), and every rank loads that one file: if any rank
        cannot, all stop together.
        """
        from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process

        choice = [str(found) if is_main_process() and (found := self._most_advanced()) else None]
        if is_dist_avail_and_initialized():
            torch.distributed.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        path = Path(choice[0])
        try:
            checkpoint, problem = load_checkpoint_file(path, map_location, self.allow_unsafe), None
        except CheckpointError as err:
            checkpoint, problem = None, str(err)
        problems = [problem]
        if is_dist_avail_and_initialized():
            problems = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(problems, problem)
        failed = [(rank, text) for rank, text in enumerate(problems) if text]
        if failed:
            listed = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
            raise CheckpointError(f"run.resume: {path} was chosen on rank 0 but does not load everywhere ({listed})")
        return path, checkpoint

    def _most_advanced(self) -> Path | None:
        """Of the loadable checkpoints under the output root, the one furthest into training."""
        root = Path(self.directory).parent
        ranked = []
        for path in root.glob("*/checkpoint_*.pth"):
            if path.name == BEST:
                continue
            try:
                try:
                    peek = load_checkpoint_file(path, "cpu", self.allow_unsafe, mmap=True)
                except CheckpointError:  # a pre-1.6 file cannot be mapped: read it whole, for its own verdict
                    peek = load_checkpoint_file(path, "cpu", self.allow_unsafe)
            except CheckpointError as err:
                logger.warning("run.resume: skipping %s (%s)", path, err)
                continue
            progress = peek.get("progress") or {}
            step = progress.get("global_step", -1)
            epoch = progress.get("epoch", peek.get("epoch", -1) + 1)
            ranked.append(((step, epoch, progress.get("iters_done", 0), path.stat().st_mtime), path))
        return max(ranked, key=lambda item: item[0])[1] if ranked else None

    def adopt(self, resumed_from: Path, checkpoint: dict) -> None:
        """Make the run resumed from ``resumed_from`` this run's past (rank 0): its job directories
        become this run's (``keep_last_n`` counts over them all), the partial files of its interrupted
        saves go, and its best checkpoint is linked here, where the test phase reloads it."""
        resumed_from = Path(resumed_from)
        earlier_dirs = [Path(d) for d in checkpoint.get("job_dirs") or [resumed_from.parent]]
        self.lineage = [d for d in dict.fromkeys(earlier_dirs) if d != Path(self.directory)]
        for directory in self.lineage:
            if directory.is_dir():
                self.remove_stale_partials(directory)
        earlier = resumed_from.parent / BEST
        if earlier.is_file() and earlier.parent != Path(self.directory):
            link_or_copy(earlier, Path(self.directory) / BEST)

    def reload_best(self, model: torch.nn.Module) -> torch.nn.Module:
        """The best checkpoint's trainable weights into ``model``, for the test phase."""
        load_weights(model, Path(self.directory) / BEST, required_prefixes=trainable_keys(model))
        return model
