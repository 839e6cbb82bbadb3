"""Static analysis of code before it runs: findings on the AST, never string matching.

Advisory, defence in depth: it names what code *says* it will do (spawn processes, open
sockets, run dynamic code, load native code, write outside the workspace, loop for ever).
Code that hides its intent (names built from strings, `vars(builtins)[...]`, a library
that does the work) passes unseen; tests/test_analysis.py documents those misses. The
jail is what makes such code harmless. A policy may block runs, or ask for a person's
approval, from a given severity up (`analysis_block_at`, `approval_findings_at`).
"""

from __future__ import annotations

import ast
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

from ._models import Finding
from ._policy import SEVERITIES, Severity

WORKSPACE = "/home/user"
WRITABLE = ("/home/user", "/tmp", "/dev/shm", "/dev/null")

# Modules whose import alone says what the code means to do.
MODULES: dict[str, tuple[str, Severity, str]] = {
    "subprocess": ("CC101", "high", "spawns processes"),
    "pty": ("CC101", "high", "spawns processes"),
    "multiprocessing": ("CC101", "high", "spawns processes"),
    "socket": ("CC201", "medium", "uses the network"),
    "ssl": ("CC201", "medium", "uses the network"),
    "socketserver": ("CC201", "medium", "uses the network"),
    "http.client": ("CC201", "medium", "uses the network"),
    "http.server": ("CC201", "medium", "uses the network"),
    "urllib.request": ("CC201", "medium", "uses the network"),
    "urllib3": ("CC201", "medium", "uses the network"),
    "requests": ("CC201", "medium", "uses the network"),
    "httpx": ("CC201", "medium", "uses the network"),
    "aiohttp": ("CC201", "medium", "uses the network"),
    "ftplib": ("CC201", "medium", "uses the network"),
    "smtplib": ("CC201", "medium", "uses the network"),
    "poplib": ("CC201", "medium", "uses the network"),
    "imaplib": ("CC201", "medium", "uses the network"),
    "telnetlib": ("CC201", "medium", "uses the network"),
    "xmlrpc.client": ("CC201", "medium", "uses the network"),
    "ctypes": ("CC401", "high", "loads native code"),
    "_ctypes": ("CC401", "high", "loads native code"),
    "cffi": ("CC401", "high", "loads native code"),
}

# Names (after resolving import aliases) whose mere use is a finding: `f = os.system` counts.
NAMES: dict[str, tuple[str, Severity, str]] = {
    "os.system": ("CC102", "high", "runs a shell command"),
    "os.popen": ("CC102", "high", "runs a shell command"),
    "os.fork": ("CC102", "high", "spawns processes"),
    "os.forkpty": ("CC102", "high", "spawns processes"),
    "os.posix_spawn": ("CC102", "high", "spawns processes"),
    "os.posix_spawnp": ("CC102", "high", "spawns processes"),
    "socket.socket": ("CC202", "medium", "opens a socket"),
    "socket.create_connection": ("CC202", "medium", "opens a connection"),
    "urllib.request.urlopen": ("CC202", "medium", "opens a URL"),
    "asyncio.open_connection": ("CC202", "medium", "opens a connection"),
    "exec": ("CC301", "high", "runs dynamic code"),
    "eval": ("CC301", "high", "runs dynamic code"),
    "compile": ("CC301", "high", "compiles dynamic code"),
    "__import__": ("CC302", "medium", "imports a module by a computed name"),
    "importlib.import_module": ("CC302", "medium", "imports a module by a computed name"),
    "importlib.__import__": ("CC302", "medium", "imports a module by a computed name"),
    "builtins.exec": ("CC301", "high", "runs dynamic code"),
    "builtins.eval": ("CC301", "high", "runs dynamic code"),
    "ctypes.CDLL": ("CC402", "high", "loads a shared library"),
    "ctypes.cdll": ("CC402", "high", "loads a shared library"),
    "ctypes.PyDLL": ("CC402", "high", "loads a shared library"),
}
NAME_PREFIXES: dict[str, tuple[str, Severity, str]] = {
    "os.exec": ("CC102", "high", "replaces the process with another program"),
    "os.spawn": ("CC102", "high", "spawns processes"),
}

# Attributes used to walk from any object to the interpreter's internals.
ESCAPE_ATTRS = frozenset(
    {
        "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__mro__",
        "__bases__", "__base__", "__loader__", "__spec__", "f_globals", "f_locals", "f_back",
        "f_builtins", "gi_frame", "cr_frame", "ag_frame", "tb_frame",
    }
)  # fmt: skip

WRITE_CALLS = {
    "os.remove", "os.unlink", "os.rmdir", "os.removedirs", "os.rename", "os.replace",
    "os.mkdir", "os.makedirs", "os.chmod", "os.chown", "os.symlink", "os.link", "os.truncate",
    "shutil.rmtree", "shutil.move", "shutil.copy", "shutil.copy2", "shutil.copyfile",
    "shutil.copytree",
}  # fmt: skip
PATH_WRITES = {
    "write_text",
    "write_bytes",
    "touch",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "replace",
}

_SHELL_MAGICS = {"system", "sx", "sh", "bash", "script", "!"}
_IPYTHON_LINE = re.compile(r"^(\s*)(?:[A-Za-z_][\w, ]*=\s*)?([!%])(%?)(\w*)")


def analyze(code: str) -> list[Finding]:
    """Findings for `code` (a cell: IPython's `!cmd` and `%magic` lines are understood)."""
    source, findings = _strip_ipython(code)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or 1
        findings.append(
            Finding(
                "CC001",
                "low",
                line,
                0,
                f"not valid Python, not analysed: {exc.msg if isinstance(exc, SyntaxError) else exc}",
            )
        )
        return _sorted(findings)
    return _sorted(findings + _Visitor().run(tree))


def at_or_above(findings: Iterable[Finding], severity: Severity | None) -> list[Finding]:
    """The findings of `severity` or worse (none when the threshold is None)."""
    if severity is None:
        return []
    floor = SEVERITIES.index(severity)
    return [f for f in findings if SEVERITIES.index(f.severity) >= floor]


def _sorted(findings: list[Finding]) -> list[Finding]:
    unique = {(f.rule, f.line, f.col, f.message): f for f in findings}
    return sorted(unique.values(), key=lambda f: (f.line, f.col, f.rule))


def _strip_ipython(code: str) -> tuple[str, list[Finding]]:
    """Blank out IPython's `!cmd` and `%magic` lines (keeping line numbers) and report the
    shell escapes among them; a `%%bash`-style cell magic makes the whole cell a script."""
    lines = code.split("\n")
    findings: list[Finding] = []
    for number, line in enumerate(lines, start=1):
        match = _IPYTHON_LINE.match(line)
        if match is None:
            continue
        indent, sigil, cell, name = match.groups()
        if sigil == "!" or name in _SHELL_MAGICS:
            findings.append(
                Finding(
                    "CC103", "high", number, len(indent), "runs a shell command (IPython escape)"
                )
            )
        if cell and number == 1:
            return "", findings  # the rest of the cell belongs to the magic, not to Python
        lines[number - 1] = f"{indent}pass"
    return "\n".join(lines), findings


class _Visitor:
    """Two flat passes over every node (no recursion, order-independent): imports and their
    aliases first, then every use."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.aliases: dict[str, str] = {}

    def run(self, tree: ast.AST) -> list[Finding]:
        nodes = _nodes(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                self.visit_Import(node)
            elif isinstance(node, ast.ImportFrom):
                self.visit_ImportFrom(node)
        handlers: dict[type[ast.AST], Callable[[Any], None]] = {
            ast.Name: self.visit_Name,
            ast.Attribute: self.visit_Attribute,
            ast.Call: self.visit_Call,
            ast.While: self.visit_While,
            ast.For: self.visit_For,
        }
        for node in nodes:
            handler = handlers.get(type(node))
            if handler is not None:
                handler(node)
        return self.findings

    def add(self, node: ast.AST, rule: tuple[str, Severity, str], subject: str) -> None:
        rid, severity, what = rule
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 0)
        self.findings.append(Finding(rid, severity, line, col, f"{what}: {subject}"))

    # -- imports ---------------------------------------------------------------------------

    def _module(self, node: ast.AST, name: str) -> None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            rule = MODULES.get(".".join(parts[:i]))
            if rule is not None:
                self.add(node, rule, f"import {name}")
                return

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._module(node, alias.name)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module:
            self._module(node, module)
        for alias in node.names:
            full = f"{module}.{alias.name}" if module else alias.name
            if node.level == 0 and module:
                if full in MODULES:
                    self._module(node, full)
                self._name(node, full)
            self.aliases[alias.asname or alias.name] = full

    # -- names -----------------------------------------------------------------------------

    def _qualified(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._qualified(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def _name(self, node: ast.AST, name: str) -> bool:
        rule = NAMES.get(name)
        if rule is None:
            rule = next((r for p, r in NAME_PREFIXES.items() if name.startswith(p)), None)
        if rule is None:
            return False
        self.add(node, rule, name)
        return True

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._name(node, self.aliases.get(node.id, node.id))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ESCAPE_ATTRS:
            self.add(node, ("CC701", "high", "reaches interpreter internals"), node.attr)
        name = self._qualified(node)
        if isinstance(node.ctx, ast.Load) and name is not None:
            self._name(node, name)

    # -- calls -----------------------------------------------------------------------------

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualified(node.func)
        if name in ("getattr", "setattr", "delattr", "builtins.getattr") and len(node.args) >= 2:
            attr = node.args[1]
            if not isinstance(attr, ast.Constant):
                self.add(
                    node, ("CC303", "medium", "looks up an attribute by a computed name"), name
                )
            elif isinstance(attr.value, str) and attr.value in ESCAPE_ATTRS:
                self.add(node, ("CC701", "high", "reaches interpreter internals"), attr.value)
            elif isinstance(attr.value, str):
                target = self._qualified(node.args[0])
                if target is not None:
                    self._name(node, f"{target}.{attr.value}")
        self._file_write(node, name)

    def _file_write(self, node: ast.Call, name: str | None) -> None:
        target: ast.AST | None = None
        if name in ("open", "io.open", "builtins.open"):
            mode = node.args[1] if len(node.args) > 1 else _keyword(node, "mode")
            if (
                isinstance(mode, ast.Constant)
                and isinstance(mode.value, str)
                and set(mode.value) & set("wax+")
            ):
                target = node.args[0] if node.args else _keyword(node, "file")
        elif name in WRITE_CALLS:
            target = (
                node.args[-1]
                if name.startswith("shutil.") and len(node.args) > 1
                else (node.args[0] if node.args else None)
            )
        elif isinstance(node.func, ast.Attribute) and node.func.attr in PATH_WRITES:
            inner = node.func.value
            if isinstance(inner, ast.Call) and self._qualified(inner.func) in (
                "pathlib.Path",
                "Path",
                "pathlib.PurePath",
            ):
                target = inner.args[0] if inner.args else None
        path = _literal_path(target)
        if path is not None and not _inside(path):
            self.add(node, ("CC501", "medium", "writes outside the workspace"), path)

    # -- loops -----------------------------------------------------------------------------

    def visit_While(self, node: ast.While) -> None:
        test = node.test
        if isinstance(test, ast.Constant) and bool(test.value) and not _exits(node.body):
            self.add(
                node,
                ("CC601", "low", "loops for ever"),
                "while with a constant true test and no break",
            )

    def visit_For(self, node: ast.For) -> None:
        endless = ("itertools.count", "itertools.cycle", "itertools.repeat")
        call = node.iter
        if (
            isinstance(call, ast.Call)
            and self._qualified(call.func) in endless
            and not call.args[1:]
            and not _exits(node.body)
        ):
            self.add(
                node,
                ("CC601", "low", "loops for ever"),
                "for over an endless iterator and no break",
            )


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree, breadth first (ast.walk without its generators: ~2x faster,
    and this runs before every run)."""
    out, i = [tree], 0
    while i < len(out):
        node = out[i]
        i += 1
        for name in node._fields:
            value = getattr(node, name, None)
            if isinstance(value, list):
                out.extend(v for v in value if isinstance(v, ast.AST))
            elif isinstance(value, ast.AST):
                out.append(value)
    return out


def _keyword(node: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def _literal_path(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        head = str(node.values[0].value)
        return head if head.startswith("/") else None  # f"/etc/{x}": the fixed part decides
    return None


def _inside(path: str) -> bool:
    full = posixpath.normpath(posixpath.join(WORKSPACE, path))
    return any(full == root or full.startswith(root + "/") for root in WRITABLE)


def _exits(body: list[ast.stmt]) -> bool:
    """Whether a loop body can leave the loop: a break of its own, a return or a raise."""
    for stmt in body:
        for node in _walk_same_loop(stmt):
            if isinstance(node, (ast.Break, ast.Return, ast.Raise)):
                return True
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                if name in ("exit", "_exit", "quit"):
                    return True
    return False


def _walk_same_loop(node: ast.AST) -> Iterable[ast.AST]:
    """ast.walk, without descending into nested loops (their break is theirs) or functions."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(
            child,
            (
                ast.For,
                ast.While,
                ast.AsyncFor,
                ast.FunctionDef,
                ast.AsyncFunctionDef,
                ast.Lambda,
                ast.ClassDef,
            ),
        ):
            if isinstance(child, (ast.For, ast.While, ast.AsyncFor)):
                for sub in child.body + child.orelse:
                    for inner in _walk_same_loop(sub):
                        if isinstance(inner, (ast.Return, ast.Raise)):
                            yield inner
            continue
        yield from _walk_same_loop(child)
