"""``fix`` makes a fix idempotent and records it with its reason; ``applied()`` lists those in force.

Apart from the package that applies every fix, so that the modules defining fixes (some of which
the models use) need not import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

_APPLIED: dict[str, str] = {}


def fix(func: Callable[[], None]) -> Callable[[], None]:
    """Make a fix idempotent and record it by name with its one-line reason."""

    @functools.wraps(func)
    def apply_once():
        if func.__name__ not in _APPLIED:
            func()
            _APPLIED[func.__name__] = (func.__doc__ or "").strip().splitlines()[0]

    return apply_once


def applied() -> dict[str, str]:
    return dict(_APPLIED)
