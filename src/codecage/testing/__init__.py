"""The conformance kit: the same behaviour and attack tests against every backend.

One suite, many backends (like trio.testing or anyio's `anyio_backend` fixture): the tests
in tests/test_sandbox.py and tests/test_attacks.py build every policy with `policy(...)`,
which carries the backend under test, and the pytest plugin (`codecage.testing.pytest_plugin`)
runs each of them once per backend this host supports. A backend joins by being registered
(codecage._jail.register) and available; nothing here names one but the default.

A backend that declares it lacks a feature (codecage._jail.features, `Jail.enforces`) refuses
the policies that need it; `policy(...)` then sets `allow_weaker=True` for that backend
only, so the rest of its behaviour is still tested, and a test relying on the feature is
marked `@pytest.mark.requires_feature("own_uid")`: it is skipped on that backend, with a
reason naming the backend, the feature and the backend's own explanation.

Also here: the probe helpers of the attack tests (a probe is a code string that reports
`RESULT <json>`; it runs on the host as the positive control and in a sandbox, where it
must be blocked), so a backend's own tests use the same ones.

Also here: `codecage.testing.fake`, a scripted in-memory backend for unit tests of the
layers above the jail (tests/unit; docs/backends-internals.md). It is not imported here and
never registered unless a test installs it.

Stdlib and codecage only: pytest is a dev dependency, imported by the plugin alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from .._jail import available_backends, features, get_jail
from .._models import Execution
from .._policy import Policy

__all__ = [
    "DEFAULT",
    "PRELUDE",
    "available_backends",
    "backends_under_test",
    "current_backend",
    "enforces",
    "in_jail",
    "lacking",
    "on_host",
    "policy",
    "result_of",
    "stdout_of",
    "unmet",
    "use_backend",
]

DEFAULT = "namespace"
_backend: ContextVar[str] = ContextVar("codecage_backend_under_test", default=DEFAULT)


_available: dict[str, str | None] = {}


def backends_under_test() -> list[str]:
    """The backends available on this host, optionally narrowed by CODECAGE_TEST_BACKENDS
    ("namespace,bwrap"). Naming one that is unavailable is an error, not a silent skip.
    Probed once per process (the kit asks for every test module it collects; a probe of
    the container engine is an HTTP round trip)."""
    if not _available:
        _available.update(available_backends())
    available = _available
    wanted = os.environ.get("CODECAGE_TEST_BACKENDS")
    if not wanted:
        return [name for name, why in available.items() if why is None]
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    for name in names:
        if available.get(name, "not registered") is not None:
            raise RuntimeError(
                f"CODECAGE_TEST_BACKENDS names {name!r}, which is unavailable here: "
                f"{available.get(name, 'not registered')}"
            )
    return names


def current_backend() -> str:
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def enforces(feature: str, backend: str | None = None) -> bool:
    """Whether `backend` (default: the one under test) declares that it enforces `feature`
    on this host (a name of codecage._jail.features.FEATURES)."""
    return lacking(feature, backend) is None


def lacking(feature: str, backend: str | None = None) -> str | None:
    """None if `backend` enforces `feature` here, else the backend's reason (for skips)."""
    if feature not in features.FEATURES:
        raise ValueError(f"unknown feature {feature!r} (known: {', '.join(features.FEATURES)})")
    jail = get_jail(backend or current_backend())
    if feature in jail.enforces:
        return None
    why: Mapping[str, str] = getattr(jail, "why", {})
    return why.get(feature, "declared missing")


def unmet(*needed: str, backend: str | None = None) -> str | None:
    """Why a test relying on these features cannot run on `backend` (the skip reason of
    `requires_feature`: the backend, the feature, the backend's own explanation), or None."""
    name = backend or current_backend()
    for feature in needed:
        why = lacking(feature, name)
        if why is not None:
            return f"backend {name!r} does not enforce {feature!r}: {why}"
    return None


def policy(**fields: Any) -> Policy:
    """A Policy for the backend under test (fields as Policy's). Where that backend declares
    it cannot enforce a feature the policy needs, `allow_weaker=True` is added (unless the
    test sets allow_weaker itself): what the backend lacks is then the business of the tests
    marked `requires_feature`, not a refusal of every other test."""
    name = current_backend()
    built = Policy(**{"isolation": name, **fields})
    if "allow_weaker" not in fields and features.needed(built) - get_jail(name).enforces:
        built = Policy(**{"isolation": name, **fields, "allow_weaker": True})
    return built


# -- probes ----------------------------------------------------------------------------------

# Common prelude of the probes: raw system calls with errno, and the report line.
PRELUDE = r"""
import ctypes, errno, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(*args):
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    r = libc.syscall(*args)
    e = ctypes.get_errno()
    return r, (errno.errorcode.get(e, str(e)) if r < 0 else None)
def errname(exc):
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
"""


def result_of(text: str) -> dict[str, Any]:
    """The probe's report: the last `RESULT {...}` line of its output."""
    lines = [line for line in text.splitlines() if "RESULT {" in line]
    assert lines, f"the probe did not report; output was:\n{text[-3000:]}"
    data = json.loads(lines[-1].split("RESULT ", 1)[1])
    assert isinstance(data, dict)
    return data


def on_host(
    probe: str,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    """The positive control: run the probe on the host, as root, in a subprocess."""
    proc = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )
    assert proc.returncode == 0, f"host control failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return result_of(proc.stdout)


def stdout_of(ex: Execution) -> str:
    return "".join(ex.logs.stdout)


def in_jail(probe: str, with_policy: Policy | None = None) -> dict[str, Any]:
    """Run the probe in a fresh sandbox of the backend under test; it must finish normally
    and report."""
    from .. import run

    ex = run(probe, with_policy or policy())
    assert ex.error is None, ex.error.traceback if ex.error else None
    assert ex.killed_by is None, (
        ex.killed_by,
        ex.limits_hit,
        stdout_of(ex),
        "".join(ex.logs.stderr),
    )
    return result_of(stdout_of(ex))
