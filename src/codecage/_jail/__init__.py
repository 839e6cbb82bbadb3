"""Jail backends: one small interface (create a sandbox; run, signal, kill it).

Backends are loaded by name from the policy's `isolation` field.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Protocol

from .._errors import BackendUnavailable
from .._models import Execution
from .._policy import Policy


class JailedSandbox(Protocol):
    id: str

    def execute(
        self,
        code: str,
        *,
        mode: str = "session",
        timeout_s: float | None = None,
        envs: dict[str, str] | None = None,
        recover: bool = True,
    ) -> Execution: ...

    def kill(self) -> None: ...


class Jail(Protocol):
    name: str

    def check(self, policy: Policy) -> None: ...

    def create(self, policy: Policy, envs: dict[str, str] | None = None) -> JailedSandbox: ...

    def close(self) -> None: ...


_jails: dict[str, Jail] = {}
_lock = threading.Lock()


def get_jail(name: str) -> Jail:
    """The process-wide jail for a backend, started on first use and closed at exit."""
    with _lock:
        if name not in _jails:
            _jails[name] = _load(name)
        return _jails[name]


def close_jails() -> None:
    """Stop every template this process started (the service calls it on shutdown)."""
    with _lock:
        jails = list(_jails.values())
        _jails.clear()
    for jail in jails:
        jail.close()


def _load(name: str) -> Jail:
    if name == "namespace":
        from .namespace import NamespaceJail

        # The template's preload list: CODECAGE_PRELOAD="numpy,pandas" (default: the data stack).
        preload = os.environ.get("CODECAGE_PRELOAD")
        modules = (
            tuple(m.strip() for m in preload.split(",") if m.strip())
            if preload is not None
            else None
        )
        jail = NamespaceJail(preload=modules)
        atexit.register(jail.close)
        return jail
    if name == "gvisor":
        from .gvisor import GvisorJail

        gvisor = GvisorJail()
        atexit.register(gvisor.close)
        return gvisor
    raise BackendUnavailable(f"isolation backend {name!r} is not available in this version")
