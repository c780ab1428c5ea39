"""Load errors that name the checkpoint file at fault."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class InternLM2CheckpointError(OSError):
    """A checkpoint directory that cannot be loaded as an InternLM2 model."""


def weight_files(directory: str) -> list[str]:
    """The weight files a checkpoint directory offers (indexes first, then single files)."""
    return [
        os.path.join(directory, name)
        for name in (*WEIGHT_INDEXES, *WEIGHT_FILES)
        if os.path.isfile(os.path.join(directory, name))
    ]


def tensor_locations(directory: str, names: Iterable[str]) -> dict[str, str]:
    """Map tensor names to the file that holds (or, per the index, should hold) them."""
    names = list(names)
    for index in WEIGHT_INDEXES:
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map", {})
            except (OSError, ValueError):
                continue
            return {n: os.path.join(directory, weight_map[n]) for n in names if n in weight_map}
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return {n: path for n in names}
    return {}


def _checkpoint_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, file) for every readable weight file of the directory."""
    files = []
    for index in WEIGHT_INDEXES:
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                files += sorted({os.path.join(directory, s) for s in json.load(f).get("weight_map", {}).values()})
    files = files or [p for p in weight_files(directory) if not p.endswith(".json")]
    shapes = {}
    for path in files:
        if not os.path.isfile(path):
            continue
        try:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        shapes[name] = (tuple(f.get_slice(name).get_shape()), path)
            else:
                import torch

                state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
                shapes.update({n: (tuple(t.shape), path) for n, t in state.items()})
        except Exception:  # an unreadable file is reported by the original error
            continue
    return shapes


def shape_mismatches(directory: str, model_cls, config) -> list[str]:
    """Tensors whose shape in the checkpoint differs from what config.json implies."""
    import torch

    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in model_cls(config).state_dict().items()}
    prefix = getattr(model_cls, "base_model_prefix", "model") + "."
    found = []
    for name, (shape, path) in sorted(_checkpoint_shapes(directory).items()):
        want = expected.get(name, expected.get(name[len(prefix) :] if name.startswith(prefix) else None))
        if want is not None and want != shape:
            found.append(f"{name} is {list(shape)} in {path} but config.json implies {list(want)}")
    return found


def _missing_shards(directory: str) -> list[str]:
    missing = []
    for index in WEIGHT_INDEXES:
        path = os.path.join(directory, index)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        except (OSError, ValueError):
            missing.append(f"{path} (unreadable index)")
            continue
        missing += [
            f"{os.path.join(directory, s)} (listed in {index})"
            for s in shards
            if not os.path.isfile(os.path.join(directory, s))
        ]
    return missing


def describe_load_failure(
    directory: str,
    err: BaseException | None,
    missing: list[str] | None = None,
    model_cls=None,
) -> str:
    lines = [f"Cannot load InternLM2 checkpoint {os.path.abspath(directory)}:"]
    absent = _missing_shards(directory)
    if absent:
        lines.append("missing shard file(s): " + ", ".join(absent))
    if missing:
        where = tensor_locations(directory, missing)
        files = sorted(set(where.values())) or weight_files(directory)
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        lines.append(
            f"parameters absent from {', '.join(files) or 'the weight files'}: {shown} "
            "(pass allow_missing_weights=True to random-initialise them)"
        )
    if err is not None:
        text = str(err)
        mismatched = []
        if model_cls is not None and "mismatch" in text:
            try:
                config = model_cls.config_class.from_pretrained(directory)
                mismatched = shape_mismatches(directory, model_cls, config)
            except Exception:  # diagnostics must not hide the original error
                mismatched = []
        if mismatched:
            lines.append("shape mismatch: " + "; ".join(mismatched))
        elif not absent:
            files = weight_files(directory)
            lines.append(f"weight files: {', '.join(files) if files else 'none found'}")
        lines.append(f"{type(err).__name__}: {text}")
    return "\n".join(lines)
