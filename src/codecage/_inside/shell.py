"""IPython inside the jail: execution, magics, `!cmd`, and rich display as MIME bundles.

The template builds one shell (history off: no thread, no sqlite file), warms what IPython
and matplotlib load lazily, and resets it; every sandbox's kernel inherits it by fork.
Display goes to a sink that the kernel points at its channel.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from . import charts

Sink = Callable[[str, dict[str, Any]], None]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _discard(kind: str, payload: dict[str, Any]) -> None:
    pass


class _State:
    sink: Sink = _discard
    error: dict[str, str] | None = None


state = _State()


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for mime, value in data.items():
        if isinstance(value, bytes):  # images may arrive as raw bytes
            value = base64.b64encode(value).decode()
        out[mime] = value
    return out


class CageDisplayHook(DisplayHook):
    """The value of a cell's last expression: the main result."""

    def start_displayhook(self) -> None:
        pass

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        state.sink("result", {"data": _jsonable(format_dict), "is_main_result": True})

    def finish_displayhook(self) -> None:
        pass


class CageDisplayPublisher(DisplayPublisher):
    """display(), plt.show() and figures left open: extra results."""

    def publish(
        self, data: dict[str, Any], metadata: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        state.sink("result", {"data": _jsonable(data), "is_main_result": False})

    def clear_output(self, wait: bool = False) -> None:
        pass


class CageShell(InteractiveShell):
    displayhook_class = CageDisplayHook
    display_pub_class = CageDisplayPublisher

    def enable_gui(self, gui: Any = None) -> None:
        pass  # no event loops in a sandbox

    def system_piped(self, cmd: str) -> None:
        """`!cmd` through a plain subprocess (no pty, so no \\r\\n): its descriptors 1 and 2
        are the kernel's, whose output is already forwarded to the host."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        code = subprocess.call(
            ["/bin/sh", "-c", self.var_expand(cmd, depth=1)], stdin=subprocess.DEVNULL
        )
        self.user_ns["_exit_code"] = code

    system = system_piped

    def _showtraceback(self, etype: Any, evalue: Any, stb: Any) -> None:
        text = "\n".join(stb) if isinstance(stb, list) else str(stb)
        state.error = {
            "name": getattr(etype, "__name__", str(etype)),
            "value": str(evalue),
            "traceback": _ANSI.sub("", text),
        }


def _config() -> Config:
    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    config.InteractiveShell.autocall = 0
    config.InlineBackend.figure_formats = {"png"}
    return config


def make_shell() -> CageShell:
    """The session's shell: the default context's (and the one get_ipython() returns)."""
    shell: CageShell = CageShell.instance(config=_config())
    shell.enable_matplotlib("inline")
    charts.install(shell)
    _show_saved_images()
    return shell


def _show_saved_images() -> None:
    """An image that a cell's own code saves to a file is also one of its results (as in
    E2B's sandboxes): PIL's Image.save to a path displays the image first. Saves made by
    matplotlib (savefig: its figure is a result already) or by PIL itself are left alone."""
    pil = sys.modules.get("PIL.Image")  # matplotlib (enable_matplotlib) has loaded it
    if pil is None or getattr(pil.Image.save, "_codecage", False):
        return
    original = pil.Image.save

    def save(image: Any, fp: Any, *args: Any, **params: Any) -> Any:
        caller = str(sys._getframe(1).f_globals.get("__name__", ""))
        mine = not caller.startswith(("matplotlib", "PIL", "IPython"))
        if mine and isinstance(fp, (str, os.PathLike)) and state.sink is not _discard:
            from IPython.display import display

            with contextlib.suppress(Exception):  # the file is what was asked for
                display(image)
        return original(image, fp, *args, **params)

    save._codecage = True  # type: ignore[attr-defined]
    pil.Image.save = save


def make_context_shell() -> CageShell:
    """Another context's shell: its own namespace (`__main__` module), execution count and
    display formatter, in the same process as the session's."""
    shell = CageShell(config=_config(), user_module=types.ModuleType("__main__"))
    shell.enable_matplotlib("inline")
    charts.install(shell)
    return shell


def activate(shell: CageShell) -> None:
    """Make `shell` the one code sees (get_ipython(), display(), `__main__`) for its cell."""
    for cls in (CageShell, InteractiveShell):
        cls._instance = shell
    sys.modules["__main__"] = shell.user_module


def warm(shell: CageShell) -> None:
    """Pay here, once, for what the first cell of every sandbox would otherwise load."""
    shell.run_cell("x = 1\nx + 1", store_history=True)
    shell.run_cell("1/0", store_history=True)
    shell.run_cell("def f(:\n", store_history=True)
    shell.run_cell(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.title('warm')\nplt.show()",
        store_history=True,
    )
    import pandas

    formatter = shell.display_formatter
    assert formatter is not None
    formatter.format(pandas.DataFrame({"a": [1]}))
    shell.run_cell("%time 1", store_history=True)
    buf = io.BytesIO()
    import matplotlib.pyplot as plt

    plt.figure()
    plt.savefig(buf, format="png")
    plt.close("all")
    shell.reset(new_session=False)
    shell.execution_count = 1
    state.error = None


def run_cell(shell: CageShell, code: str, sink: Sink) -> tuple[int, dict[str, str] | None]:
    """Run one cell; returns (its execution count, the error or None)."""
    state.sink, state.error = sink, None
    count = shell.execution_count
    try:
        shell.run_cell(code, store_history=True)
    finally:
        state.sink = _discard
    return count, state.error
