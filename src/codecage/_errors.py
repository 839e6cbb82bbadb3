"""The exception tree. Failures of user code are values (Execution.error), never these.

SandboxError
├── PolicyError            (also ValueError) a policy field is unknown, impossible or unenforceable
├── BackendUnavailable     the isolation backend cannot run on this host
├── SandboxNotFound        no such sandbox, or it has ended
├── FileNotFoundInSandbox  (also FileNotFoundError) a path inside the sandbox does not exist
├── CodeRejected           (also PolicyError) static analysis found what the policy blocks
├── ApprovalDenied         a person said no, or nobody answered in time
├── ApprovalNotFound       no pending approval by that id (unknown, or already decided)
├── TransportError         the channel to a sandbox or a service broke
└── ExecutionTimeout       (also TimeoutError) where a deadline is raised rather than reported
"""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """Root of every error codecage raises."""


class PolicyError(SandboxError, ValueError):
    """A policy names an unknown field, an impossible value, or a limit the host cannot enforce."""


class BackendUnavailable(SandboxError):
    """The requested isolation backend cannot run here (see `codecage doctor`)."""


class SandboxNotFound(SandboxError):
    """The sandbox does not exist or has already been killed."""


class FileNotFoundInSandbox(SandboxError, FileNotFoundError):
    """A path inside the sandbox does not exist."""


class CodeRejected(PolicyError):
    """Static analysis found something the policy blocks (`analysis_block_at`); the code
    never ran. `.findings` lists what was found."""

    def __init__(self, message: str, findings: list[Any] | None = None) -> None:
        super().__init__(message)
        self.findings = list(findings or [])


class ApprovalDenied(SandboxError):
    """An operation needed a person's approval and did not get it (denied, or no answer
    within the policy's window); it never ran. `.decision` says who, when and why."""

    def __init__(self, message: str, decision: Any = None) -> None:
        super().__init__(message)
        self.decision = decision


class ApprovalNotFound(SandboxError):
    """No pending approval has that id: it never existed, or it was already decided."""


class TransportError(SandboxError):
    """The channel to a sandbox or to a service broke or carried invalid data."""


class QuotaExceeded(SandboxError):
    """A tenant's quota is used up (HTTP 429)."""


class SandboxBusy(SandboxError):
    """The sandbox already has as many operations running and waiting as the service queues
    (HTTP 409): try again when one has finished."""


class AuditUnavailable(SandboxError):
    """The audit log cannot be written: no work may run unrecorded (HTTP 503)."""


class ExecutionTimeout(SandboxError, TimeoutError):
    """A deadline passed where it is raised rather than reported as a value."""
