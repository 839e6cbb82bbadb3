"""The root filesystem of the OCI-based backends (`gvisor`, `container`): `codecage image build`
(and `ensure_engine_image`: the same root filesystem as the container engine's image).

Two layers, each cached under a content hash so that a rebuild happens only when its inputs
change:

    images/base-<hash>/rootfs   Debian (mmdebstrap --variant=minbase + PACKAGES): ~45 s, once
    images/<hash>/rootfs        base + the sandbox runtime and the codecage package, each at
                                the path it has on the host (the package where the
                                namespace jail stages it): seconds, hard links to the layers
                                below (the root is mounted read-only)

The host's files are never bound into these sandboxes: what runs inside comes from the image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside.mounts import ROOT_HOME_TARGET
from .template import PACKAGE_SOURCE, Runtime, package_digest, state_dir

SUITE = "bookworm"
MIRROR = os.environ.get("CODECAGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The runtime is a venv of Debian's python3.11: the image needs that interpreter, and the
# shell and coreutils (in minbase) for commands.run and `!cmd`.
PACKAGES = ("python3.11",)
EXCLUDE = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
STAMP = ".codecage-image"
LAYOUT = 5  # bump when build() lays the image out differently (engines cache by key)
KEEP = 3  # images of earlier codecage versions kept for sandboxes that may still run on them

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """A built root filesystem, ready to be a bundle's root or imported as an image."""

    key: str
    root: Path
    runtime: Path  # the runtime's path, the same inside as on the host
    package_root: str  # the sys.path entry holding `codecage`, the same inside as on the host

    @property
    def tag(self) -> str:
        return f"codecage-sandbox:{self.key}"

    @property
    def python(self) -> str:
        return f"{self.runtime}/bin/python"


def images_dir() -> Path:
    return Path(os.environ.get("CODECAGE_IMAGES", "/var/lib/codecage/images"))


def base_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "exclude": EXCLUDE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def runtime_key(runtime: Path | Runtime) -> str:
    """The Debian base and the runtime, without the codecage package."""
    path = runtime.path.resolve() if isinstance(runtime, Runtime) else runtime
    stamp = path / ".codecage-stamp"
    runtime_id = stamp.read_text().strip() if stamp.exists() else "unstamped"
    recipe = f"{base_key()}\0{LAYOUT}\0{path}\0{runtime_id}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def image_key(runtime: Runtime) -> str:
    digest = hashlib.sha256(f"{runtime_key(runtime)}\0{package_digest()}".encode())
    return digest.hexdigest()[:16]


def package_root() -> str:
    """Where the namespace jail stages this codecage package (template.package_dir): the
    image holds it at the same path."""
    return str(state_dir() / "pkg" / package_digest()[:20])


def current(runtime: Runtime | None = None) -> Image | None:
    """The image for this runtime and package if it has been built, else None."""
    runtime = runtime or Runtime.default()
    key = image_key(runtime)
    root = images_dir() / key / "rootfs"
    if not (root / STAMP).exists():
        return None
    return Image(key, root, runtime.path.resolve(), package_root())


def require(runtime: Runtime | None = None) -> Image:
    image = current(runtime)
    if image is None:
        raise BackendUnavailable(
            "the sandbox image for this runtime and codecage version is not built: "
            "run `codecage image build`"
        )
    return image


def build(runtime: Runtime | None = None, progress: Progress = print) -> Image:
    """Build (or find cached) the image for this runtime and codecage package."""
    runtime = runtime or Runtime.default()
    runtime.check()
    cached = current(runtime)
    if cached is not None:
        progress(f"image: {cached.root} is up to date")
        return cached
    base = _build_base(progress)
    key = image_key(runtime)
    target = images_dir() / key
    scratch = images_dir() / f"{key}.new"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    started = time.monotonic()
    progress("image: linking the Debian base")
    _link_tree(base, scratch / "rootfs")
    inside = scratch / "rootfs" / str(runtime.path.resolve()).lstrip("/")
    progress(f"image: adding the runtime {runtime.path.resolve()}")
    inside.parent.mkdir(parents=True, exist_ok=True)
    _link_tree(runtime.path.resolve(), inside)
    progress("image: adding the codecage package")
    package = scratch / "rootfs" / package_root().lstrip("/") / "codecage"
    shutil.copytree(PACKAGE_SOURCE, package, ignore=shutil.ignore_patterns("__pycache__"))
    # compiled once here: the read-only root means a sandbox could never cache it itself
    inside_path = f"{package_root()}/codecage"
    compile_cmd = [str(runtime.python), "-I", "-m", "compileall", "-q", "-d", inside_path]
    subprocess.run([*compile_cmd, str(package)], check=True, stdout=subprocess.DEVNULL)
    for mountpoint in ("home/user", "tmp", "proc", "dev", "run/codecage-channel"):
        (scratch / "rootfs" / mountpoint).mkdir(parents=True, exist_ok=True)
    # An engine may copy a mount point's mode onto the tmpfs it mounts there (Podman does,
    # and refuses uid=): the workspace must be writable by whichever uid the sandbox gets.
    (scratch / "rootfs" / "home" / "user").chmod(0o1777)
    # /root is the workspace, as on every backend (mounts.ROOT_HOME_TARGET)
    root_home = scratch / "rootfs" / "root"
    if root_home.is_dir() and not root_home.is_symlink():
        shutil.rmtree(root_home)
    root_home.unlink(missing_ok=True)
    root_home.symlink_to(ROOT_HOME_TARGET)
    _write_identity(scratch / "rootfs")
    progress("image: removing setuid/setgid bits, file capabilities and device nodes")
    strip_privileges(scratch / "rootfs")
    left = privileged_files(scratch / "rootfs")
    if left:
        raise SandboxError(f"the image still holds privileged files: {left[:10]}")
    (scratch / "rootfs" / STAMP).write_text(key + "\n")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    progress(f"image: ready at {target / 'rootfs'} ({time.monotonic() - started:.1f} s)")
    _prune(keep=KEEP)
    return Image(key, target / "rootfs", runtime.path.resolve(), package_root())


def _prune(keep: int) -> None:
    """Remove all but the `keep` newest images (hard links: the base stays whole)."""
    built = [p for p in images_dir().iterdir() if (p / "rootfs" / STAMP).exists()]
    built = [p for p in built if not p.name.startswith("base-")]
    for old in sorted(built, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _build_base(progress: Progress) -> Path:
    key = base_key()
    root = images_dir() / f"base-{key}" / "rootfs"
    if (root / STAMP).exists():
        progress(f"image: Debian base {root} is cached")
        return root
    if shutil.which("mmdebstrap") is None:
        raise BackendUnavailable("mmdebstrap is not installed: run scripts/install-backends")
    scratch = root.parent.with_name(root.parent.name + ".new")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    progress(f"image: building the Debian {SUITE} base with mmdebstrap (~1 min, once)")
    command = [
        "mmdebstrap",
        "--variant=minbase",
        "--include=" + ",".join(PACKAGES),
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDE),
        SUITE,
        str(scratch / "rootfs"),
        MIRROR,
    ]
    _stream(command, progress)
    (scratch / "rootfs" / STAMP).write_text(key + "\n")
    shutil.rmtree(root.parent, ignore_errors=True)
    scratch.rename(root.parent)
    return root


def _stream(command: list[str], progress: Progress) -> None:
    """Run a command, passing its output on line by line as progress."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        tail = [*tail, line][-20:]
        if line:
            progress(f"  {line}")
    if proc.wait() != 0:
        raise BackendUnavailable(
            f"{command[0]} failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )


def _link_tree(source: Path, target: Path) -> None:
    """A copy made of hard links (same filesystem) or, across filesystems, of files."""
    result = subprocess.run(
        ["cp", "-a", "--link", str(source), str(target)], capture_output=True, text=True
    )
    if result.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)


SETID = stat.S_ISUID | stat.S_ISGID
CAPABILITY_XATTR = "security.capability"


def _walk(root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every entry under `root` with its lstat (symbolic links are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError):
                out.append((path, path.lstat()))
    return out


def _has_capabilities(path: Path) -> bool:
    try:
        return CAPABILITY_XATTR in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def privileged_files(root: Path) -> list[str]:
    """What could give code more privilege than its own: a setuid or setgid file, a file
    carrying capabilities, a device node (character or block). The image has none."""
    found = []
    for path, st in _walk(root):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append(f"/{path.relative_to(root)} (device node)")
        elif stat.S_ISREG(st.st_mode) and (st.st_mode & SETID or _has_capabilities(path)):
            found.append(f"/{path.relative_to(root)} (mode {stat.filemode(st.st_mode)})")
    return found


def strip_privileges(root: Path) -> None:
    """Remove every setuid/setgid bit and file capability (each such file becomes a copy
    of its own: the base's hard links stay as they are) and every device node (the
    sandbox's /dev is a mount of the backend's own). Setgid directories keep their bit:
    it only makes new files inherit the directory's group."""
    for path, st in _walk(root):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            path.unlink()
        elif stat.S_ISREG(st.st_mode) and (st.st_mode & SETID or _has_capabilities(path)):
            copy = path.with_name(f".{path.name}.strip")
            shutil.copyfile(path, copy)  # data only: no mode bits, no extended attributes
            os.chown(copy, st.st_uid, st.st_gid)
            os.chmod(copy, stat.S_IMODE(st.st_mode) & ~SETID)
            os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
            copy.replace(path)


def _write_identity(root: Path) -> None:
    """The sandbox user (uid/gid 1000, `user`), as the OCI configs run it. Each file is
    written anew: the base's copies are hard links and must stay as they are."""
    etc = root / "etc"
    for name, line in (
        ("passwd", "user:x:1000:1000:sandbox:/home/user:/bin/bash\n"),
        ("group", "user:x:1000:\n"),
    ):
        text = (etc / name).read_text() + line
        (etc / name).unlink()
        (etc / name).write_text(text)
    for name in ("shadow", "shadow-", "gshadow", "gshadow-"):  # as the namespace jail's /etc
        (etc / name).unlink(missing_ok=True)
    (etc / "hostname").unlink(missing_ok=True)
    (etc / "hostname").write_text("sandbox\n")


# -- the container backend's engine image ----------------------------------------------


def ensure_engine_image(client: Any, image: Image, progress: Progress) -> str:
    """The engine's image for `image`: Debian + runtime imported once, the package as a
    layer on top. Returns its tag. Processes that start at once (a service's workers, a
    test run's) wait for the one that builds it instead of each building it again."""
    tag = f"localhost/codecage-sandbox:{image.key}"
    if client.images.list(name=tag):
        return tag
    lock = os.open(state_dir() / "engine-image.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if client.images.list(name=tag):  # built by another process meanwhile
            return tag
        return _build_engine_image(client, image, tag, progress)
    finally:
        os.close(lock)


def _build_engine_image(client: Any, image: Image, tag: str, progress: Progress) -> str:
    base = f"localhost/codecage-sandbox-base:{runtime_key(image.runtime)}"
    if not client.images.list(name=base):
        progress(f"image: importing {image.root} into the engine as {base} (~35 s, once)")
        exclude = "./" + image.package_root.strip("/")
        tar = subprocess.Popen(
            ["tar", "-C", str(image.root), "-c", f"--exclude={exclude}", "."],
            stdout=subprocess.PIPE,
        )
        try:
            repository, _, version = base.rpartition(":")
            out = client.api.import_image(src=tar.stdout, repository=repository, stream_src=True)
        finally:
            tar.kill()
            tar.wait()
            if tar.stdout is not None:
                tar.stdout.close()
        # engines differ in how they name an import (Podman ignores `tag`): tag it by its id
        found = re.findall(r"sha256:[0-9a-f]{64}", str(out))
        if not found:
            raise BackendUnavailable(f"container: the engine's import said {str(out)[-500:]}")
        client.images.get(found[-1]).tag(repository, version)
        with contextlib.suppress(Exception):  # the name the import gave it, if any
            client.images.remove(f"{repository}:latest")
    progress(f"image: adding the codecage package as {tag}")
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tf:
        dockerfile = f"FROM {base}\nCOPY codecage {image.package_root}/codecage\n".encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tf.addfile(info, io.BytesIO(dockerfile))
        tf.add(image.root / image.package_root.strip("/") / "codecage", arcname="codecage")
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    except Exception as exc:
        raise BackendUnavailable(f"container: could not build {tag}: {exc}") from None
    _prune_engine(client, keep={tag, base})
    return tag


def _prune_engine(client: Any, keep: set[str]) -> None:
    """Untag the engine's images of earlier codecage versions (those in use stay). An
    image whose root filesystem `_prune` still keeps stays too: another checkout or
    version on this host may be running sandboxes from it."""
    kept = {p.name for p in images_dir().iterdir() if (p / "rootfs" / STAMP).exists()}
    for repository in ("localhost/codecage-sandbox", "localhost/codecage-sandbox-base"):
        for image in client.images.list(name=repository):
            for old in set(image.tags) - keep:
                if old.startswith(repository + ":") and old.rpartition(":")[2] not in kept:
                    with contextlib.suppress(Exception):
                        client.images.remove(old)
