"""Code contexts: several independent interpreter states in one sandbox (E2B's contexts,
Jupyter's kernels). Each has an id, a language and a working directory.

- A Python context is an IPython shell of its own (namespace, execution count) in the
  kernel's process; the default one, DEFAULT, is the session's shell. The process's working
  directory follows the context whose cell runs (each keeps its own).
- A bash context is a bash process that keeps its state (cwd, variables, functions) across
  cells: a cell is sourced from a file, with stdin from /dev/null; its output goes to the
  kernel's descriptors 1 and 2 (forwarded as stdout/stderr events), and its status comes
  back on a pipe of its own.

One cell runs at a time in the whole sandbox (the host sends one request at a time). A
context's restart gives it a fresh state; code it started in the kernel's process (a Python
thread) is not stopped by that, only by a kernel restart, which ends every context (the host
creates them again, empty, with the same ids: HostSandbox.setup).
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

LANGUAGES = ("python", "bash")
DEFAULT = "default"  # the session's own Python context
DEFAULT_BASH = "default-bash"  # created on the first bash cell without a context
MAX_CONTEXTS = 64
HOME = "/home/user"

Sink = Callable[[str, dict[str, Any]], None]
Error = dict[str, str]


def check_language(language: object) -> str:
    name = "python" if language in (None, "") else str(language).strip().lower()
    if name not in LANGUAGES:
        raise ValueError(
            f"unsupported language {str(language)[:40]!r}: supported are {', '.join(LANGUAGES)}"
        )
    return name


class PythonContext:
    language = "python"

    def __init__(self, cid: str, cwd: str, make: Callable[[], Any]) -> None:
        self.id, self.cwd, self.home, self._make = cid, cwd, cwd, make
        self.shell: Any = None

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def run(
        self, code: str, envs: Mapping[str, str], sink: Sink, base: Mapping[str, str]
    ) -> tuple[int, Error | None, None]:
        from . import shell as ipython

        if self.shell is None:
            self.shell = self._make()
        with contextlib.suppress(OSError):  # removed meanwhile: it runs where the process is
            os.chdir(self.cwd)
        ipython.activate(self.shell)
        try:
            count, error = ipython.run_cell(self.shell, code, sink)
        finally:
            with contextlib.suppress(OSError):
                self.cwd = os.getcwd()
        return count, error, None

    def restart(self) -> None:
        if self.shell is not None:
            self.shell.reset(new_session=False)
            self.shell.execution_count = 1
        self.cwd = self.home

    def close(self) -> None:
        if self.shell is not None:
            self.shell.reset(new_session=False)
            self.shell = None


class BashContext:
    language = "bash"

    def __init__(self, cid: str, cwd: str) -> None:
        self.id, self.cwd = cid, cwd
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._commands = self._status = self._bash_fd = -1
        self._dir = ""
        self.start()

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def start(self) -> None:
        if not os.path.isdir(self.cwd):
            raise FileNotFoundError(2, "no such directory", self.cwd)
        self._dir = tempfile.mkdtemp(prefix=".codecage-bash-", dir="/tmp")
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        commands_r, commands_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                ["/bin/bash", "--noprofile", "--norc"],
                stdin=commands_r,
                pass_fds=(status_w,),
                cwd=self.cwd,
                env=dict(os.environ),
            )
        finally:
            os.close(commands_r)
            os.close(status_w)
        # status_w is the shell's own descriptor number (pass_fds keeps it); ours is closed,
        # so the shell's end is the pipe's end of file.
        self._commands, self._status, self._bash_fd = commands_w, status_r, status_w
        # An interrupt stops the cell, never the shell (and the state it keeps).
        self._send("trap 'return 130 2>/dev/null' INT\n")

    def _send(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(self._commands, data) :]

    def run(
        self, code: str, envs: Mapping[str, str], sink: Sink, base: Mapping[str, str]
    ) -> tuple[int, Error | None, int | None]:
        """`envs` for this cell only; `base` is the session's environment they go back to."""
        self.count += 1
        token = os.urandom(8).hex()
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.stop()
                self.start()  # the shell exited (`exit`): a new one, its state is gone
            path = os.path.join(self._dir, f"cell-{self.count}.sh")
            with open(path, "w", encoding="utf-8") as f:  # /tmp may be full: an error, below
                f.write(code if code.endswith("\n") else code + "\n")
            fd = self._bash_fd
            sets = "".join(f"export {k}={shlex.quote(v)}; " for k, v in envs.items() if _name(k))
            resets = "".join(_reset(k, base) for k in envs if _name(k))
            self._send(
                f"{sets}source {shlex.quote(path)} </dev/null {fd}>&-; __cc_s=$?; {resets}"
                f'printf "%s %d %s\\n" {token} "$__cc_s" "$PWD" >&{fd}\n'
            )
        except OSError as exc:  # no room for the cell, no process for a shell, a dead pipe
            value = f"the bash context could not run the cell: {exc}"
            return self.count, {"name": type(exc).__name__, "value": value, "traceback": ""}, None
        status, interrupted = self._wait(token)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if status is None:
            return (
                self.count,
                {"name": "BashExited", "value": _gone(self.proc), "traceback": ""},
                None,
            )
        code_, _, cwd = status.partition(" ")
        self.cwd = cwd or self.cwd
        exit_code = int(code_) if code_.lstrip("-").isdigit() else 1
        if interrupted:
            return (
                self.count,
                {"name": "KeyboardInterrupt", "value": "interrupted", "traceback": ""},
                exit_code,
            )
        if exit_code != 0:
            error = {
                "name": "ExitCodeError",
                "value": f"the cell's last command exited with status {exit_code}",
                "traceback": "",
            }
            return self.count, error, exit_code
        return self.count, None, 0

    def _wait(self, token: str) -> tuple[str | None, bool]:
        """The cell's status line, or None if the shell died; whether it was interrupted
        (an interrupt reaches the shell too: its trap ends the cell, the status follows)."""
        buf, interrupted = b"", False
        while True:
            try:
                ready, _, _ = select.select([self._status], [], [], 0.5)
                if not ready:
                    if self.proc is not None and self.proc.poll() is not None:
                        return None, interrupted
                    continue
                data = os.read(self._status, 4096)
            except KeyboardInterrupt:
                interrupted = True
                continue
            if not data:
                return None, interrupted
            buf += data
            for line in buf.decode("utf-8", "replace").splitlines():
                if line.startswith(token + " "):
                    return line[len(token) + 1 :], interrupted

    def restart(self) -> None:
        self.stop()
        self.count = 0
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
        for fd in (self._commands, self._status):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._commands = self._status = -1
        if self._dir:
            for name in os.listdir(self._dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self._dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)
            self._dir = ""

    close = stop


def _name(key: str) -> bool:
    return key.isidentifier() and key.isascii()


def _reset(key: str, base: Mapping[str, str]) -> str:
    """Back to the session's own value after the cell (or unset if it had none)."""
    if key in base:
        return f"export {key}={shlex.quote(base[key])}; "
    return f"unset {key}; "


def _gone(proc: subprocess.Popen[bytes] | None) -> str:
    code = None if proc is None else proc.wait()
    how = f"exit status {code}" if code is None or code >= 0 else f"signal {-code}"
    return f"the bash shell ended ({how}); its state is lost, the next cell starts a new one"


Context = PythonContext | BashContext


class Contexts:
    """Every context of the kernel, in creation order; the default Python one first."""

    def __init__(self, session_shell: Callable[[], Any], make_shell: Callable[[], Any]) -> None:
        self._make_shell = make_shell
        default = PythonContext(DEFAULT, HOME, session_shell)
        self.all: dict[str, Context] = {DEFAULT: default}
        self.selected: Context | None = None

    def create(self, cid: object, language: object, cwd: object) -> Context:
        name = check_language(language)
        if not isinstance(cid, str) or not cid or len(cid) > 64:
            raise ValueError("a context id must be a string of 1 to 64 characters")
        if cid in self.all:
            raise ValueError(f"context {cid!r} exists already")
        if len(self.all) >= MAX_CONTEXTS:
            raise ValueError(f"a sandbox holds at most {MAX_CONTEXTS} contexts")
        where = HOME if cwd in (None, "") else os.path.normpath(os.path.join(HOME, str(cwd)))
        if not os.path.isdir(where):
            raise FileNotFoundError(2, "no such directory", where)
        context: Context = (
            PythonContext(cid, where, self._make_shell)
            if name == "python"
            else BashContext(cid, where)
        )
        self.all[cid] = context
        return context

    def get(self, cid: object) -> Context:
        context = self.all.get(cid) if isinstance(cid, str) else None
        if context is None:
            raise LookupError(f"context {str(cid)[:80]!r} not found")
        return context

    def select(self, cid: object, language: object) -> Context:
        """The context the next cell runs in: by id, or the language's default."""
        if cid not in (None, ""):
            context = self.get(cid)
        elif check_language(language) == "bash":
            context = self.all.get(DEFAULT_BASH) or self.create(DEFAULT_BASH, "bash", HOME)
        else:
            context = self.all[DEFAULT]
        self.selected = context
        return context

    def take(self) -> Context:
        """The selected context, for one cell (then the default again)."""
        context, self.selected = self.selected, None
        return context or self.all[DEFAULT]

    def remove(self, cid: object) -> None:
        context = self.get(cid)
        if context.id == DEFAULT:
            raise ValueError("the default context cannot be removed (restart it instead)")
        context.close()
        del self.all[context.id]


OPS = ("context_create", "context_list", "context_select", "context_restart", "context_remove")
