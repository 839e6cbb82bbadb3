"""Human approval of high-risk operations, and the guards that decide when it is needed.

Approvals gate operations of the API: a run whose static-analysis findings reach a
severity, a `commands.run` call, a file download over a size, a sandbox asking for limits
above the operator's defaults. What code does inside a cell (a `subprocess` call, say) is
the jail's business, not an approval's.

An operation that needs a yes waits as a pending request. The first answer wins: the SDK's
callback, `codecage approvals approve|deny`, or the HTTP API. No answer within the policy's
`approval_window_s` is a no. A no raises ApprovalDenied and the operation never runs.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ._analysis import analyze, at_or_above
from ._errors import ApprovalDenied, ApprovalNotFound, CodeRejected, QuotaExceeded
from ._models import Finding
from ._policy import Policy


@dataclass
class ApprovalRequest:
    """An operation waiting for a person's yes."""

    id: str
    kind: str  # "execute", "command", "download", "create" or "packages"
    reasons: list[str]
    subject: str  # the code, the command, the path, or the limits asked for
    sandbox_id: str | None = None
    tenant: str | None = None
    run_id: str | None = None
    client_ref: str | None = None  # the caller's own reference for its request (remote SDK)
    findings: list[Finding] = field(default_factory=list)
    requested_at: float = field(default_factory=time.time)
    expires_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApprovalRequest:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["findings"] = [Finding(**f) for f in data.get("findings") or []]
        return cls(**fields)


@dataclass
class Decision:
    """Who said yes or no, when, and why."""

    approved: bool
    by: str  # as the decider gave it (a name); `key` is who the service authenticated
    reason: str = ""
    at: float = field(default_factory=time.time)
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Approver = Callable[[ApprovalRequest], "bool | Decision"]
Hook = Callable[[ApprovalRequest, "Decision | None"], None]


class _Pending:
    def __init__(self, request: ApprovalRequest) -> None:
        self.request = request
        self.decision: Decision | None = None
        self.done = threading.Event()


class Approvals:
    """Requests waiting for an answer. `on_change(request, decision)` is called when a
    request starts waiting (decision None) and when it is decided (the audit log's hook);
    both calls complete before anyone can answer, or before the operation goes on."""

    KEEP_DECIDED = 10_000

    def __init__(self, on_change: Hook | None = None, max_pending_per_tenant: int | None = None):
        self.on_change = on_change
        self.max_pending_per_tenant = max_pending_per_tenant
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        # id -> (tenant, decision): to say "already decided" rather than "unknown"
        self._decided: collections.OrderedDict[str, tuple[str | None, Decision]] = (
            collections.OrderedDict()
        )

    def ask(
        self,
        request: ApprovalRequest,
        window_s: float,
        approver: Approver | None = None,
        notify: Callable[[ApprovalRequest], None] | None = None,
    ) -> Decision:
        """Wait for the first answer, at most `window_s`; raise ApprovalDenied on a no."""
        request.expires_at = request.requested_at + window_s
        cap = self.max_pending_per_tenant
        if cap is not None:
            with self._lock:
                waiting = sum(
                    1 for p in self._pending.values() if p.request.tenant == request.tenant
                )
            if waiting >= cap:
                raise QuotaExceeded(f"{waiting} operations already wait for approval (quota)")
        if self.on_change is not None:  # recorded before it can be answered
            self.on_change(request, None)
        pending = _Pending(request)
        with self._lock:
            self._pending[request.id] = pending
        if notify is not None:
            notify(request)
        if approver is not None:
            threading.Thread(
                target=self._callback,
                args=(approver, request),
                name="codecage-approver",
                daemon=True,
            ).start()
        if not pending.done.wait(window_s):
            timeout = Decision(False, "timeout", f"no answer within approval_window_s={window_s:g}")
            self._settle(request.id, timeout)
        pending.done.wait()  # whoever settled it sets this once the decision is recorded
        decision = pending.decision
        assert decision is not None
        if not decision.approved:
            why = f": {decision.reason}" if decision.reason else ""
            raise ApprovalDenied(
                f"{request.kind} was not approved (denied by {decision.by}{why})", decision
            )
        return decision

    def _callback(self, approver: Approver, request: ApprovalRequest) -> None:
        decision = answer(approver, request)
        with contextlib.suppress(ApprovalNotFound):  # answered elsewhere first, or too late
            self.decide(request.id, decision.approved, decision.by, decision.reason)

    def decide(
        self,
        approval_id: str,
        approved: bool,
        by: str,
        reason: str = "",
        tenant: str | None = None,
        key: str | None = None,
    ) -> Decision:
        """Answer a pending request. Unknown, other tenant's, already decided or expired:
        ApprovalNotFound, saying which."""
        with self._lock:
            pending = self._pending.get(approval_id)
        if pending is None or (tenant is not None and pending.request.tenant != tenant):
            raise self._not_pending(approval_id, tenant)
        decision, won = self._settle(approval_id, Decision(approved, by, reason, key=key))
        if not won:  # someone else answered between the check and now
            raise self._not_pending(approval_id, tenant)
        return decision

    def _not_pending(self, approval_id: str, tenant: str | None) -> ApprovalNotFound:
        with self._lock:
            owner, earlier = self._decided.get(approval_id, (None, None))
        if earlier is not None and tenant in (None, owner):
            verdict = "approved" if earlier.approved else "denied"
            return ApprovalNotFound(
                f"approval {approval_id} was already decided: {verdict} by {earlier.by}"
                + (f" ({earlier.reason})" if earlier.reason else "")
            )
        return ApprovalNotFound(f"no pending approval {approval_id!r} (unknown or expired)")

    def _settle(self, approval_id: str, decision: Decision) -> tuple[Decision, bool]:
        """The first decision for a request wins: (that decision, whether it is this one).
        It is recorded (on_change) before the waiting operation may go on; if it cannot be
        recorded, the operation is denied and the recorder's error raised."""
        with self._lock:
            pending = self._pending.pop(approval_id, None)
            if pending is None:
                earlier = self._decided.get(approval_id)
                return (earlier[1] if earlier else decision), False
            self._decided[approval_id] = (pending.request.tenant, decision)
            while len(self._decided) > self.KEEP_DECIDED:
                self._decided.popitem(last=False)
        try:
            if self.on_change is not None:
                self.on_change(pending.request, decision)
        except BaseException:
            pending.decision = Decision(False, "audit", "the decision could not be recorded")
            raise
        else:
            pending.decision = decision
        finally:
            pending.done.set()
        return decision, True

    def deny_all(self, by: str, reason: str) -> None:
        """Answer every pending request with a no (the service is shutting down)."""
        with self._lock:
            ids = list(self._pending)
        for approval_id in ids:
            with contextlib.suppress(Exception):  # shutting down: the log may be gone too
                self._settle(approval_id, Decision(False, by, reason))

    def pending(self, tenant: str | None = None) -> list[ApprovalRequest]:
        with self._lock:
            return [
                p.request
                for p in self._pending.values()
                if tenant is None or p.request.tenant == tenant
            ]


def answer(approver: Approver, request: ApprovalRequest) -> Decision:
    """Ask an SDK callback; a broken callback is a no, never a yes."""
    try:
        reply = approver(request)
    except Exception as exc:
        return Decision(False, "callback", f"the approval callback failed: {exc!r}")
    return reply if isinstance(reply, Decision) else Decision(bool(reply), "callback")


# The operation being served: its audit run and the caller's reference, so an approval it
# raises names both (the service sets it; see `operation`).
_operation: contextvars.ContextVar[tuple[tuple[str, str | None], ...]] = contextvars.ContextVar(
    "codecage_operation", default=()
)


@contextlib.contextmanager
def operation(**fields: str | None) -> Iterator[None]:
    """Within this block, approvals raised on this thread carry `fields` (run_id, client_ref)."""
    token = _operation.set(tuple({**dict(_operation.get()), **fields}.items()))
    try:
        yield
    finally:
        _operation.reset(token)


def current_run() -> str | None:
    """The audit run of the operation being served on this thread, if any (see `operation`)."""
    return dict(_operation.get()).get("run_id")


def with_envs(reasons: list[str], envs: dict[str, str] | None) -> list[str]:
    """What was asked about must be what runs: environment overrides are part of it."""
    if reasons and envs:
        shown = " ".join(f"{k}={v!r}" for k, v in envs.items())
        return [*reasons, f"with environment overrides: {shown}"]
    return reasons


# The process's own broker: the SDK's requests wait here (and its callback answers them).
approvals = Approvals()

LIMIT_FIELDS = (
    "memory_mb", "cpu_cores", "cpu_s", "pids_max", "disk_mb", "tmp_mb", "shm_mb", "timeout_s",
    "idle_timeout_s", "paused_timeout_s", "interrupt_grace_s", "output_bytes", "results_bytes",
    "open_files_max",
)  # fmt: skip


def raised_limits(policy: Policy, defaults: Policy) -> list[str]:
    """The limits `policy` sets looser than `defaults` ("memory_mb 2048 > 512")."""
    raised = []
    for name in LIMIT_FIELDS:
        value, base = getattr(policy, name), getattr(defaults, name)
        if base is not None and (value is None or value > base):
            raised.append(f"{name} {'unlimited' if value is None else value} > {base}")
    if set(policy.env_allowlist) - set(defaults.env_allowlist):
        raised.append("env_allowlist names host variables beyond the defaults")
    if policy.allow_weaker and not defaults.allow_weaker:
        raised.append("allow_weaker=true")
    return raised


@dataclass
class Gate:
    """Where a sandbox's approvals go: the broker, the SDK callback, who is asking."""

    broker: Approvals = field(default_factory=lambda: approvals)
    approver: Approver | None = None
    tenant: str | None = None

    def check(
        self,
        policy: Policy,
        kind: str,
        reasons: list[str],
        subject: str,
        *,
        sandbox_id: str | None = None,
        run_id: str | None = None,
        findings: list[Finding] | None = None,
        notify: Callable[[ApprovalRequest], None] | None = None,
    ) -> Decision | None:
        """Wait for a yes if there are reasons to ask; None when none was needed. The
        audit run and the caller's reference come from the context (see `operation`)."""
        if not reasons:
            return None
        context = dict(_operation.get())
        request = ApprovalRequest(
            id=secrets.token_hex(12),
            kind=kind,
            reasons=reasons,
            subject=subject,
            sandbox_id=sandbox_id,
            tenant=self.tenant,
            run_id=run_id or context.get("run_id"),
            client_ref=context.get("client_ref"),
            findings=list(findings or []),
        )
        return self.broker.ask(request, policy.approval_window_s, self.approver, notify)

    def limits(self, policy: Policy, defaults: Policy | None) -> None:
        """A sandbox asking for limits above the defaults waits for a yes, if the policy
        says so (`approval_limits_above_default`)."""
        if not policy.approval_limits_above_default:
            return
        raised = raised_limits(policy, defaults or Policy())
        summary = ", ".join(raised)
        self.check(
            policy, "create", [f"limits above the defaults: {summary}"] if raised else [], summary
        )

    def code(
        self,
        policy: Policy,
        code: str,
        findings: list[Finding] | None,
        *,
        sandbox_id: str | None = None,
        run_id: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        envs: dict[str, str] | None = None,
    ) -> list[Finding]:
        """Static analysis of code about to run, then the policy's verdict on it: blocked
        (CodeRejected), needs a yes (waits, telling `on_event` with a `pending_approval`
        event), or free to run. Returns the findings."""
        if findings is None:
            findings = analyze(code)
        blocking = at_or_above(findings, policy.analysis_block_at)
        if blocking:
            listed = "; ".join(str(f) for f in blocking)
            raise CodeRejected(
                f"static analysis blocked this code (analysis_block_at={policy.analysis_block_at}): {listed}",
                findings,
            )
        asking = at_or_above(findings, policy.approval_findings_at)
        self.check(
            policy,
            "execute",
            with_envs([f"static analysis: {f}" for f in asking], envs),
            code,
            sandbox_id=sandbox_id,
            run_id=run_id,
            findings=findings,
            notify=None if on_event is None else _pending_event(on_event),
        )
        return findings


def _pending_event(
    on_event: Callable[[dict[str, Any]], None],
) -> Callable[[ApprovalRequest], None]:
    return lambda request: on_event({"ev": "pending_approval", "approval": request.to_dict()})
