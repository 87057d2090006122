"""Lazy `__init__` for diffusers' model-family packages: import a class's module when it is used.

Why: `diffusers.models.unets`, `.transformers`, `.autoencoders` and `.controlnets` import every
model of their family in their `__init__` (about 130 modules: video, audio and DiT models SD
training never touches). Importing `UNet2DConditionModel` runs all of them, because its blocks
import `diffusers.models.transformers.transformer_2d`, which first runs the package `__init__`.
Measured on a 2-core EPYC, together with the deferred `scipy.stats` below: about 0.6 s and
32 MiB of RSS less in every process that loads a model (training, generation, the latent cache,
the test workers).

How: a meta-path finder serves those four packages with the real spec (same file, same
`__path__`, so `from diffusers.models.transformers.transformer_2d import ...` works as before),
but instead of running the `__init__` it reads it: each `from .module import Name` under
`if is_torch_available():` becomes an entry `Name -> module`, imported on first attribute access
(the module `__getattr__` of PEP 562, as diffusers' own top-level `_LazyModule` does). Anything
else in the file, or a name it does not list, runs the real `__init__` in the package's namespace
once, so the package then behaves exactly as the eager one. The classes are the same objects
either way; nothing about models, weights or numbers changes.

`install()` adds the finder (idempotent; no import happens until a diffusers package is
imported). SDTRAIN_EAGER_DIFFUSERS=1 leaves diffusers as it is (A/B).
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types

PACKAGES = frozenset(
    {
        "diffusers.models.unets",
        "diffusers.models.transformers",
        "diffusers.models.autoencoders",
        "diffusers.models.controlnets",
    }
)
# imported at the top of diffusers' schedulers (which `from_single_file`'s support code imports)
# but used only by options SD training never sets (beta sigmas): run on first attribute use
DEFERRED = frozenset({"scipy.stats"})
OPT_OUT = "SDTRAIN_EAGER_DIFFUSERS"


def _guard_ok(test: ast.expr) -> bool:
    """True for `if is_torch_available():` (sdtrain always has torch)."""
    return (
        isinstance(test, ast.Call)
        and isinstance(test.func, ast.Name)
        and test.func.id == "is_torch_available"
        and not test.args
        and not test.keywords
    )


def lazy_names(source: str) -> dict[str, str] | None:
    """`Name -> submodule` for an `__init__` made only of imports; None when it does more.

    Accepted statements: a docstring, absolute or parent-relative imports (`from ...utils import
    is_torch_available`: helpers, not exports), `from .module import A, B` and
    `if is_torch_available():` blocks of these. Anything else (assignments, other guards,
    `import *`, `else:` branches) means the file is not only a table of exports: None.
    """
    names: dict[str, str] = {}

    def walk(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, ast.Import):
                continue
            if isinstance(node, ast.ImportFrom):
                # other levels (`from ...utils import x`) are helpers, and `from . import x`
                # names submodules: both are imported when used
                if node.level == 1 and node.module:
                    for alias in node.names:
                        if alias.name == "*":
                            return False
                        names[alias.asname or alias.name] = node.module
                continue
            if isinstance(node, ast.If) and _guard_ok(node.test) and not node.orelse:
                if not walk(node.body):
                    return False
                continue
            return False
        return True

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    return names if walk(tree.body) else None


class _LazyLoader(importlib.abc.Loader):
    """Creates the module from the real spec and defers running its code.

    With a `names` table (a package `__init__` that only lists exports), a listed name imports
    its submodule; any other missing attribute, or every one when there is no table (a deferred
    module), runs the real loader once in the module's namespace. The import system's own
    attributes (`__spec__`, `__path__`, ...) are real from the start, so importing the module
    again or importing its submodules does not trigger anything.
    """

    def __init__(self, loader: importlib.abc.Loader, names: dict[str, str] | None):
        self.loader = loader
        self.names = names or {}

    def create_module(self, spec):  # the default module object
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        names, loader = self.names, self.loader

        def __getattr__(name: str):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            submodule = names.get(name)
            if submodule is not None:
                value = getattr(importlib.import_module(f"{module.__name__}.{submodule}"), name)
                setattr(module, name, value)
                return value
            if module.__dict__.get("__getattr__") is __getattr__:  # the real code, once
                del module.__dict__["__getattr__"]
                del module.__dict__["__dir__"]
                loader.exec_module(module)
            try:
                return module.__dict__[name]
            except KeyError:
                raise AttributeError(
                    f"module {module.__name__!r} has no attribute {name!r}"
                ) from None

        def __dir__() -> list[str]:
            return sorted(set(module.__dict__) | set(names))

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]
        module.__dir__ = __dir__  # type: ignore[attr-defined]


class LazyPackageFinder(importlib.abc.MetaPathFinder):
    """Serves PACKAGES and DEFERRED lazily (see the module doc); other imports are left alone."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PACKAGES | DEFERRED or os.environ.get(OPT_OUT) == "1":
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None or not real.origin or real.loader is None:
            return None
        names = None
        if fullname in PACKAGES:
            if real.submodule_search_locations is None:
                return None
            try:
                with open(real.origin, encoding="utf-8") as handle:
                    names = lazy_names(handle.read())
            except OSError:
                return None
            if names is None:
                return None  # not a plain table of exports: import it as usual
        spec = importlib.machinery.ModuleSpec(
            fullname,
            _LazyLoader(real.loader, names),
            origin=real.origin,
            is_package=real.submodule_search_locations is not None,
        )
        if real.submodule_search_locations is not None:
            spec.submodule_search_locations = list(real.submodule_search_locations)
        spec.has_location = True
        spec.cached = real.cached
        return spec


def install() -> None:
    """Put the finder first on sys.meta_path (once)."""
    if not any(isinstance(f, LazyPackageFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LazyPackageFinder())
