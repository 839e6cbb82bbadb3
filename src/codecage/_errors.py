"""The exception tree. Failures of user code are values (Execution.error), never these.

SandboxError
├── PolicyError            (also ValueError) a policy field is unknown, impossible or unenforceable
├── BackendUnavailable     the isolation backend cannot run on this host
├── SandboxNotFound        no such sandbox, or it has ended
├── SnapshotNotFound       no snapshot by that id or name (the service's)
├── VolumeNotFound         no volume by that name (of this tenant)
├── VolumeBusy             the volume is attached to a sandbox already
├── FileNotFoundInSandbox  (also FileNotFoundError) a path inside the sandbox does not exist
├── CodeRejected           (also PolicyError) static analysis found what the policy blocks
├── ApprovalDenied         a person said no, or nobody answered in time
├── ApprovalNotFound       no pending approval by that id (unknown, or already decided)
├── TransportError         the channel to a sandbox or a service broke
├── QuotaExceeded          a tenant's quota is used up
├── SandboxBusy            the sandbox's queue of operations is full
├── SandboxPaused          the sandbox is paused: resume it first
├── AuditUnavailable       the audit log cannot be written
├── NodeLost               the cluster node it ran on was lost (a batch's run, twice)
├── ExecutionTimeout       (also TimeoutError) where a deadline is raised rather than reported
├── ContextNotFound        (also LookupError) no code context by that id in the sandbox
├── WatcherNotFound        (also LookupError) no directory watcher by that id (the service's)
└── UnsupportedLanguage    (also ValueError) a language other than python and bash

`WIRE` maps each class to its HTTP status and its name on the wire (`{"error": {"type"}}`):
the service answers with it (`wire`), the remote SDK raises the class back (`from_wire`),
and the MCP server words its tool errors with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


class SandboxError(Exception):
    """Root of every error codecage raises."""


class PolicyError(SandboxError, ValueError):
    """A policy names an unknown field, an impossible value, or a limit the host cannot enforce."""


class BackendUnavailable(SandboxError):
    """The requested isolation backend cannot run here (see `codecage doctor`)."""


class SandboxNotFound(SandboxError):
    """The sandbox does not exist or has already been killed."""


class SnapshotNotFound(SandboxError):
    """No snapshot of this tenant by that id or name (HTTP 404)."""


class TemplateNotFound(SandboxError):
    """No template of that name or id on this node (`codecage template list`; HTTP 404)."""


class TemplateError(SandboxError, ValueError):
    """A template spec is invalid, or its build failed or was refused (a preload that
    starts threads, an offline build without a wheelhouse): the message says which."""


class VolumeNotFound(SandboxError):
    """No volume of this tenant (or of this store) by that name (HTTP 404): another
    tenant's volume is the same answer as a missing one."""


class VolumeBusy(SandboxError):
    """The volume is attached to a sandbox already (one attachment at a time), or is being
    exported, imported or deleted (HTTP 409)."""


class FileNotFoundInSandbox(SandboxError, FileNotFoundError):
    """A path inside the sandbox does not exist."""


class ProcessNotFound(SandboxError, ProcessLookupError):
    """No process of that pid runs in the sandbox (it never did, or it has ended)."""


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


class PackageRefused(SandboxError):
    """A `pip install` the host will not serve: not in the operator's wheelhouse, not
    allowed by the policy (`packages_allow`), or not a package name (docs/packages.md)."""


class TransportError(SandboxError):
    """The channel to a sandbox or to a service broke or carried invalid data."""


class QuotaExceeded(SandboxError):
    """A tenant's quota is used up (HTTP 429)."""


class SandboxBusy(SandboxError):
    """The sandbox already has as many operations running and waiting as the service queues
    (HTTP 409): try again when one has finished."""


class SandboxPaused(SandboxError):
    """The sandbox is paused (frozen, its clocks stopped): nothing runs in it until it is
    resumed (`resume()`, or E2B's connect) (HTTP 409)."""


class AuditUnavailable(SandboxError):
    """The audit log cannot be written: no work may run unrecorded (HTTP 503)."""


class NodeLost(SandboxError):
    """The cluster node a run was on was lost with it (a batch's run whose node was lost
    twice: docs/cluster.md) (HTTP 503)."""


class ExecutionTimeout(SandboxError, TimeoutError):
    """A deadline passed where it is raised rather than reported as a value."""


class ContextNotFound(SandboxError, LookupError):
    """The sandbox has no code context by that id (never created, or removed)."""


class WatcherNotFound(SandboxError, LookupError):
    """The sandbox has no directory watcher by that id (never made, or stopped)."""


class UnsupportedLanguage(SandboxError, ValueError):
    """Code in a language the sandbox does not run: python and bash only."""


# -- the wire: one table for the service, the remote SDK and the MCP server ------------------


@dataclass(frozen=True)
class Wire:
    """How an error class travels: the HTTP status the service answers with, the `type`
    it names it by, and how a tool error words it for a model (`{}` is the message)."""

    status: int
    name: str
    tool_text: str = "{}"


WIRE: dict[type[SandboxError], Wire] = {
    SandboxError: Wire(409, "SandboxError"),  # an operation failed inside the sandbox
    PolicyError: Wire(422, "PolicyError"),
    BackendUnavailable: Wire(409, "BackendUnavailable"),
    SandboxNotFound: Wire(404, "SandboxNotFound"),  # another tenant's too: the same answer
    SnapshotNotFound: Wire(404, "SnapshotNotFound"),  # likewise
    TemplateNotFound: Wire(404, "TemplateNotFound"),
    TemplateError: Wire(422, "TemplateError"),
    VolumeNotFound: Wire(404, "VolumeNotFound"),  # likewise
    VolumeBusy: Wire(409, "VolumeBusy"),
    FileNotFoundInSandbox: Wire(404, "FileNotFound", "no such file or directory: {}"),
    ProcessNotFound: Wire(404, "ProcessNotFound", "no such process: {}"),
    CodeRejected: Wire(422, "CodeRejected"),  # with its `findings`
    ApprovalDenied: Wire(403, "ApprovalDenied"),
    ApprovalNotFound: Wire(404, "ApprovalNotFound"),
    PackageRefused: Wire(422, "PackageRefused"),
    TransportError: Wire(409, "TransportError"),
    QuotaExceeded: Wire(429, "QuotaExceeded"),
    SandboxBusy: Wire(409, "SandboxBusy"),
    SandboxPaused: Wire(409, "SandboxPaused"),
    AuditUnavailable: Wire(503, "AuditUnavailable"),
    NodeLost: Wire(503, "NodeLost"),
    ExecutionTimeout: Wire(409, "ExecutionTimeout"),
    ContextNotFound: Wire(404, "ContextNotFound"),
    WatcherNotFound: Wire(404, "WatcherNotFound"),
    UnsupportedLanguage: Wire(400, "UnsupportedLanguage"),
}
# Names on the wire that are not a class's own: the service's 422 for a malformed body.
ALIASES: dict[str, type[SandboxError]] = {"ValidationError": PolicyError}
_BY_NAME: dict[str, type[SandboxError]] = {
    **{w.name: cls for cls, w in WIRE.items()},
    **ALIASES,
}


def wire(exc: SandboxError) -> Wire:
    """The entry of the nearest class in `WIRE`; a subclass without its own (an
    extension's) keeps its class name, with its ancestor's status."""
    for cls in type(exc).__mro__:
        if cls in WIRE:
            entry = WIRE[cls]
            return entry if cls is type(exc) else replace(entry, name=type(exc).__name__)
    raise AssertionError("unreachable: SandboxError is in WIRE")


def from_wire(name: str) -> type[SandboxError]:
    """The class a wire name stands for (SandboxError for one this SDK does not know)."""
    return _BY_NAME.get(name, SandboxError)
