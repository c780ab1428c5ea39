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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

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


def load_checkpoint_file(path, map_location="cpu", allow_unsafe: bool | None = None) -> dict:
    """Read a ``.pth``/``.bin``/``.safetensors`` file without executing pickled code.

    ``allow_unsafe`` (or ``$BLIP2_INTERNLM_ALLOW_UNSAFE_CHECKPOINTS=1``) falls back to full
    unpickling for checkpoints from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not unsafe_loading_allowed(allow_unsafe):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it was not "
                f"unpickled (that could run arbitrary code). If you trust its source, set "
                f"{UNSAFE_ENV}=1 (or pass allow_unsafe=True / run.allow_unsafe_checkpoints: true). "
                f"Detail: {str(err).splitlines()[0]}"
            ) from None
        logger.warning("Unpickling %s with weights_only=False (explicit opt-in).", path)
        return torch.load(path, map_location=map_location, weights_only=False)


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
