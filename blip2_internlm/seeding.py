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
