"""The policy's module allowlist and denylist, enforced on the imports of user code.

Defence in depth, never the boundary: code that wants `os` badly enough can reach it
through an object it already holds (`pandas.io.common.os`), through a library that imports
on its behalf, or by putting the original `__import__` back. The jail (seccomp, Landlock,
namespaces, cgroups) is what makes a module harmless; this guard makes policy visible and
turns the obvious `import socket` into a clear error.

The check sits in `builtins.__import__` and `importlib.import_module`, so it holds for
modules already in `sys.modules` (the template imported `os` long before user code runs).
It applies to imports made by user code (cells, `__main__`, modules the user wrote into
the workspace); libraries of the runtime import what they need.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any

_original_import = builtins.__import__
_original_import_module = importlib.import_module
_original_importlib_import = importlib.__import__

# Imported on user code's behalf by the interpreter itself (codecs for an encoding name,
# datetime.strptime, `from __future__`): an allowlist admits them, a denylist may still not.
IMPLICIT = frozenset(
    {"__future__", "encodings", "_strptime", "time", "codecs", "_locale", "locale"}
)


class ImportPolicy:
    def __init__(self, allow: Iterable[str] | None, deny: Iterable[str], trusted: Iterable[str]):
        self.allow = None if allow is None else frozenset(allow)
        self.deny = frozenset(deny)
        self.trusted = tuple(sorted({os.path.realpath(p) + os.sep for p in trusted}))
        self._verdicts: dict[str, bool] = {}

    def refusal(self, name: str) -> str | None:
        """Why `name` may not be imported by user code, or None if it may."""
        prefixes = _prefixes(name)
        if any(p in self.deny for p in prefixes):
            return "modules_deny"
        if self.allow is not None and not any(p in self.allow or p in IMPLICIT for p in prefixes):
            return "modules_allow"
        return None

    def is_user(self, globals_: Any) -> bool:
        if not isinstance(globals_, dict):  # no globals: judge by the calling frame
            try:
                globals_ = sys._getframe(3).f_globals
            except ValueError:
                return True
        if globals_.get("__name__") == "__main__":
            return True
        path = globals_.get("__file__")
        if not isinstance(path, str):
            return True
        verdict = self._verdicts.get(path)
        if verdict is None:  # libraries import inside functions all the time: once per file
            verdict = not os.path.realpath(path).startswith(self.trusted)
            self._verdicts[path] = verdict
        return verdict

    def check(self, name: str, globals_: Any, fromlist: Any, level: int) -> None:
        if not self.is_user(globals_):
            return
        if level:
            package = globals_.get("__package__") if isinstance(globals_, dict) else None
            try:
                name = importlib.util.resolve_name("." * level + name, package)
            except (ImportError, ValueError, TypeError):
                return  # the real import raises its own error
        names = [name]
        if fromlist:
            names += [f"{name}.{item}" for item in fromlist if isinstance(item, str)]
        for candidate in names:
            why = self.refusal(candidate)
            if why is not None:
                raise ImportError(
                    f"import of {candidate!r} is blocked by the sandbox policy ({why})",
                    name=candidate,
                )


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def install(allow: Iterable[str] | None, deny: Iterable[str]) -> None:
    """Put the guard in place (again: a later call replaces the earlier policy)."""
    trusted = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.dirname(__file__)),
    }
    policy = ImportPolicy(allow, deny, trusted)

    def guarded_import(
        name: str,
        globals: Any = None,  # the signature of builtins.__import__
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        policy.check(name, globals, fromlist, level)
        return _original_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name: str, package: str | None = None) -> Any:
        caller = sys._getframe(1).f_globals
        if name.startswith("."):
            policy.check(
                name.lstrip("."),
                {**caller, "__package__": package},
                (),
                len(name) - len(name.lstrip(".")),
            )
        else:
            policy.check(name, caller, (), 0)
        return _original_import_module(name, package)

    builtins.__import__ = guarded_import
    importlib.__import__ = guarded_import
    importlib.import_module = guarded_import_module
