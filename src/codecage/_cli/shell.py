"""`codecage shell`: an interactive session for a person (multi-line input, images saved)."""

from __future__ import annotations

import base64
import codeop
import sys
import warnings
from pathlib import Path
from typing import TextIO

from .._errors import ApprovalDenied, CodeRejected
from .._models import Execution
from .._policy import Policy
from .._sandbox import OutputMessage, Sandbox
from .prompt import terminal_approver
from .terminal import for_stream


def _complete(source: str) -> bool:
    """Whether `source` is a whole statement (a blank line ends a block, as in Python's REPL)."""
    if source.endswith("\n\n") or source.lstrip().startswith(("!", "%")):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return codeop.compile_command(source, "<shell>", "exec") is not None
    except (SyntaxError, ValueError, OverflowError):
        return True  # let the kernel report it


def _read_cell(stdin: TextIO, tty: bool) -> str | None:
    lines: list[str] = []
    while True:
        if tty:
            print("... " if lines else ">>> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            return "".join(lines) or None
        lines.append(line if line.endswith("\n") else line + "\n")
        if _complete("".join(lines)):
            return "".join(lines)


def _show(ex: Execution, out_dir: Path, counter: list[int]) -> None:
    for result in ex.results:
        for fmt in ("png", "jpeg"):
            data = getattr(result, fmt)
            if data:
                counter[0] += 1
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"image-{counter[0]}.{fmt}"
                path.write_bytes(base64.b64decode(data))
                print(f"[image saved to {path}]")
        if result.is_main_result and result.text is not None and not (result.png or result.jpeg):
            print(for_stream(sys.stdout, result.text))
    if ex.error is not None:
        text = ex.error.traceback or f"{ex.error.name}: {ex.error.value}"
        print(for_stream(sys.stderr, text), file=sys.stderr)
    if ex.killed_by:
        print(
            f"[killed by {ex.killed_by}{'; variables lost' if ex.state_lost else ''}]",
            file=sys.stderr,
        )


def run_shell(policy: Policy, out_dir: Path) -> int:
    tty = sys.stdin.isatty()
    counter = [0]

    def echo(stream: TextIO) -> object:
        def write(msg: OutputMessage) -> None:
            stream.write(for_stream(stream, msg.line))
            stream.flush()

        return write

    with Sandbox(policy, approver=terminal_approver) as sbx:
        if tty:
            print(f"codecage shell: sandbox {sbx.id} (Ctrl-D to leave)")
        while True:
            try:
                cell = _read_cell(sys.stdin, tty)
            except KeyboardInterrupt:
                print()
                continue
            if cell is None:
                return 0
            if not cell.strip():
                continue
            try:
                ex = sbx.run_code(cell, on_stdout=echo(sys.stdout), on_stderr=echo(sys.stderr))  # type: ignore[arg-type]
            except (CodeRejected, ApprovalDenied) as exc:  # the cell never ran; the session goes on
                print(for_stream(sys.stderr, f"[{exc}]"), file=sys.stderr)
                continue
            for finding in ex.findings:
                print(for_stream(sys.stderr, f"[static analysis: {finding}]"), file=sys.stderr)
            _show(ex, out_dir, counter)
