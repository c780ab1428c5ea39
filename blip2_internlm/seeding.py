"""Seeds derived from names and numbers, and RNGs seeded for one block of code."""

import contextlib
import hashlib
import random

import numpy as np
import torch


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts``, the same in every process (unlike ``hash``)."""
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def run_seed(base: int, rank: int, epoch: int | None = None) -> int:
    """The seed of a training process: ``run.seed``, plus the rank (ranks draw differently), plus
    1000 per epoch when seeding an epoch, so that epoch k draws the same in a run resumed at k as in
    one that got there itself."""
    return int(base) + int(rank) + (0 if epoch is None else 1000 * int(epoch))


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (numpy takes 32 bits)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Python, numpy and torch (CPU) RNGs seeded for the block, the caller's states restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
