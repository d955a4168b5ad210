"""The house's rules, checked by walking the package: every error a user can fix derives from the
one user-error type (which the CLI turns into one line and exit 2); imports point down the layers;
only the application layer reads configs."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import esft_jax
import esft_jax.app
from esft_jax.errors import UserError

# errors that are not the user's input: a run that diverged (exit 1), an HTTP reply's error (its
# status code), and two caught where they are raised (a decoding failure each reader turns into its
# own user error; a plan's compile that ran out of memory, reported as a row)
NOT_USER_ERRORS = {"DivergedError", "APIError", "NotUtf8", "OutOfMemory"}


def _modules():
    for info in pkgutil.walk_packages(esft_jax.__path__, "esft_jax."):
        yield importlib.import_module(info.name)


def test_every_error_the_package_defines_is_a_user_error():
    defined = {
        obj
        for module in _modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == module.__name__
    }
    assert len(defined) >= 10  # the walk found the package's errors
    wrong = sorted(
        f"{e.__module__}.{e.__name__}"
        for e in defined
        if e.__name__ not in NOT_USER_ERRORS and not issubclass(e, UserError)
    )
    assert not wrong, f"errors a user can fix must derive from esft_jax.errors.UserError: {wrong}"


# The house's layers, bottom first: a module imports only from its own package and the layers below
# it (the application layer, which reads configs, on top; the typed library under it).
LAYERS = (
    ("errors", "jsonio", "tree", "report"),
    ("sharding",),
    ("model",),
    ("data", "builtin"),
    ("checkpoint",),
    ("routing",),
    ("expert_config",),
    ("eval",),
    ("train", "serve"),
    ("app",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
PACKAGE = Path(esft_jax.__file__).parent


def _unit(module: str) -> str:
    """esft_jax.X[.Y...] -> X (its top-level module or package)."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """The esft_jax modules `path` imports, at any depth of its code (deferred imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "esft_jax":
                found |= {f"esft_jax.{alias.name}" for alias in node.names}
            elif node.module.startswith("esft_jax."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("esft_jax.")}
    return found


def test_imports_point_down_the_layers():
    wrong, unplaced = [], set()
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"]
    for path in files:
        unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in _imports(path):
            target = _unit(module)
            unplaced |= {u for u in (unit, target) if u not in RANK}
            if target != unit and RANK.get(target, -1) >= RANK.get(unit, -1):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not unplaced, f"place these in LAYERS: {sorted(unplaced)}"
    assert not wrong, "imports up or across the layers:\n" + "\n".join(sorted(wrong))
    assert len(files) > 100  # the walk saw the package


def test_the_library_takes_typed_arguments():
    """Only the application layer reads config files' ConfigDicts."""
    readers = sorted(
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if "app" not in p.relative_to(PACKAGE).parts
        and any(
            (isinstance(n, ast.Import) and any(a.name == "ml_collections" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ml_collections"))
            for n in ast.walk(ast.parse(p.read_text()))
        )
    )
    assert not readers, f"library modules that import ml_collections: {readers}"


def test_every_app_module_imports_first():
    """Each application module imported first in a fresh set of esft_jax modules: no import cycle
    that only an import order hides (a command module importing its siblings, say)."""
    app = sorted(
        info.name for info in pkgutil.walk_packages(esft_jax.app.__path__, "esft_jax.app.")
    )
    script = (
        "import importlib, sys\n"
        f"for name in {app!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('esft_jax')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
    assert len(app) > 20
