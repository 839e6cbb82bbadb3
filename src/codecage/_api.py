"""One-shot runs: a fresh sandbox, one run, destroyed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._jail import get_jail
from ._models import Execution
from ._policy import Policy

if TYPE_CHECKING:
    from ._approvals import Approver, Gate
    from ._models import Finding

MAX_CODE_BYTES = 16 << 20


def prepare_code(code: str | bytes, max_bytes: int = MAX_CODE_BYTES) -> str:
    """Decode and size-check code (UTF-8 bytes; the SDK's cap, or the service's
    `max_code_bytes`); invalid UTF-8 is refused with a clear message."""
    from ._errors import PolicyError

    if isinstance(code, bytes):
        try:
            code = code.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"code is not valid UTF-8 (byte {exc.start})") from None
    size = len(code.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PolicyError(f"code is {size} bytes, more than the {max_bytes} allowed")
    return code


def check_envs(envs: dict[str, str] | None) -> dict[str, str]:
    """Environment variables must be representable: a clear error here, not a broken sandbox."""
    from ._errors import PolicyError

    for key, value in (envs or {}).items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise PolicyError(f"envs: {key!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise PolicyError(f"envs: the value of {key!r} must be a string without NUL bytes")
    return dict(envs or {})


def run(
    code: str | bytes,
    policy: Policy | None = None,
    *,
    envs: dict[str, str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    approver: Approver | None = None,
    gate: Gate | None = None,
    findings: list[Finding] | None = None,
    run_id: str | None = None,
    defaults: Policy | None = None,
) -> Execution:
    """Run `code` in a fresh sandbox as a program (`__main__`), then destroy the sandbox.

    `exit_code` is the program's status: 0, 1 after an uncaught exception, the value of
    `sys.exit(n)`, or 128+signal when the jail killed it (`killed_by` says why).
    Static analysis and approvals apply as for `Sandbox.run_code` (`approver` answers).
    """
    return run_prepared(
        prepare_code(code),
        policy or Policy(),
        envs=envs,
        on_event=on_event,
        approver=approver,
        gate=gate,
        findings=findings,
        run_id=run_id,
        defaults=defaults,
    )


def run_prepared(
    text: str,
    policy: Policy,
    *,
    envs: dict[str, str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    approver: Approver | None = None,
    gate: Gate | None = None,
    findings: list[Finding] | None = None,
    run_id: str | None = None,
    defaults: Policy | None = None,
) -> Execution:
    """`run` of code already through `prepare_code` (the service's Manager prepares it once,
    with its static analysis, before the run is recorded)."""
    from ._approvals import Gate

    envs = check_envs(envs)  # before anything asks a person about them, as a cell's are
    jail = get_jail(policy.isolation)
    jail.check(policy)
    gate = gate or Gate(approver=approver)
    gate.limits(policy, defaults)
    findings = gate.code(policy, text, findings, run_id=run_id, on_event=on_event, envs=envs)
    sandbox = jail.create(policy, envs)
    try:
        kwargs: dict[str, Any] = {"mode": "main", "recover": False}
        if on_event is not None:
            kwargs["on_event"] = on_event
        ex = sandbox.execute(text, **kwargs)
        ex.findings = findings
        return ex
    finally:
        sandbox.kill()
