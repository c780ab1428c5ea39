"""Safe checkpoint loading with key reporting.

LAVIS loads every checkpoint with a bare ``torch.load`` (arbitrary unpickling) and
``load_state_dict(strict=False)`` (missing keys silently ignored).  Here a checkpoint is
read with ``weights_only=True`` (or from ``.safetensors``), unpickling anything else is an
explicit opt-in, and every load reports what it left out.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def load_checkpoint_file(path, map_location="cpu", allow_unsafe: bool | None = None) -> dict:
    """Read a ``.pth``/``.bin``/``.safetensors`` file without executing pickled code.

    A missing, empty, truncated or foreign file is a ``CheckpointError`` that names the file
    and says which.  ``allow_unsafe`` (or ``$BLIP2_INTERNLM_ALLOW_UNSAFE_CHECKPOINTS=1``) falls
    back to full unpickling for checkpoints from a source you trust; it is never suggested
    for a file that is merely broken.
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
        return torch.load(path, map_location=map_location, weights_only=True)
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
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


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
