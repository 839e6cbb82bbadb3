"""The approval prompt at the terminal: how `codecage run` and `codecage shell` answer an
approval (the person at /dev/tty, never the sandbox's stdin)."""

from __future__ import annotations

from typing import Any

from .terminal import changed, clean

FILTERED_NOTICE = (
    "  ! it held terminal controls or bidirectional characters, removed from what is shown\n"
)


def terminal_approver(request: Any) -> Any:
    """The CLI's answer to an approval: ask the person at the terminal (never the sandbox's
    stdin); with no terminal, a no that says why."""
    from .._approvals import Decision

    try:
        # two text streams: "r+" on a terminal fails (a buffered random-access stream needs
        # a seekable file), which made every prompt a no
        tty_in = open("/dev/tty")  # noqa: SIM115 - closed below
    except OSError:
        return Decision(False, "cli", "no terminal to ask for approval")
    with tty_in, open("/dev/tty", "w") as tty:
        raw = str(request.subject)
        subject = clean(raw)
        if len(subject) > 2000:
            subject = subject[:2000] + "\n[...]"
        tty.write(f"\ncodecage: approval needed for {clean(str(request.kind))}:\n")
        for reason in request.reasons:
            tty.write(f"  - {clean(reason)}\n")
        if changed(raw) or any(changed(reason) for reason in request.reasons):
            tty.write(FILTERED_NOTICE)
        tty.write("---\n" + subject + ("" if subject.endswith("\n") else "\n") + "---\n")
        tty.write("approve? [y/N] ")
        tty.flush()
        reply = tty_in.readline().strip().lower()
    return Decision(reply in ("y", "yes"), "cli", "answered at the terminal")
