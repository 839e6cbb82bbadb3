"""codecage: run untrusted Python in a locked-down sandbox.

The public surface is re-exported here; everything else lives in private modules.
Imports are lazy so that the in-jail code (codecage._inside) never pulls in the
service's dependencies, and the SDK never imports the service (the `service` extra).
Every public name is in `__all__` and nothing else is public (tests/test_exports.py).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._analysis import analyze
    from ._api import run
    from ._approvals import ApprovalRequest, Decision, approvals
    from ._async import AsyncSandbox
    from ._errors import (
        ApprovalDenied,
        ApprovalNotFound,
        AuditUnavailable,
        BackendUnavailable,
        CodeRejected,
        ContextNotFound,
        ExecutionTimeout,
        FileNotFoundInSandbox,
        NodeLost,
        PackageRefused,
        PolicyError,
        ProcessNotFound,
        QuotaExceeded,
        SandboxBusy,
        SandboxError,
        SandboxNotFound,
        SandboxPaused,
        SnapshotNotFound,
        TemplateError,
        TemplateNotFound,
        TransportError,
        UnsupportedLanguage,
        VolumeBusy,
        VolumeNotFound,
        WatcherNotFound,
    )
    from ._jail.pool import Pool
    from ._models import Execution, ExecutionError, Finding, Logs, Result
    from ._policy import Policy
    from ._processes import CommandHandle, ProcessInfo, PtySize
    from ._remote import Client, connect
    from ._sandbox import CommandResult, Context, EntryInfo, OutputMessage, Sandbox
    from ._templates import Template
    from ._volumes import Volumes
    from ._warm import start_pool, stop_pool

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "_analysis",
    "ApprovalNotFound": "_errors",
    "ApprovalRequest": "_approvals",
    "approvals": "_approvals",
    "CodeRejected": "_errors",
    "Decision": "_approvals",
    "Finding": "_models",
    "AuditUnavailable": "_errors",
    "NodeLost": "_errors",
    "Client": "_remote",
    "QuotaExceeded": "_errors",
    "SandboxBusy": "_errors",
    "SandboxPaused": "_errors",
    "SnapshotNotFound": "_errors",
    "Template": "_templates",
    "TemplateError": "_errors",
    "TemplateNotFound": "_errors",
    "VolumeBusy": "_errors",
    "VolumeNotFound": "_errors",
    "Volumes": "_volumes",
    "connect": "_remote",
    "AsyncSandbox": "_async",
    "CommandResult": "_sandbox",
    "Context": "_sandbox",
    "ContextNotFound": "_errors",
    "WatcherNotFound": "_errors",
    "UnsupportedLanguage": "_errors",
    "EntryInfo": "_sandbox",
    "OutputMessage": "_sandbox",
    "Sandbox": "_sandbox",
    "ApprovalDenied": "_errors",
    "BackendUnavailable": "_errors",
    "Execution": "_models",
    "ExecutionError": "_models",
    "ExecutionTimeout": "_errors",
    "FileNotFoundInSandbox": "_errors",
    "Logs": "_models",
    "Policy": "_policy",
    "PolicyError": "_errors",
    "ProcessNotFound": "_errors",
    "CommandHandle": "_processes",
    "ProcessInfo": "_processes",
    "PtySize": "_processes",
    "Result": "_models",
    "SandboxError": "_errors",
    "SandboxNotFound": "_errors",
    "TransportError": "_errors",
    "PackageRefused": "_errors",
    "run": "_api",
    "Pool": "_jail.pool",
    "start_pool": "_warm",
    "stop_pool": "_warm",
}

__all__ = [
    "ApprovalDenied",
    "ApprovalNotFound",
    "ApprovalRequest",
    "AsyncSandbox",
    "AuditUnavailable",
    "BackendUnavailable",
    "Client",
    "CodeRejected",
    "CommandHandle",
    "CommandResult",
    "Context",
    "ContextNotFound",
    "Decision",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "ExecutionTimeout",
    "FileNotFoundInSandbox",
    "Finding",
    "Logs",
    "NodeLost",
    "OutputMessage",
    "PackageRefused",
    "Policy",
    "PolicyError",
    "Pool",
    "ProcessInfo",
    "ProcessNotFound",
    "PtySize",
    "QuotaExceeded",
    "Result",
    "Sandbox",
    "SandboxBusy",
    "SandboxError",
    "SandboxNotFound",
    "SandboxPaused",
    "SnapshotNotFound",
    "Template",
    "TemplateError",
    "TemplateNotFound",
    "TransportError",
    "UnsupportedLanguage",
    "VolumeBusy",
    "VolumeNotFound",
    "Volumes",
    "WatcherNotFound",
    "analyze",
    "approvals",
    "connect",
    "run",
    "start_pool",
    "stop_pool",
]


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codecage' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"codecage.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
