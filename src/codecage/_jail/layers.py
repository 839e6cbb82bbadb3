"""The store of built templates (docs/templates.md): what a sandbox of a template needs on
the host, found by the template's name or id.

    <templates_dir>/index.json     {"names": {name: id}}, replaced whole (rename)
    <templates_dir>/<id>/meta.json what the build made: the spec, what it resolved to, sizes
    <templates_dir>/<id>/layer/    the packages, bound read-only into every sandbox of it at
                                   the same path; `site` its sys.path entry, `apt` the files
                                   of its apt packages (a root's usr/...)

The directory is CODECAGE_TEMPLATES (default /var/lib/codecage/templates). Templates are the
node's (the operator builds them with `codecage template build`), not a tenant's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import TemplateError, TemplateNotFound

DEFAULT_TEMPLATES = "/var/lib/codecage/templates"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ID = re.compile(r"[0-9a-f]{16}")
# What no template's name may be: E2B's default templates mean the base runtime.
BASE_NAMES = frozenset({"base", "code-interpreter-v1", "default"})


def templates_dir() -> Path:
    return Path(os.environ.get("CODECAGE_TEMPLATES", DEFAULT_TEMPLATES))


@dataclass(frozen=True)
class Layer:
    """A built template as a sandbox uses it."""

    id: str
    path: Path  # the layer directory (bound read-only, at this path)
    preload: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    meta: dict[str, Any]

    @property
    def site(self) -> Path:
        return self.path / "site"

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (a sandbox's environment before its own variables) with what the template
        adds: its env defaults, its site directory for the `python` that commands run, its
        apt files' programs and libraries."""
        env = base | dict(self.env)
        env["PYTHONPATH"] = str(self.site)
        programs = [self.site / "bin"]  # the packages' console scripts
        apt = self.path / "apt" / "usr"
        if apt.is_dir():
            libs = [str(p) for p in (apt / "lib", *apt.glob("lib/*-linux-gnu")) if p.is_dir()]
            env["LD_LIBRARY_PATH"] = ":".join(libs)
            programs.append(apt / "bin")
        found = [str(p) for p in programs if p.is_dir()]
        if found:
            env["PATH"] = ":".join([*found, env.get("PATH", "/usr/bin:/bin")])
        return env


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TemplateError(
            f"a template's name is 1-63 of a-z 0-9 . _ - starting with a letter or digit, "
            f"not {name!r}"
        )
    if name in BASE_NAMES or ID.fullmatch(name):
        raise TemplateError(f"{name!r} is reserved (the base runtime, or a template id)")
    return name


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """The store's lock: one build's commit, one removal at a time (across processes)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(root: Path | None = None) -> dict[str, str]:
    root = root or templates_dir()
    try:
        data = json.loads((root / "index.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TemplateError(
            f"the template index {root / 'index.json'} is unreadable: {exc}"
        ) from None
    names = data.get("names", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in names.items() if isinstance(v, str) and ID.fullmatch(v)}


def write_index(root: Path, names: dict[str, str]) -> None:
    """Replace the index whole (the caller holds the lock)."""
    fd, scratch = tempfile.mkstemp(dir=root, prefix=".index-")
    with os.fdopen(fd, "w") as f:
        json.dump({"names": dict(sorted(names.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(scratch, 0o644)
    os.replace(scratch, root / "index.json")


def resolve(ref: str, root: Path | None = None) -> Layer:
    """The template a name (or an id) stands for; TemplateNotFound otherwise."""
    root = root or templates_dir()
    if not isinstance(ref, str) or not (NAME.fullmatch(ref) or ID.fullmatch(ref)):
        raise TemplateNotFound(f"template {ref!r} not found (not a template name)")
    template_id = ref if ID.fullmatch(ref) else read_index(root).get(ref)
    if template_id is None:
        raise TemplateNotFound(
            f"template {ref!r} not found in {root} (`codecage template list`; build it with "
            "`codecage template build FILE`)"
        )
    return load(root / template_id, ref)


def load(directory: Path, ref: str) -> Layer:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        raise TemplateNotFound(f"template {ref!r} not found (no build at {directory})") from None
    return Layer(
        id=meta["id"],
        path=directory / "layer",
        preload=tuple(meta.get("preload", ())),
        env=tuple(sorted(meta.get("env", {}).items())),
        meta=meta,
    )


def listing(root: Path | None = None) -> list[dict[str, Any]]:
    """Every named template: its name, id, packages, preloads, size and build time."""
    root = root or templates_dir()
    out = []
    for name, template_id in sorted(read_index(root).items()):
        try:
            meta = load(root / template_id, name).meta
        except TemplateNotFound:
            continue
        out.append(
            {
                "name": name,
                **{k: meta.get(k) for k in ("id", "created", "bytes", "preload")},
                "packages": [f"{p['name']}=={p['version']}" for p in meta.get("resolved", ())],
            }
        )
    return out


def remove(name: str, root: Path | None = None) -> str:
    """Forget a name; its build is deleted once no name points to it. Returns its id.
    Sandboxes already running of it lose its files: remove templates nothing uses."""
    root = root or templates_dir()
    with locked(root):
        names = read_index(root)
        template_id = names.pop(name, None)
        if template_id is None:
            raise TemplateNotFound(f"template {name!r} not found in {root}")
        write_index(root, names)
        if template_id not in names.values():
            shutil.rmtree(root / template_id, ignore_errors=True)
    return template_id
