"""Stable integer image ids for image-text contrastive (ITC) positives.

Stage-1 ITC marks as positives all pairs whose ``image_id`` is equal across the global
batch, so ids must be integers that agree on every rank.  Caption datasets return string
ids (``"coco_123456"``, ``"vg_1"``, ``"shapes_train_00001"``) or ints; Python's ``hash`` is
salted per process, so strings are hashed with BLAKE2b instead.

Non-negative ints below 2**62 keep their value; every other id (strings, negatives, huge
ints, tuples) is hashed into [2**62, 2**63), so a hashed id never equals a plain int id.
Two distinct strings collide with probability about n**2 / 2**63.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable

import torch

_HASHED_BASE = 1 << 62


def stable_image_id(image_id: Hashable) -> int:
    if isinstance(image_id, torch.Tensor):
        image_id = image_id.item()
    if isinstance(image_id, bool):
        raise TypeError(f"image_id must be a string or an int, got the bool {image_id!r}")
    if isinstance(image_id, int) and 0 <= image_id < _HASHED_BASE:
        return image_id
    if isinstance(image_id, float) and image_id.is_integer():
        return stable_image_id(int(image_id))
    key = f"{type(image_id).__name__}:{image_id!r}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return _HASHED_BASE + digest % _HASHED_BASE


def image_ids_to_tensor(image_ids: Iterable[Hashable] | torch.Tensor, device=None) -> torch.Tensor:
    """A batch of ids (a tensor, or a list of str/int) as an int64 tensor of shape (B,)."""
    if isinstance(image_ids, torch.Tensor) and not image_ids.is_floating_point():
        return image_ids.to(device=device, dtype=torch.long).view(-1)
    ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
    return torch.tensor([stable_image_id(i) for i in ids], dtype=torch.long, device=device)
