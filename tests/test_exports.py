"""`__all__`, the lazy loader and the type checkers' imports of the public packages stay in
step (like httpx's tests/test_exported_members.py): every name in `__all__` is importable and
is what the lazy loader gives, every public attribute is in `__all__`, `__all__` is sorted."""

from __future__ import annotations
import __future__

import ast
import importlib
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

import codecage
import codecage.testing


def test_all_is_sorted_and_without_duplicates() -> None:
    for module in (codecage, codecage.testing):
        assert module.__all__ == sorted(set(module.__all__)), module.__name__


def test_every_name_in_all_is_what_the_lazy_loader_gives() -> None:
    exports = codecage._EXPORTS
    assert set(exports) == set(codecage.__all__)  # no name only one of them knows
    for name in codecage.__all__:
        value = getattr(importlib.import_module(f"codecage.{exports[name]}"), name)
        assert getattr(codecage, name) is value, name
        namespace: dict[str, object] = {}
        exec(f"from codecage import {name}", namespace)
        assert namespace[name] is value, name
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("codecage."), (name, value.__module__)
    assert set(codecage.__all__) <= set(dir(codecage))


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = codecage.nope  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from codecage import Manager", {})  # private modules' names are not exports


def test_every_public_attribute_is_in_all() -> None:
    """In a fresh interpreter, once every export is loaded: nothing else is public (a
    submodule such as codecage.tools is reached as a module, not an export)."""
    code = (
        "import types, codecage\n"
        "for name in codecage.__all__: getattr(codecage, name)\n"
        "print(sorted(n for n, v in vars(codecage).items() if not n.startswith('_')"
        " and not isinstance(v, types.ModuleType)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(sorted(codecage.__all__))
    here = {
        n
        for n, v in vars(codecage).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert here <= set(codecage.__all__), here - set(codecage.__all__)


def test_the_type_checkers_imports_match_the_lazy_loader() -> None:
    """The `if TYPE_CHECKING:` imports in codecage/__init__.py are what mypy and IDEs see:
    the same names, from the same modules, as the lazy loader."""
    tree = ast.parse(Path(codecage.__file__).read_text())
    guarded = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    )
    seen = {}
    for node in guarded.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names:
            assert alias.asname is None
            seen[alias.name] = node.module
    assert seen == codecage._EXPORTS


def _defined_here(module: types.ModuleType) -> set[str]:
    """Public names the module itself defines: its functions, classes and constants (not
    what it imports for its own use: modules, typing helpers, other modules' objects)."""
    out = set()
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType | __future__._Feature):
            continue
        if inspect.isclass(value) or callable(value):
            if getattr(value, "__module__", None) == module.__name__:
                out.add(name)
        elif not getattr(value, "__module__", "").startswith(("typing", "collections")):
            out.add(name)
    return out


def test_codecage_testing_exports_what_it_defines() -> None:
    testing = codecage.testing
    for name in testing.__all__:
        namespace: dict[str, object] = {}
        exec(f"from codecage.testing import {name}", namespace)
        assert namespace[name] is getattr(testing, name), name
    missing = _defined_here(testing) - set(testing.__all__)
    assert not missing, f"public in codecage.testing but not in its __all__: {sorted(missing)}"
    assert {"DEFAULT", "PRELUDE", "policy", "use_backend"} <= _defined_here(testing)  # control
