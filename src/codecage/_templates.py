"""Custom templates (docs/templates.md): a spec (pip requirements, plain apt packages, a
preload list, env defaults, on the node's runtime) built once into a read-only layer that
sandboxes of it see; `Sandbox(template="name")`.

    Template().pip_install("polars", "duckdb").preload("duckdb").build("analytics")

A build is the only step that may use the network (`pip download`, `apt-get download`);
`offline=True` installs from a wheelhouse directory alone. What the runtime already has is
not installed again: the runtime's pip resolves the requirements against it (a dry run)
and only the missing wheels go into the layer (`--no-deps --target`). A preload that starts
a thread is refused at build time: the template process forks every sandbox, and a fork
keeps only the thread that forked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import TemplateError
from ._jail import layers
from ._jail.template import DEFAULT_PRELOAD, Runtime, _shadowed
from ._wheelhouse import REQUIREMENT, wheelhouse_dir

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_APT = re.compile(r"[a-z0-9][a-z0-9.+-]{0,99}(=[A-Za-z0-9.+:~-]{1,100})?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Set by the jail for every sandbox, or the template itself: not a template's to change.
RESERVED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "PYTHONPATH",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "LD_AUDIT",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "TMPDIR",
    }
)
PIP_PASSED = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "PIP_DEFAULT_TIMEOUT",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)
Progress = Callable[[str], None]


class TemplateSpec(BaseModel):
    """A template as a TOML or JSON file states it (docs/templates.md). Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    base: Literal["runtime"] = "runtime"
    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else _checked(layers.check_name, name)

    @field_validator("pip")
    @classmethod
    def _pip(cls, items: tuple[str, ...]) -> tuple[str, ...]:
        # requirements only, in the form `pip install` in a sandbox takes (one rule,
        # _wheelhouse.REQUIREMENT): never an option (`-i`, `--index-url`), a path or a URL;
        # spaces around the specifiers are dropped ("numpy >= 2" is "numpy>=2")
        compact = tuple("".join(item.split()) for item in items)
        for item, text in zip(items, compact, strict=True):
            if not REQUIREMENT.fullmatch(text):
                raise ValueError(f"{item!r} is not a requirement (a name and version specifiers)")
        return compact

    @field_validator("apt")
    @classmethod
    def _apt(cls, items: tuple[str, ...]) -> tuple[str, ...]:
        for item in items:
            if not _APT.fullmatch(item):
                raise ValueError(f"{item!r} is not a Debian package name")
        return items

    @field_validator("preload")
    @classmethod
    def _preload(cls, items: tuple[str, ...]) -> tuple[str, ...]:
        for item in items:
            if not _MODULE.fullmatch(item):
                raise ValueError(f"{item!r} is not a module name")
        return items

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not _ENV.fullmatch(key) or key in RESERVED_ENV or key.startswith("CODECAGE_"):
                raise ValueError(f"{key!r} cannot be a template's variable")
            if "\0" in value or len(value) > 4096:
                raise ValueError(f"the value of {key!r}: at most 4096 characters, no NUL")
        return env

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            parts = [f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors()]
            raise TemplateError("invalid template spec: " + "; ".join(parts)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> TemplateSpec:
        """A spec file: TOML (`.toml`, top-level keys or a `[template]` table) or JSON."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise TemplateError(f"cannot read template spec {path}: {exc}") from None
        if not isinstance(data, dict):
            raise TemplateError(f"template spec {path}: a table (object) of keys")
        return cls(**data.get("template", data))


def _checked(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except TemplateError as exc:
        raise ValueError(str(exc)) from None


class Template:
    """A template in the making, in the Modal/E2B style: each call returns a new one.

    `Template().pip_install("polars").preload("duckdb").env(TZ="UTC").build("name")`."""

    def __init__(self, spec: TemplateSpec | None = None) -> None:
        self.spec = spec or TemplateSpec()

    @classmethod
    def from_file(cls, path: str | Path) -> Template:
        return cls(TemplateSpec.from_file(path))

    def _with(self, **changes: Any) -> Template:
        return Template(TemplateSpec(**(self.spec.model_dump() | changes)))

    def pip_install(self, *requirements: str) -> Template:
        return self._with(pip=(*self.spec.pip, *requirements))

    def apt_install(self, *packages: str) -> Template:
        return self._with(apt=(*self.spec.apt, *packages))

    def preload(self, *modules: str) -> Template:
        return self._with(preload=(*self.spec.preload, *modules))

    def env(self, **variables: str) -> Template:
        return self._with(env=self.spec.env | variables)

    def build(
        self,
        name: str | None = None,
        *,
        offline: bool = False,
        wheelhouse: str | Path | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Build it (or find the identical build) and name it; its record (`id`, `name`,
        `packages`, `bytes`, `build_s`, `cached`). See `build`."""
        spec = self.spec if name is None else self._with(name=name).spec
        return build(spec, offline=offline, wheelhouse=wheelhouse, progress=progress)


def build(
    spec: TemplateSpec,
    *,
    offline: bool = False,
    wheelhouse: str | Path | None = None,
    progress: Progress | None = None,
    root: Path | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Build `spec` into the store and point its name at it. `offline`: wheels only from
    `wheelhouse` (default: the operator's, CODECAGE_WHEELHOUSE), never the index; online,
    the wheelhouse is searched first and the rest downloaded once (the build's only network)."""
    say = progress or (lambda _line: None)
    if spec.name is None:
        raise TemplateError("a template needs a name (`name = ...` in the spec, or build(name))")
    if offline and spec.apt:
        raise TemplateError("apt packages need the network (apt-get download): not with --offline")
    root = root or layers.templates_dir()
    if _shadowed(root.resolve()):
        raise TemplateError(
            f"the template store {root} lies under a path the jail mounts over: "
            "set CODECAGE_TEMPLATES elsewhere (e.g. /var/lib/codecage/templates)"
        )
    runtime = runtime or Runtime.default()
    runtime.check()
    house = Path(wheelhouse) if wheelhouse is not None else wheelhouse_dir()
    if offline and not (house.is_dir() and any(house.glob("*.whl"))):
        raise TemplateError(f"--offline needs a wheelhouse of wheels: none at {house}")
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    scratch = root / f".build-{secrets.token_hex(6)}"
    scratch.mkdir(mode=0o755)
    try:
        finds = [house] if house.is_dir() else []
        if spec.pip and not offline:
            cache = scratch / "wheels"
            say(f"downloading wheels for {', '.join(spec.pip)} (the only networked step)")
            _pip(
                runtime,
                ["download", "--dest", str(cache), *_finds(finds), *spec.pip],
                say,
                online=True,
            )
            finds.append(cache)
        say("resolving against the runtime's own packages")
        wanted = _resolve(runtime, spec.pip, finds, scratch) if spec.pip else []
        resolved = [{k: w[k] for k in ("name", "version", "sha256")} for w in wanted]
        debs = _apt_download(spec.apt, scratch, say) if spec.apt else []
        ident = {
            "spec": spec.model_dump(exclude={"name"}),
            "resolved": resolved,
            "debs": debs,
            "runtime": _runtime_id(runtime),
        }
        template_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        final = root / template_id
        cached = (final / "meta.json").exists()
        if cached:
            say(f"already built: {template_id}")
        else:
            layer = scratch / "layer"
            (layer / "site").mkdir(parents=True)
            if wanted:
                say(
                    f"installing {len(wanted)} packages the runtime lacks: "
                    + ", ".join(f"{w['name']}=={w['version']}" for w in wanted)
                )
                _pip(
                    runtime,
                    [
                        "install",
                        "--no-index",
                        "--no-deps",
                        "--no-compile",
                        "--target",
                        str(layer / "site"),
                        *(w["file"] for w in wanted),
                    ],
                    say,
                )
                _compile(runtime, layer / "site")
            if spec.apt:
                _apt_extract(scratch, layer / "apt", say)
            preload = tuple(dict.fromkeys((*DEFAULT_PRELOAD, *spec.preload)))
            say(
                f"checking the preloads in a fresh interpreter: {', '.join(spec.preload) or '(the base ones)'}"
            )
            _check_preload(runtime, layer / "site", preload, spec.env)
            meta = {
                "id": template_id,
                "spec": spec.model_dump(exclude={"name"}),
                "resolved": resolved,
                "debs": debs,
                "runtime": str(runtime.path),
                "preload": list(preload),
                "env": spec.env,
                "created": time.time(),
                "bytes": _size(layer),
                "build_s": round(time.monotonic() - started, 3),
            }
            (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
            _seal(scratch)
        with layers.locked(root):
            if not cached and not (final / "meta.json").exists():
                for scrap in ("wheels", "debs", "report.json"):
                    shutil.rmtree(scratch / scrap, ignore_errors=True)
                    (scratch / scrap).unlink(missing_ok=True)
                scratch.rename(final)
            names = layers.read_index(root)
            names[spec.name] = template_id
            layers.write_index(root, names)
        kept = layers.load(final, spec.name).meta
        say(f"built {spec.name} = {template_id} ({kept['bytes'] >> 20} MiB)")
        packages = [f"{p['name']}=={p['version']}" for p in kept["resolved"]]
        return {
            "id": template_id,
            "name": spec.name,
            "packages": packages,
            "bytes": kept["bytes"],
            "build_s": round(time.monotonic() - started, 3),
            "cached": cached,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finds(dirs: list[Path]) -> list[str]:
    return [a for d in dirs for a in ("--find-links", str(d))]


def _pip(runtime: Runtime, args: list[str], say: Progress, online: bool = False) -> str:
    """The runtime's own pip, with an environment of its own: no pip.conf, no host
    variables but the index's and proxies' (online only)."""
    env = runtime.base_env() | {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_ONLY_BINARY": ":all:",
        "HOME": str(Path.home()),
    }
    if online:
        env |= {k: os.environ[k] for k in PIP_PASSED if k in os.environ}
    else:
        env["PIP_NO_INDEX"] = "1"
    cmd = [str(runtime.python), "-I", "-m", "pip", *args, "--progress-bar", "off"]
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/"
    ) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            say("  " + line.rstrip())
        if proc.wait() != 0:
            tail = "\n".join(lines[-15:])
            raise TemplateError(f"pip {args[0]} failed (exit {proc.returncode}):\n{tail}")
    return "\n".join(lines)


def _resolve(
    runtime: Runtime, requirements: tuple[str, ...], finds: list[Path], scratch: Path
) -> list[dict[str, str]]:
    """The wheels to install: pip's dry run against the runtime's packages, from the local
    wheel directories only. Each: name, version, sha256, file."""
    if not finds:
        raise TemplateError("no wheels to resolve from (no wheelhouse, nothing downloaded)")
    report = scratch / "report.json"
    _pip(
        runtime,
        [
            "install",
            "--dry-run",
            "--quiet",
            "--no-index",
            "--report",
            str(report),
            *_finds(finds),
            *requirements,
        ],
        lambda _l: None,
    )
    wanted = []
    for item in json.loads(report.read_text()).get("install", []):
        url = item.get("download_info", {}).get("url", "")
        if not url.startswith("file://") or not url.endswith(".whl"):
            raise TemplateError(f"{item['metadata']['name']}: only wheels are installed, not {url}")
        file = url.removeprefix("file://")
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
        wanted.append(
            {
                "name": item["metadata"]["name"],
                "version": item["metadata"]["version"],
                "sha256": digest,
                "file": file,
            }
        )
    return sorted(wanted, key=lambda w: w["name"].lower())


def _runtime_id(runtime: Runtime) -> str:
    """The runtime a layer was resolved against: its interpreter and its installed packages."""
    dists = sorted(p.name for p in (runtime.path / "lib").glob("python*/site-packages/*.dist-info"))
    return hashlib.sha256(
        json.dumps([str(runtime.path.resolve()), os.path.realpath(runtime.python), dists]).encode()
    ).hexdigest()


def _compile(runtime: Runtime, site: Path) -> None:
    """Bytecode compiled once here: the layer is read-only inside, where nothing can write it."""
    subprocess.run(
        [str(runtime.python), "-I", "-m", "compileall", "-q", str(site)],
        env=runtime.base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


CHECK = """
import importlib, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
def tasks(): return len(os.listdir("/proc/self/task"))
for name in json.loads(sys.argv[2]):
    before = (threading.active_count(), tasks())
    try:
        importlib.import_module(name)
    except BaseException as exc:
        print(json.dumps({"module": name, "error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
    time.sleep(0.05)
    after = (threading.active_count(), tasks())
    if after[0] > before[0] or after[1] > before[1]:
        print(json.dumps({"module": name, "threads": after[1] - before[1]})); sys.exit(0)
print(json.dumps({"ok": True}))
"""


def _check_preload(
    runtime: Runtime, site: Path, preload: tuple[str, ...], env: dict[str, str]
) -> None:
    """Import the preload list, one module at a time, in a fresh interpreter of the runtime
    with the layer on sys.path; refuse the first that fails or starts a thread."""
    done = subprocess.run(
        [str(runtime.python), "-I", "-c", CHECK, str(site), json.dumps(list(preload))],
        env=runtime.base_env() | env | {"HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        cwd="/",
        timeout=300,
        check=False,
    )
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TemplateError(f"the preload check failed: {done.stderr.strip()[-2000:]}") from None
    if "error" in verdict:
        raise TemplateError(f"preload {verdict['module']!r} does not import: {verdict['error']}")
    if "threads" in verdict:
        raise TemplateError(
            f"preload {verdict['module']!r} starts threads at import ({verdict['threads']} more): "
            "a template forks its sandboxes, and a fork keeps only the forking thread. Leave it "
            "out of `preload` (it still imports, lazily, from the template's layer)"
        )


def _apt_download(packages: tuple[str, ...], scratch: Path, say: Progress) -> list[dict[str, str]]:
    """Plain apt packages: each .deb downloaded (`apt-get download`, no dependencies).
    Each: its file name and sha256 (part of the template's id)."""
    debs = scratch / "debs"
    debs.mkdir()
    say(f"downloading apt packages {', '.join(packages)} (no dependencies, no scripts)")
    done = subprocess.run(
        ["apt-get", "download", "--", *packages],
        cwd=debs,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise TemplateError(f"apt-get download failed: {done.stderr.strip()[-2000:]}")
    return [
        {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
        for deb in sorted(debs.glob("*.deb"))
    ]


def _apt_extract(scratch: Path, target: Path, say: Progress) -> None:
    """Each downloaded .deb's files extracted into the layer (`dpkg-deb -x`): no maintainer
    script runs."""
    target.mkdir(parents=True)
    for deb in sorted((scratch / "debs").glob("*.deb")):
        say(f"  extracting {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)


def _size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink())


def _seal(path: Path) -> None:
    """The build's files: owned by whoever built them, no one else may write them; no set-id
    bit or device survives (the jail's read-only, nosuid bind is the boundary, this is depth)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if os.path.islink(full):
                continue
            mode = st.st_mode & 0o755
            if not (os.path.isdir(full) or os.path.isfile(full)):
                os.unlink(full)
                continue
            os.chmod(full, mode | (0o755 if os.path.isdir(full) else 0o644))
    os.chmod(path, 0o755)


__all__ = ["Template", "TemplateSpec", "build"]
