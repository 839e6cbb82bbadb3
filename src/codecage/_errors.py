"""The exception tree. Failures of user code are values (Execution.error), never these.

SandboxError
├── PolicyError            (also ValueError) a policy field is unknown, impossible or unenforceable
├── BackendUnavailable     the isolation backend cannot run on this host
├── SandboxNotFound        no such sandbox, or it has ended
├── FileNotFoundInSandbox  (also FileNotFoundError) a path inside the sandbox does not exist
├── ApprovalDenied         a person said no, or nobody answered in time
├── TransportError         the channel to a sandbox or a service broke
└── ExecutionTimeout       (also TimeoutError) where a deadline is raised rather than reported
"""

from __future__ import annotations


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


class ApprovalDenied(SandboxError):
    """An operation needed a person's approval and did not get it."""


class TransportError(SandboxError):
    """The channel to a sandbox or to a service broke or carried invalid data."""


class QuotaExceeded(SandboxError):
    """A tenant's quota is used up (HTTP 429)."""


class AuditUnavailable(SandboxError):
    """The audit log cannot be written: no work may run unrecorded (HTTP 503)."""


class ExecutionTimeout(SandboxError, TimeoutError):
    """A deadline passed where it is raised rather than reported as a value."""
