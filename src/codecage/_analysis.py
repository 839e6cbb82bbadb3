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

# Bounds: analysis runs on the host before every run; larger or deeper code is not parsed
# (a finding of its own, high: a policy that asks for analysis fails closed).
MAX_ANALYSED_BYTES = 64 * 1024

# IPython magics, by what their body or argument is.
_SHELL_MAGICS = {"system", "sx", "sc", "sh", "bash", "script", "pip", "conda", "mamba", "perl",
                 "ruby", "python", "python2", "python3", "pypy"}  # fmt: skip
_PY_MAGICS = {"time", "timeit", "prun", "debug", "capture"}  # the rest of the line/cell is Python
_TEXT_CELL_MAGICS = {"html", "markdown", "latex", "javascript", "js", "svg", "writefile", "file"}
_MAGIC_LINE = re.compile(r"^(\s*)(?:[A-Za-z_][\w, ]*=\s*)?([!%])(%?)(\w*)(.*)$")
_MAGIC_OPTIONS = re.compile(r"^(?:-[nrpl]\s*\d+\s+|-[tcqo]\s+)*")


def analyze(code: str) -> list[Finding]:
    """Findings for `code`, a cell (IPython's `!cmd` and `%magic` lines are understood).
    Never raises: code it cannot analyse is a finding, high when IPython syntax or the size
    hides what it would do, low for plain invalid Python (which cannot run either)."""
    if len(code.encode("utf-8", "surrogatepass")) > MAX_ANALYSED_BYTES:
        return [_unanalysed(1, f"larger than {MAX_ANALYSED_BYTES} bytes")]
    try:
        return _sorted(_analyze(code))
    except (RecursionError, MemoryError, ValueError, SyntaxError) as exc:
        return [_unanalysed(1, f"too deep or too complex ({type(exc).__name__})")]


def _unanalysed(line: int, why: str) -> Finding:
    return Finding("CC002", "high", line, 0, f"could not be analysed: {why}")


def _parse(source: str) -> ast.AST:
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # IPython runs top-level await
    tree: ast.AST = compile(source, "<cell>", "exec", flags, dont_inherit=True)
    return tree


def _analyze(code: str) -> list[Finding]:
    try:
        return _Visitor().run(_parse(code))
    except SyntaxError:
        pass
    source, findings, changed = _strip_ipython(code)
    try:
        tree = _parse(source)
    except SyntaxError as exc:
        line = exc.lineno or 1
        if not changed:  # plain invalid Python: the kernel refuses it too, nothing runs
            return [Finding("CC001", "low", line, 0, f"not valid Python: {exc.msg}")]
        return [*findings, _unanalysed(line, f"IPython syntax around line {line}")]
    return findings + _Visitor().run(tree)


def at_or_above(findings: Iterable[Finding], severity: Severity | None) -> list[Finding]:
    """The findings of `severity` or worse (none when the threshold is None)."""
    if severity is None:
        return []
    floor = SEVERITIES.index(severity)
    return [f for f in findings if SEVERITIES.index(f.severity) >= floor]


def _sorted(findings: list[Finding]) -> list[Finding]:
    unique = {(f.rule, f.line, f.col, f.message): f for f in findings}
    return sorted(unique.values(), key=lambda f: (f.line, f.col, f.rule))


def _strip_ipython(code: str) -> tuple[str, list[Finding], bool]:
    """IPython's syntax made Python for analysis, line numbers kept: `!cmd` and shell
    magics become `pass` and a finding; `%time stmt` becomes `stmt`; other line magics
    `pass`. Only lines that start a logical line count (a `%` continuing an expression is
    the operator). A cell magic decides for the whole cell. Returns (source, findings,
    whether anything was IPython syntax)."""
    lines = code.split("\n")
    findings: list[Finding] = []
    shell = "runs a shell command (IPython escape)"
    first = _MAGIC_LINE.match(lines[0])
    if first is not None and first.group(2) == "%" and first.group(3):  # %%cell magic
        name, rest = first.group(4), first.group(5).strip()
        if name in _SHELL_MAGICS:
            return "", [Finding("CC103", "high", 1, 0, f"{shell}: %%{name}")], True
        if name in _TEXT_CELL_MAGICS:
            path = rest.split()[-1] if name in ("writefile", "file") and rest else None
            if path is not None and not _inside(path):
                findings.append(
                    Finding("CC501", "medium", 1, 0, f"writes outside the workspace: {path}")
                )
            return "", findings, True
        if name not in _PY_MAGICS:
            return "", [_unanalysed(1, f"unknown cell magic %%{name}")], True
        lines[0] = ""
    changed = first is not None and bool(first.group(3))
    state: tuple[int, str | None] = (0, None)
    continued = False
    for number, line in enumerate(lines, start=1):
        starts = state == (0, None) and not continued
        match = _MAGIC_LINE.match(line) if starts else None
        if match is not None:
            indent, sigil, cell, name, rest = match.groups()
            changed = True
            if sigil == "!" or name in _SHELL_MAGICS:
                findings.append(Finding("CC103", "high", number, len(indent), shell))
                line = f"{indent}pass"
            elif name in _PY_MAGICS and not cell:
                line = indent + (_MAGIC_OPTIONS.sub("", rest.strip()) or "pass")
            elif name == "run":
                findings.append(
                    Finding("CC104", "medium", number, len(indent), "runs a file as code: %run")
                )
                line = f"{indent}pass"
            else:
                line = f"{indent}pass"
            lines[number - 1] = line
        state = _scan(line, state)
        continued = line.rstrip().endswith("\\") and state[1] is None
    return "\n".join(lines), findings, changed


def _scan(line: str, state: tuple[int, str | None]) -> tuple[int, str | None]:
    """Bracket depth and the open triple-quoted string after `line` (strings and comments
    skipped): whether the next line continues a logical line."""
    depth, quote = state
    i, n = 0, len(line)
    while i < n:
        if quote is not None:
            end = line.find(quote, i)
            if end < 0:
                return depth, quote
            i, quote = end + len(quote), None
            continue
        c = line[i]
        if c == "#":
            break
        if c in "\"'":
            triple = line[i : i + 3]
            if triple in ('"""', "'''"):
                quote, i = triple, i + 3
                continue
            j = i + 1
            while j < n and line[j] != c:
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        i += 1
    return depth, quote


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
        """`a.b.c` with import aliases resolved, or None if the chain is not names."""
        attrs: list[str] = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return ".".join([self.aliases.get(node.id, node.id), *reversed(attrs)])

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
                self.add(node, ("CC303", "low", "looks up an attribute by a computed name"), name)
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


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_LOOPS = (ast.For, ast.While, ast.AsyncFor)


def _exits(body: list[ast.stmt]) -> bool:
    """Whether a loop body can leave the loop: a break of its own (not a nested loop's), a
    return, a raise or an exit() outside nested functions. Iterative: any depth."""
    stack: list[tuple[ast.AST, bool]] = [(stmt, False) for stmt in body]
    while stack:
        node, nested = stack.pop()
        if isinstance(node, (ast.Return, ast.Raise)) or (
            isinstance(node, ast.Break) and not nested
        ):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("exit", "_exit", "quit"):
                return True
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _SCOPES):
                stack.append((child, nested or isinstance(child, _LOOPS)))
    return False
