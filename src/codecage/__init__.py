"""codecage: run untrusted Python in a locked-down sandbox.

The public surface is re-exported here; everything else lives in private modules.
Imports are lazy so that the in-jail code (codecage._inside) never pulls in the
service's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        ExecutionTimeout,
        FileNotFoundInSandbox,
        PolicyError,
        QuotaExceeded,
        SandboxBusy,
        SandboxError,
        SandboxNotFound,
        TransportError,
    )
    from ._models import Execution, ExecutionError, Finding, Logs, Result
    from ._policy import Policy
    from ._remote import Client, connect
    from ._sandbox import CommandResult, EntryInfo, OutputMessage, Sandbox

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
    "Client": "_remote",
    "QuotaExceeded": "_errors",
    "SandboxBusy": "_errors",
    "connect": "_remote",
    "AsyncSandbox": "_async",
    "CommandResult": "_sandbox",
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
    "Result": "_models",
    "SandboxError": "_errors",
    "SandboxNotFound": "_errors",
    "TransportError": "_errors",
    "run": "_api",
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
    "CommandResult",
    "Decision",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "ExecutionTimeout",
    "FileNotFoundInSandbox",
    "Finding",
    "Logs",
    "OutputMessage",
    "Policy",
    "PolicyError",
    "QuotaExceeded",
    "Result",
    "Sandbox",
    "SandboxBusy",
    "SandboxError",
    "SandboxNotFound",
    "TransportError",
    "analyze",
    "approvals",
    "connect",
    "run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codecage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"codecage.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
