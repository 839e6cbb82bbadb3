"""Sandbox text on its way to the operator's terminal, through the real CLI on a real pty:
`codecage run`, `codecage shell`, the approval prompt, `codecage audit show/list`. Nothing a
terminal acts on may arrive: ESC sequences, C0 controls but tab and newline, C1 controls
(U+009B is CSI, U+009D is OSC), bidirectional overrides and isolates. Positive controls:
the same text reaches a pipe or the JSON output unfiltered, so it really was sent."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from codecage._cli.terminal import changed, clean

# Python source for the hostile string (ASCII itself, so typing it into a pty is harmless).
HOSTILE = (
    r'"<A>\x1b[2J\x9b2J\x9b31m<B>\x9d0;pwned\x07<C>\x90dcs\x9c<D>'
    r'\u202eevil\u202c\u2066x\u2069\u200f\u061c\u200e<E>over\rwrite\x1bc<F>"'
)
HOSTILE_TEXT: str = eval(HOSTILE)  # our own literal
SHOWN = "<A><B>0;pwned<C>dcs<D>evilx<E>overwrite<F>"  # what a terminal gets of it
# What a terminal would act on; a pty turns "\n" into "\r\n" itself (undone before checking).
FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# Runs the command with the pty as its controlling terminal and as stdin/stdout/stderr.
ON_PTY = r"""
import fcntl, os, sys, termios
os.setsid()
fd = int(sys.argv[1])
fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
for n in (0, 1, 2):
    os.dup2(fd, n)
os.execv(sys.executable, [sys.executable, "-m", "codecage", *sys.argv[2:]])
"""


class Pty:
    """A codecage command on a fresh pty (no echo: only what codecage writes is read)."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ON_PTY, str(slave), *args],
            pass_fds=(slave,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(slave)
        self.data = b""
        self.pos = 0  # where the next read_until looks from

    def read_until(self, needle: bytes | None, deadline_s: float = 120) -> None:
        """Read until `needle` has arrived after the previous one (None: until the command
        closes the pty). The deadline only keeps a broken command from hanging the suite."""
        end = time.monotonic() + deadline_s
        while needle is None or needle not in self.data[self.pos :]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            assert ready, f"nothing more from the command; so far: {self.data[-2000:]!r}"
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every end of the pty's other side is closed
                chunk = b""
            if not chunk:
                assert needle is None, f"ended before {needle!r}: {self.data[-2000:]!r}"
                return
            self.data += chunk
        self.pos = self.data.index(needle, self.pos) + len(needle)

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> tuple[int, str]:
        self.read_until(None)
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code, self.data.decode("utf-8", "replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):  # finish() closed it already
            os.close(self.master)


def assert_clean(shown: str, times: int) -> None:
    bad = sorted({f"U+{ord(c):04X}" for c in FORBIDDEN.findall(shown)})
    assert not bad, (bad, shown)
    assert shown.count(SHOWN) >= times, shown


def test_the_filter_leaves_nothing_a_terminal_acts_on() -> None:
    assert clean(HOSTILE_TEXT) == SHOWN
    assert changed(HOSTILE_TEXT) and not changed("plain text\twith tab\nand é, ü, 中文")
    rng = random.Random(1234)
    alphabet = [chr(c) for c in range(0x00, 0xA0)] + [chr(c) for c in range(0x2000, 0x2070)]
    alphabet += ["\u061c", "\x1b[", "\x1b]", "\x9b", "\x9d"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        out = clean(text)
        assert not FORBIDDEN.search(out.replace("\t", "").replace("\n", "")), repr(text)
        assert clean(out) == out and not changed(out)


requires_root = pytest.mark.requires_root

CODE = f"import sys\nS = {HOSTILE}\nprint(S)\nprint(S, file=sys.stderr)\nraise ValueError(S)\n"


@requires_root
def test_codecage_run_on_a_terminal() -> None:
    # Positive control: the sandbox really sends the raw text (to a pipe, and in --json).
    piped = subprocess.run(
        [sys.executable, "-m", "codecage", "run", "-c", CODE], capture_output=True
    )
    raw = HOSTILE_TEXT.encode()
    assert raw in piped.stdout and raw in piped.stderr, piped
    as_json = subprocess.run(
        [sys.executable, "-m", "codecage", "run", "--json", "-c", CODE],
        capture_output=True,
        text=True,
    )
    assert "".join(json.loads(as_json.stdout)["logs"]["stdout"]) == HOSTILE_TEXT + "\n"
    term = Pty("run", "-c", CODE)
    try:
        code, shown = term.finish()
    finally:
        term.close()
    assert code == 1, shown
    assert "ValueError" in shown
    assert_clean(shown, times=3)  # stdout, stderr, the traceback's message


@requires_root
def test_codecage_shell_on_a_terminal(tmp_path: Path) -> None:
    term = Pty("shell", "--images", str(tmp_path / "img"))
    try:
        term.read_until(b">>> ")
        term.write(f"S = {HOSTILE}\n")
        term.read_until(b">>> ")
        term.write("print(S)\n")
        term.read_until(b"<F>")
        term.read_until(b">>> ")
        term.write("raise ValueError(S)\n")
        term.read_until(b"ValueError")
        term.read_until(b">>> ")
        term.write("class R:\n    def __repr__(self): return S\n\nR()\n")
        term.read_until(b"write<F>")  # the result's text has its "\r" as a newline by now
        term.read_until(b">>> ")
        term.write("\x04")  # Ctrl-D: the end of input
        code, shown = term.finish()
    finally:
        term.close()
    assert code == 0, shown
    assert_clean(shown, times=2)  # printed, and in the traceback
    assert shown.count(SHOWN.split("over")[0]) == 3, shown  # and a result whose text is hostile


@requires_root
def test_the_approval_prompt_on_a_terminal() -> None:
    code = f"import subprocess\nNOTE = '''{HOSTILE_TEXT}'''\nprint('ran')\n"  # raw in the subject
    term = Pty("run", "--set", "approval_findings_at=high", "-c", code)
    try:
        term.read_until(b"approve? [y/N] ")
        term.write("n\n")
        status, shown = term.finish()
    finally:
        term.close()
    assert status != 0 and "ran\n" not in shown.split("approve? [y/N] ")[1], shown
    prompt = shown.split("approve? [y/N] ")[0]
    assert "held terminal controls or bidirectional characters" in prompt, prompt
    assert_clean(shown, times=1)


def test_codecage_audit_on_a_terminal(tmp_path: Path) -> None:
    from codecage._service.audit import AuditLog

    db = tmp_path / "audit.db"
    log = AuditLog(db)
    try:
        log.start_run(
            run_id="run-hostile",
            tenant="alice",
            sandbox_id="sbx-1",
            kind="execute",
            code=HOSTILE_TEXT + "\nprint(1)",
            policy={},
        )
        log.complete_run("run-hostile", outcome="ok", output=HOSTILE_TEXT)
    finally:
        log.close()
    # Positive control: the records hold the raw text, and a pipe gets it as it is.
    piped = subprocess.run(
        [sys.executable, "-m", "codecage", "audit", "show", "run-hostile", "--db", str(db)],
        capture_output=True,
        check=True,
    )
    assert piped.stdout.count(HOSTILE_TEXT.encode()) == 2, piped.stdout
    for args, times in ((("show", "run-hostile"), 2), (("list",), 0)):
        term = Pty("audit", *args, "--db", str(db))
        try:
            status, shown = term.finish()
        finally:
            term.close()
        assert status == 0, shown
        if times:
            assert_clean(shown, times=times)
        else:  # the list shows the code's first line, cut at 60 characters
            assert not FORBIDDEN.search(shown) and "<A><B>0;pwned<C>" in shown, shown
