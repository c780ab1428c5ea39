"""Typed settings: a dataclass per owner, each field with its default, kind of value and one line of doc.

A config section (LAVIS's ``run:``, flat; or a nested table such as ``run.feature_cache``) is read
by the classes that own its keys: ``read_settings(Owner, section)`` gives an ``Owner`` with every
field set, a missing or null key taking the field's default, a value cast as its reader would (an
``Integer`` that LAVIS reads through ``int()`` accepts ``2e4``).  ``problems(prefix, section,
owners)`` checks a section against the fields of its owners at once and names each bad key, with
the closest known key for a misspelt one (``did_you_mean``, shared with the model configs).

The kinds of value follow their readers: a key that LAVIS (or this package) reads through
``float()`` or ``int()`` accepts what those accept (``init_lr: "3e-3"``, ``max_iters: 2e4``); a key
used as it is (``batch_size_train``, ``warmup_lr``) must already be a number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path


def did_you_mean(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a misspelt ``key``, if one is close enough."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    return close[0] if close else None


# --- kinds of value ------------------------------------------------------------------------


class Kind:
    """What a setting's value must be: ``accepts`` its shape, ``expected`` in words; a mapping's
    entries are checked one by one (``inner_problems``), so each bad entry is named."""

    expected = ""

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def inner_problems(self, key: str, value) -> list[str]:
        return []

    def problems(self, key: str, value) -> list[str]:
        if not self.accepts(value):
            return [f"{key} = {value!r}: expected {self.expected}"]
        return self.inner_problems(key, value)

    def cast(self, value):
        """An accepted value as its reader takes it."""
        return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(lowest, highest, lowest_open: bool) -> str:
    if lowest is not None and highest is not None:
        return f" in {'(' if lowest_open else '['}{lowest}, {highest}]"
    if lowest is not None:
        return f" {'>' if lowest_open else '>='} {lowest}"
    return ""


class Integer(Kind):
    """``cast``: the reader calls ``int()``, so ``2e4`` (a float to YAML) and ``"8"`` are fine."""

    def __init__(self, lowest=None, cast=False):
        self.lowest, self.cast_value = lowest, cast
        self.expected = "an integer" + _bounds(lowest, None, False)

    def accepts(self, value) -> bool:
        if self.cast_value and _is_number(value) and float(value).is_integer():
            value = int(value)
        elif self.cast_value and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                return False
        return _is_int(value) and (self.lowest is None or value >= self.lowest)

    def cast(self, value):
        return int(float(value)) if isinstance(value, float) else int(value)


class Number(Kind):
    """``cast``: the reader calls ``float()``, so a quoted ``"3e-3"`` is fine, as in LAVIS."""

    def __init__(self, lowest=None, highest=None, lowest_open=False, cast=True):
        self.lowest, self.highest, self.lowest_open, self.cast_value = lowest, highest, lowest_open, cast
        self.expected = "a number" + _bounds(lowest, highest, lowest_open)
        if not cast:
            self.expected += ", unquoted (it is used without float())"

    def accepts(self, value) -> bool:
        if self.cast_value and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        if not _is_number(value):
            return False
        if self.lowest is not None and (value <= self.lowest if self.lowest_open else value < self.lowest):
            return False
        return self.highest is None or value <= self.highest

    def cast(self, value):
        return float(value) if self.cast_value else value


class Boolean(Kind):
    # a quoted "false" is truthy wherever LAVIS tests the value, so strings are refused
    expected = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


def _yaml(value) -> str:
    """``value`` as a config spells it."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else repr(value)


class Choice(Kind):
    def __init__(self, *options):
        self.options = options
        self.expected = "one of " + ", ".join(_yaml(o) for o in options)

    def accepts(self, value) -> bool:
        # type-checked: False == 0 and True == 1 would let a number through
        return any(value == o and type(value) is type(o) for o in self.options)


class Text(Kind):
    def __init__(self, empty=False):
        self.empty = empty
        self.expected = "a string" if empty else "a non-empty string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (self.empty or value != "")


class Splits(Kind):
    # a bare string would be iterated character by character
    expected = "a list of split names, e.g. [train]"

    def accepts(self, value) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)

    def cast(self, value):
        return tuple(value)


class Signals(Kind):
    """A list of signal names this platform has, e.g. [SIGTERM, SIGUSR1]; empty: none handled."""

    expected = "a list of signal names, e.g. [SIGTERM, SIGUSR1]"

    def accepts(self, value) -> bool:
        import signal

        return isinstance(value, (list, tuple)) and all(
            isinstance(v, str) and v.startswith("SIG") and hasattr(signal, v) for v in value
        )

    def cast(self, value):
        return tuple(value)


class Device(Kind):
    expected = "'cpu', 'cuda' or 'cuda:N'"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None


class Registered(Kind):
    """A name in LAVIS's registry; ``what`` names the kind of thing in messages."""

    def __init__(self, what: str, names: Callable[[], list[str]]):
        self.what, self.names = what, names

    @property
    def expected(self) -> str:
        return f"a registered LAVIS {self.what}: one of {', '.join(sorted(self.names()))}"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.names()


def registered_names(what: str, module: str) -> Callable[[], list[str]]:
    """Names LAVIS's registry holds for ``what`` once ``module``, whose import registers them, ran."""

    def names():
        import importlib

        from lavis.common.registry import registry

        importlib.import_module(module)
        return list(registry.mapping[f"{what}_name_mapping"])

    return names


class CheckpointFile(Kind):
    """A local file that exists, or a URL (fetched, if allowed, when the run loads it)."""

    expected = "an existing checkpoint file or a URL"

    def accepts(self, value) -> bool:
        from lavis.common.utils import is_url

        return isinstance(value, str) and (is_url(value) or Path(value).expanduser().is_file())


class Nullable(Kind):
    """``null`` or ``kind``."""

    def __init__(self, kind: Kind):
        self.kind = kind

    @property
    def expected(self) -> str:
        return f"null or {self.kind.expected}"

    def accepts(self, value) -> bool:
        return value is None or self.kind.accepts(value)

    def inner_problems(self, key, value) -> list[str]:
        return [] if value is None else self.kind.inner_problems(key, value)

    def cast(self, value):
        return None if value is None else self.kind.cast(value)


class Unsupported(Kind):
    """A key LAVIS reads but cannot honour: any value but null is an error saying why."""

    expected = "null"

    def __init__(self, reason: str):
        self.reason = reason

    def accepts(self, value) -> bool:
        return value is None

    def problems(self, key: str, value) -> list[str]:
        return [] if value is None else [f"{key} = {value!r}: {self.reason}"]


class Table(Kind):
    """A mapping whose keys are the fields of ``owner`` (``run.feature_cache``), read as an ``owner``."""

    def __init__(self, owner: type):
        self.owner = owner

    @property
    def expected(self) -> str:
        return f"a mapping with keys among {', '.join(field_names(self.owner))}"

    def accepts(self, value) -> bool:
        return isinstance(value, dict) or hasattr(value, "items")

    def inner_problems(self, key, value) -> list[str]:
        return problems(key, value, [self.owner])

    def cast(self, value):
        return read_settings(self.owner, value)


# --- fields and owners -----------------------------------------------------------------------


def setting(default, kind: Kind, doc: str, *, required: bool = False):
    """A settings field: its default (missing or null in the config), its kind of value, one line of
    doc.  ``required``: LAVIS reads the key without a default where it uses it (the default is None)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "doc": doc, "required": required})


def fields_of(owner: type) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(owner)}


def field_names(owner: type) -> list[str]:
    return sorted(fields_of(owner))


def _plain(section) -> dict:
    if section is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with LAVIS
        pass
    return dict(section.items())


def read_settings(owner: type, section):
    """An ``owner`` from the keys of ``section`` (a mapping or DictConfig) that are its fields: a
    missing or null key takes the field's default, a value is cast as its reader takes it.
    Other keys are left to their owners; ``problems`` is what refuses unknown ones."""
    values = _plain(section)
    kwargs = {}
    for name, field in fields_of(owner).items():
        value = values.get(name)
        if value is not None:
            kwargs[name] = field.metadata["kind"].cast(value)
    return owner(**kwargs)


def problems(prefix: str, section, owners: Iterable[type]) -> list[str]:
    """One sentence per unknown or bad key of ``section``, whose keys belong to ``owners``."""
    known = {name: field for owner in owners for name, field in fields_of(owner).items()}
    found = []
    for name, value in _plain(section).items():
        key = f"{prefix}.{name}"
        if name not in known:
            close = did_you_mean(name, known)
            if close:
                hint = f"did you mean {prefix}.{close}?"
            elif len(known) <= 12:
                hint = f"known keys: {', '.join(sorted(known))}"
            else:
                hint = "docs/run_config.md lists the known ones"
            found.append(f"{key} is not a known setting; {hint}")
            continue
        found.extend(known[name].metadata["kind"].problems(key, value))
    return found


def markdown_table(prefix: str, owner: type) -> str:
    """The fields of ``owner`` as a Markdown table: key, default, expected value, meaning."""
    lines = ["| key | default | value | meaning |", "|---|---|---|---|"]
    for name, field in fields_of(owner).items():
        kind = field.metadata["kind"]
        default = "(required)" if field.metadata["required"] else f"`{_yaml(field.default)}`"
        expected = kind.expected.replace("|", "\\|")
        lines.append(f"| `{prefix}{name}` | {default} | {expected} | {field.metadata['doc']} |")
    return "\n".join(lines)
