"""Packages at run time without network: `pip install X` from the operator's wheelhouse.

The sandbox has no network (the boundary). Its pip is configured (host.environment) to
install only from a directory of wheels the host hands in (`FIND_LINKS`, never an index)
into a site directory in its workspace (`PREFIX`, on sys.path); the shared runtime stays
read-only. Before a cell or a command runs, the host finds the `pip install` in it
(`requested`), resolves those requirements against the operator's wheelhouse with the
runtime's own pip on the host (`Wheelhouse.resolve`: no index, wheels only, nothing built
or run), checks them against the policy (`packages_allow`, `approval_packages`), records
them (name, version, the sha256 of each wheel as the host read it) and writes those wheels
into the sandbox through its kernel. Only wheels the host chose ever reach the sandbox;
everything the sandbox says back is hostile input. docs/packages.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._errors import PackageRefused
from ._inside.packages import FIND_LINKS, PREFIX, site_dir

__all__ = ["FIND_LINKS", "PREFIX", "Wheel", "Wheelhouse", "requested", "site_dir", "wheelhouse_dir"]

DEFAULT_WHEELHOUSE = "/var/lib/codecage/wheelhouse"

MAX_REQUIREMENTS = 64  # per cell or command
MAX_REQUIREMENT_CHARS = 200
MAX_WHEEL_BYTES = 1 << 30
MAX_REPORT_BYTES = 4 << 20
RESOLVE_TIMEOUT_S = 120.0

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
_VERSION = r"[A-Za-z0-9.*+!_-]{1,64}"
_SPEC = rf"(?:~=|===|==|!=|<=|>=|<|>){_VERSION}"
REQUIREMENT = re.compile(
    rf"(?P<name>{_NAME})(?:\[(?P<extras>{_NAME}(?:,{_NAME}){{0,15}})\])?"
    rf"(?P<spec>{_SPEC}(?:,{_SPEC}){{0,7}})?"
)
NAME = re.compile(_NAME)
_WHEEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,254}\.whl")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# pip's options that take a value (skipped with it); the rest of the options are flags.
_WITH_VALUE = frozenset(
    [
        "-r",
        "--requirement",
        "-c",
        "--constraint",
        "-e",
        "--editable",
        "-t",
        "--target",
        "--prefix",
        "--root",
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "--platform",
        "--python-version",
        "--implementation",
        "--abi",
        "--src",
        "--progress-bar",
        "--log",
        "--cache-dir",
        "--timeout",
        "--retries",
        "--proxy",
        "--trusted-host",
        "--global-option",
        "--config-settings",
        "-C",
        "--upgrade-strategy",
        "--report",
        "--only-binary",
        "--no-binary",
        "--exists-action",
        "--root-user-action",
        "--python",
        "--keyring-provider",
        "--cert",
        "--client-cert",
        "--use-feature",
        "--use-deprecated",
    ]
)
_PIP = re.compile(r"pip(?:3(?:\.\d+)?)?")
_PYTHON = re.compile(r"python(?:3(?:\.\d+)?)?")
_SEPARATORS = frozenset({";", "&&", "||", "|", "&", "(", ")", "\n"})


def wheelhouse_dir() -> Path:
    """The operator's wheelhouse: $CODECAGE_WHEELHOUSE, else /var/lib/codecage/wheelhouse."""
    return Path(os.environ.get("CODECAGE_WHEELHOUSE", DEFAULT_WHEELHOUSE))


def canonical(name: str) -> str:
    """A project name as PEP 503 compares it: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- what a cell or a command asks for -------------------------------------------------------


def requested(text: str, shell: bool) -> list[str]:
    """The requirements of every `pip install` in `text`: a Python cell's `!pip ...`,
    `%pip ...` (and a bare `pip install ...` line, IPython's automagic), or, with `shell`,
    every command of a shell script. Paths, URLs and `$variables` are left to the sandbox's
    own pip (they can only name files inside it). A requirement that is none of these and
    not `name[extras]<spec>` is PackageRefused, as are more than MAX_REQUIREMENTS."""
    found: list[str] = []
    if shell:
        lines = text.replace("\\\n", " ").splitlines()
    else:
        lines = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("!") or stripped.startswith("%pip"):
                lines.append(stripped[1:])
            elif re.match(r"pip3?\s+install\b", stripped):
                lines.append(stripped)
    for line in lines:
        for words in _commands(line):
            found.extend(_install_args(words))
            if len(found) > MAX_REQUIREMENTS:
                raise PackageRefused(
                    f"more than {MAX_REQUIREMENTS} packages asked for at once: install them in parts"
                )
    return found


def _commands(line: str) -> Iterator[list[str]]:
    """Simple commands of a shell line (split at ;, &&, |, ...); a line shlex cannot split
    (an open quote) is split at white space."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:
        tokens = line.split()
    words: list[str] = []
    for token in tokens:
        if token in _SEPARATORS or set(token) <= set(";&|()"):
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def _install_args(words: list[str]) -> list[str]:
    """The requirements of one simple command, if it is a pip install."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value pip install ...
    if not words:
        return []
    program = words[0].rsplit("/", 1)[-1]
    if program in ("sh", "bash") and "-c" in words[1:-1]:  # bash -l -c "pip install ..."
        return requested(words[words.index("-c", 1) + 1], shell=True)
    if _PIP.fullmatch(program):
        args = words[1:]
    elif (_PYTHON.fullmatch(program) or words[0] == "{sys.executable}") and words[1:3] == [
        "-m",
        "pip",
    ]:
        args = words[3:]
    else:
        return []
    while args and args[0].startswith("-"):  # pip's general options before the command
        args = args[2:] if args[0] in _WITH_VALUE else args[1:]
    if not args or args[0] != "install":
        return []
    found, skip = [], False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _WITH_VALUE
        elif not _local(arg):
            found.append(_requirement(arg))
    return found


def _local(arg: str) -> bool:
    """A path, a URL or something only the sandbox's shell expands: its own pip's business."""
    return (
        any(c in arg for c in "/$`{}")
        or arg.startswith((".", "~"))
        or arg.endswith((".whl", ".zip", ".tar.gz"))
    )


def _requirement(arg: str) -> str:
    text = "".join(arg.split())
    if len(text) > MAX_REQUIREMENT_CHARS or not REQUIREMENT.fullmatch(text):
        shown = text[:80] + ("..." if len(text) > 80 else "")
        raise PackageRefused(
            f"{shown!r} is not a package the wheelhouse can provide: give a name, optionally "
            "with extras and a version (numpy, pandas==2.2.3, requests[socks]>=2)"
        )
    return text


# -- the wheelhouse -------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """One wheel the host hands in, as the host read it."""

    name: str  # canonical
    version: str
    wheel: str  # its file name
    sha256: str
    size: int
    requested: bool  # asked for by name (else: a dependency of what was)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name}=={self.version} ({self.wheel}, sha256 {self.sha256[:12]})"


class Wheelhouse:
    """The operator's directory of wheels, resolved with the runtime's own pip on the host
    (the interpreter the sandbox runs: its tags, its markers, its installed packages)."""

    def __init__(self, path: str | Path | None, python: Path, site_packages: Path | None) -> None:
        self.path = Path(path) if path is not None else wheelhouse_dir()
        self.python = python
        self.site_packages = site_packages
        self._installed: frozenset[str] | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """The runtime's Python "X.Y" (its site-packages' parent's name)."""
        parent = self.site_packages.parent.name if self.site_packages else ""
        return parent.removeprefix("python") or "3.11"

    def installed(self) -> frozenset[str]:
        """The canonical names of the runtime's own packages (read once)."""
        with self._lock:
            if self._installed is None:
                names = set()
                try:
                    entries = os.listdir(self.site_packages) if self.site_packages else []
                except OSError:
                    entries = []
                for entry in entries:
                    if entry.endswith(".dist-info"):
                        names.add(canonical(entry[: -len(".dist-info")].split("-")[0]))
                self._installed = frozenset(names)
            return self._installed

    def resolve(self, requirements: list[str]) -> list[Wheel]:
        """The wheels `pip install REQUIREMENTS` would install in the runtime from this
        wheelhouse alone (dependencies included; what the runtime has is not listed).
        PackageRefused, with pip's reason, when it cannot be done from the wheelhouse."""
        if not self.path.is_dir():
            raise PackageRefused(
                f"{', '.join(requirements)}: the operator's wheelhouse {self.path} does not "
                "exist (CODECAGE_WHEELHOUSE; docs/packages.md); the sandbox has no network"
            )
        with tempfile.TemporaryDirectory(prefix="codecage-pip-") as home:
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": home,
                "LC_ALL": "C.UTF-8",
                "PIP_CONFIG_FILE": os.devnull,
                "PYTHONDONTWRITEBYTECODE": "1",
            }
            command = [
                str(self.python), "-I", "-m", "pip", "install", "--dry-run", "--quiet",
                "--report", "-", "--no-index", "--find-links", str(self.path),
                "--only-binary", ":all:", "--no-cache-dir", "--disable-pip-version-check",
                "--no-input", "--", *requirements,
            ]  # fmt: skip
            try:
                done = subprocess.run(
                    command,
                    env=env,
                    cwd=home,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=RESOLVE_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise PackageRefused(f"the wheelhouse could not be searched: {exc}") from None
        if done.returncode != 0:
            said = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            why = "; ".join(ln.removeprefix("ERROR: ") for ln in said[-2:]) or "pip failed"
            raise PackageRefused(
                f"{', '.join(requirements)}: not available from the operator's wheelhouse "
                f"{self.path} (the sandbox has no network): {why[:500]}"
            )
        return self._wheels(done.stdout[:MAX_REPORT_BYTES])

    def _wheels(self, report: bytes) -> list[Wheel]:
        try:
            items = json.loads(report).get("install", [])
        except (ValueError, AttributeError):
            raise PackageRefused("the wheelhouse's resolution could not be read") from None
        root = self.path.resolve()
        wheels = []
        for item in items:
            url = str(item.get("download_info", {}).get("url", ""))
            meta = item.get("metadata", {})
            parsed = urllib.parse.urlparse(url)
            path = Path(urllib.request.url2pathname(parsed.path))
            if parsed.scheme != "file" or not _WHEEL_FILE.fullmatch(path.name):
                raise PackageRefused(f"{meta.get('name')}: not a wheel of the wheelhouse ({url})")
            real = path.resolve()
            if real.parent != root and root not in real.parents:
                raise PackageRefused(f"{path.name}: outside the wheelhouse {self.path}")
            wheels.append(
                Wheel(
                    name=canonical(str(meta.get("name", ""))),
                    version=str(meta.get("version", "")),
                    wheel=path.name,
                    sha256="",
                    size=0,
                    requested=bool(item.get("requested")),
                )
            )
        return wheels

    def open(self, wheel: Wheel) -> Iterator[bytes]:
        """A wheel's bytes, chunk by chunk, read from a regular file of the wheelhouse
        (no symlink followed out of it)."""
        path = self.path / wheel.wheel
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(file.fileno())
            if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > MAX_WHEEL_BYTES:
                raise PackageRefused(f"{wheel.wheel}: not a regular file under 1 GiB")
            while chunk := file.read(4 << 20):
                yield chunk
