"""Make a plain ``import lavis`` load the blip2_internlm plugin (see docs/autoload.md).

Installed with the package, ``blip2_internlm-autoload.pth`` in site-packages runs
``import blip2_internlm_autoload; blip2_internlm_autoload.install()`` at interpreter
start-up.  ``install()`` puts :class:`LavisHook` first on ``sys.meta_path``; the hook
ignores every name but ``lavis``.  When ``lavis`` itself is imported (``import lavis``,
``from lavis.models import ...``) it imports ``blip2_internlm`` instead, which applies
``compat.prepare_imports()``, imports LAVIS, patches it and registers the plugin's
models, datasets and tasks; the ``import lavis`` statement then gets that module.

This module runs in every interpreter of the environment, so it imports nothing beyond
``os`` and ``sys`` (both already loaded by then) until ``lavis`` is imported, and it must
never import ``blip2_internlm``, torch or transformers at start-up.

``BLIP2_INTERNLM_AUTOLOAD=0`` (or ``false``/``no``/``off``) turns it off; it is read at
start-up and again when ``lavis`` is imported.
"""

import os
import sys

ENV_VAR = "BLIP2_INTERNLM_AUTOLOAD"
_OFF = frozenset({"0", "false", "no", "off"})
_TARGET = "lavis"
_PLUGIN = "blip2_internlm"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


class LavisHook:
    """``sys.meta_path`` finder that hands the import of ``lavis`` to ``blip2_internlm``.

    ``find_spec`` only locates LAVIS (so ``importlib.util.find_spec("lavis")`` stays cheap
    and side-effect free); the work happens when the module is created, under the import
    lock that Python already holds for ``lavis``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or _PLUGIN in sys.modules or not enabled():
            return None  # not LAVIS, or blip2_internlm is importing LAVIS itself, or switched off
        real = _find_without_hook(fullname, path, target)
        if real is None or real.loader is None:
            return None
        import copy

        spec = copy.copy(real)  # same name, origin, __path__: only the loader differs
        spec.loader = _PluginLoader(real)
        return spec

    def invalidate_caches(self):
        pass


class _PluginLoader:
    def __init__(self, real_spec):
        self.real_spec = real_spec
        self.fell_back = False
        self.own_spec = None

    def create_module(self, spec):
        uninstall()  # the nested `import lavis` below must reach LAVIS's own loader
        try:
            import blip2_internlm  # noqa: F401  (prepare_imports, import lavis, patch, register)
        except ModuleNotFoundError as error:
            if error.name != _PLUGIN:
                _add_note(error)
                raise
            import warnings

            warnings.warn(
                f"{_PLUGIN}_autoload: {_PLUGIN} is not importable; importing lavis without it",
                RuntimeWarning,
                stacklevel=2,
            )
            self.fell_back = True
            return self.real_spec.loader.create_module(self.real_spec)
        except BaseException as error:
            _add_note(error)
            raise
        module = sys.modules[_TARGET]
        self.own_spec = module.__spec__  # the import system replaces it with ours next
        return module

    def exec_module(self, module):
        if self.fell_back:
            module.__spec__, module.__loader__ = self.real_spec, self.real_spec.loader
            self.real_spec.loader.exec_module(module)
        else:
            # already executed by blip2_internlm's own `import lavis`
            module.__spec__ = self.own_spec


def _find_without_hook(fullname, path, target):
    for finder in sys.meta_path:
        if isinstance(finder, LavisHook):
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None:
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
    return None


def _add_note(error):
    error.add_note(
        f"(raised while {_PLUGIN}_autoload imported {_PLUGIN} for `import {_TARGET}`; "
        f"{ENV_VAR}=0 turns the autoload off)"
    )


def installed() -> bool:
    return any(isinstance(finder, LavisHook) for finder in sys.meta_path)


def install() -> None:
    """Called by the .pth at start-up: put the hook first unless switched off or not needed."""
    if enabled() and _TARGET not in sys.modules and not installed():
        sys.meta_path.insert(0, LavisHook())


def uninstall() -> None:
    # a new list, not an in-place edit: an import running in another thread may be iterating the old one
    sys.meta_path = [finder for finder in sys.meta_path if not isinstance(finder, LavisHook)]
