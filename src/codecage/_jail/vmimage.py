"""The full-VM level's images (`codecage vm build`), cached under a content hash:

    images/vm/kernel-<version>/   Debian's cloud kernel (`apt-get download` + `dpkg-deb -x`):
                                  its vmlinuz and the virtio modules the guest needs
    images/vm/<key>/initrd.gz     busybox (Debian's static build) and those modules: loads
                                  them, mounts the root read-only, switches into the guest
    images/vm/<key>/root.ext4     the sandbox image (image.py: the same Debian, runtime and
                                  codecage package as the gvisor/container backends) as ext4

The guest has no network device and its root is read-only; its first process after the
switch is `_inside/guest.py`. A boot is `boot_argv`; `probe` boots one guest to its greeting
over a virtio-serial port, which is how the doctor learns whether KVM really works here (a
/dev/kvm node proves nothing: this kind of host has one without hardware virtualisation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .._errors import BackendUnavailable, SandboxError
from . import image as _image
from .template import PACKAGE_SOURCE

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # virtio and ext4 for a guest, 26 MB
# the guest's virtio drivers, in load order (each after what it depends on)
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
)
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
QEMU = "qemu-system-x86_64"
PORT = "org.codecage.channel"  # the guest's one virtio-serial port: /dev/vport0p1 inside
LAYOUT = 1  # bump when the guest is laid out differently
HEADROOM = 1.25  # the root image's size over its files' (ext4's own metadata)
GUEST = "codecage/_inside/guest.py"

INIT = """#!/bin/busybox sh
# PID 1 of the initramfs: the virtio drivers, the root read-only, then the guest's own PID 1.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in {modules}; do
  /bin/busybox insmod /modules/$m.ko || exec /bin/busybox poweroff -f
done
/bin/busybox mount -t ext4 -o ro,nosuid,nodev /dev/vda /newroot || exec /bin/busybox poweroff -f
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot {python} -I -S {package}/{guest}
"""


@dataclass(frozen=True)
class VmImage:
    key: str
    kernel: Path
    initrd: Path
    root: Path


Progress = _image.Progress


def vm_dir() -> Path:
    return _image.images_dir() / "vm"


def _key(image: _image.Image, kernel_version: str) -> str:
    guest = (PACKAGE_SOURCE / "_inside" / "guest.py").read_bytes()
    recipe = json.dumps([LAYOUT, image.key, kernel_version, MODULES, INIT, guest.hex()])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def current() -> VmImage | None:
    """The VM image of this codecage package and runtime, if built."""
    image = _image.current()
    kernels = list(vm_dir().glob("kernel-*/.done")) if vm_dir().is_dir() else []
    if image is None or not kernels:
        return None
    # the kernel fetched last: what apt's cloud kernel package named then (names of
    # versions do not sort: 6.1.0-10 comes before 6.1.0-9)
    kernel_dir = max(kernels, key=lambda done: done.stat().st_mtime_ns).parent
    key = _key(image, kernel_dir.name.removeprefix("kernel-"))
    target = vm_dir() / key
    if not (target / ".done").exists():
        return None
    return _made(key, kernel_dir)


def require() -> VmImage:
    found = current()
    if found is None:
        raise BackendUnavailable("the VM image is not built: run `codecage vm build`")
    return found


def build(progress: Progress = print) -> VmImage:
    """Build (or find cached) the guest kernel, initramfs and root image."""
    for tool in (QEMU, "mkfs.ext4", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"`{tool}` is not installed (scripts/install-backends)")
    if not _static(BUSYBOX):
        raise BackendUnavailable(f"{BUSYBOX} is not a static busybox (apt install busybox-static)")
    image = _image.build(progress=progress)
    kernel_dir = _kernel(progress)
    key = _key(image, kernel_dir.name.removeprefix("kernel-"))
    target = vm_dir() / key
    if (target / ".done").exists():
        progress(f"vm: {target} is up to date")
        return _made(key, kernel_dir)
    scratch = vm_dir() / f"{key}.new"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    started = time.monotonic()
    progress("vm: the initramfs (busybox, the virtio drivers)")
    _initrd(kernel_dir, image, scratch / "initrd.gz")
    size = _tree_bytes(image.root)
    progress(f"vm: the root image (ext4 of the sandbox image, {size >> 20} MiB of files)")
    blocks = max(64 << 20, int(size * HEADROOM) + (64 << 20)) // 4096
    mkfs = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "codecage", "-m", "0", "-d"]
    subprocess.run(
        [*mkfs, str(image.root), str(scratch / "root.ext4"), str(blocks)],
        check=True,
        capture_output=True,
    )
    (scratch / ".done").write_text(key + "\n")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    _prune(keep={key})
    progress(f"vm: ready at {target} ({time.monotonic() - started:.1f} s)")
    return _made(key, kernel_dir)


def _kernel(progress: Progress) -> Path:
    """Debian's cloud kernel, downloaded once per version (the package's own dependency)."""
    depends = subprocess.run(
        ["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"Depends: (linux-image-[\w.+-]+)", depends)
    if found is None:
        raise BackendUnavailable(f"apt knows no {KERNEL_PACKAGE} (run apt-get update)")
    package = found.group(1)
    version = package.removeprefix("linux-image-")
    target = vm_dir() / f"kernel-{version}"
    if (target / ".done").exists():
        return target
    progress(f"vm: downloading the guest kernel {package}")
    vm_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vm_dir()) as tmp:
        subprocess.run(
            ["apt-get", "download", "-q", package], cwd=tmp, check=True, capture_output=True
        )
        [deb] = Path(tmp).glob("*.deb")
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        scratch = target.with_name(target.name + ".new")
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "modules").mkdir(parents=True)
        [vmlinuz] = (tree / "boot").glob("vmlinuz-*")
        shutil.copy2(vmlinuz, scratch / vmlinuz.name)
        modules = next((tree / "lib" / "modules").iterdir())
        for name in MODULES:
            found_ko = next(modules.rglob(f"{name}.ko"), None)
            if found_ko is None:
                raise SandboxError(f"the guest kernel {version} has no module {name}")
            shutil.copy2(found_ko, scratch / "modules" / found_ko.name)
        (scratch / ".done").write_text(version + "\n")
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    return target


def _made(key: str, kernel_dir: Path) -> VmImage:
    """The built image `key` over the kernel in `kernel_dir`."""
    target = vm_dir() / key
    return VmImage(
        key, next(kernel_dir.glob("vmlinuz-*")), target / "initrd.gz", target / "root.ext4"
    )


def _initrd(kernel_dir: Path, image: _image.Image, out: Path) -> None:
    init = INIT.format(
        modules=" ".join(MODULES),
        python=f"{image.runtime}/bin/python3",
        package=image.package_root,
        guest=GUEST,
    )
    files: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""),
        ("dev", 0o40755, b""),
        ("proc", 0o40755, b""),
        ("sys", 0o40755, b""),
        ("newroot", 0o40755, b""),
        ("modules", 0o40755, b""),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        ("init", 0o100755, init.encode()),
    ]
    for name in MODULES:
        data = (kernel_dir / "modules" / f"{name}.ko").read_bytes()
        files.append((f"modules/{name}.ko", 0o100644, data))
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(newc(files))


def newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as an initramfs: (path, mode,
    contents) each, owned by root."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(files, start=1):
        entry(ino, name, mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def _static(path: Path) -> bool:
    """Whether an ELF executable has no interpreter (PT_INTERP): it runs in an initramfs."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[32:40], "little")
    size, count = int.from_bytes(data[54:56], "little"), int.from_bytes(data[56:58], "little")
    kinds = [
        int.from_bytes(data[phoff + i * size : phoff + i * size + 4], "little")
        for i in range(count)
    ]
    return 3 not in kinds  # PT_INTERP


def _tree_bytes(root: Path) -> int:
    """The 4 KiB blocks the files and directories under `root` (itself included) take."""
    total = 4096
    for _path, st in _image._walk(root):
        if stat.S_ISREG(st.st_mode):
            total += (st.st_size + 4095) & ~4095
        elif stat.S_ISDIR(st.st_mode):
            total += 4096
    return total


def _prune(keep: set[str]) -> None:
    for old in vm_dir().iterdir():
        if old.name.startswith("kernel-") or old.name in keep:
            continue
        shutil.rmtree(old, ignore_errors=True)


# -- booting --------------------------------------------------------------------------------


def boot_argv(
    vm: VmImage, channel: Path, console: Path, accel: str, memory_mb: int = 768
) -> list[str]:
    """QEMU for one guest: no network device at all, the root read-only, one virtio-serial
    port on a host socket `channel` (QEMU listens; the host connects), the guest's console
    into the file `console`, QEMU's own seccomp sandbox on, no host files but these."""
    cpu = "host" if accel == "kvm" else "max"  # TCG: the runtime's numpy needs SSE4.x
    # TCG's translation cache: 32 MiB instead of its default 1 GiB, which a VM would fill
    # and be charged for over time (its guest's code is one interpreter and its libraries)
    accel_option = "kvm" if accel == "kvm" else "tcg,tb-size=32"
    return [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-machine", "pc",
        "-accel", accel_option,
        "-cpu", cpu,
        "-m", str(memory_mb),
        "-smp", "1",
        "-display", "none",
        "-serial", f"file:{console}",
        "-no-reboot",
        "-nic", "none",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", str(vm.kernel),
        "-initrd", str(vm.initrd),
        "-append", "console=ttyS0 quiet panic=-1 rootwait",
        "-drive", f"file={vm.root},if=virtio,format=raw,readonly=on",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=channel,path={channel},server=on,wait=off",
        "-device", f"virtserialport,chardev=channel,name={PORT}",
    ]  # fmt: skip


@dataclass(frozen=True)
class Probe:
    accel: str
    ok: bool
    seconds: float  # to the guest's greeting (or to the failure)
    detail: str
    hello: dict[str, object] | None = None  # the guest's greeting: what it was given


KVM_PROBE_S = 15.0  # a guest that works under KVM greets within a second or two
ACCEL_CACHE = "accel.json"


def accelerator(refresh: bool = False, vm: VmImage | None = None) -> Probe:
    """Which accelerator this host's guests get: KVM if a guest really boots with it (a
    /dev/kvm node proves nothing), else TCG. Booted once per QEMU and guest kernel and kept
    (`refresh`: boot again)."""
    vm = vm or require()
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    # the guest's key too: its greeting (kept with the answer) is what the jail reads
    has_kvm = os.path.exists("/dev/kvm")
    ident = hashlib.sha256(f"{qemu}\0{vm.kernel.name}\0{vm.key}\0{has_kvm}".encode())
    cache = vm_dir() / ACCEL_CACHE
    if not refresh and cache.exists():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            kept = json.loads(cache.read_text())
            if kept["ident"] == ident.hexdigest():
                return Probe(**kept["probe"])
    kvm = probe("kvm", KVM_PROBE_S, vm) if os.path.exists("/dev/kvm") else None
    chosen = kvm if kvm is not None and kvm.ok else probe("tcg", 120.0, vm)
    if kvm is not None and not kvm.ok:
        chosen = dataclasses.replace(chosen, detail=f"{chosen.detail}; KVM: {kvm.detail}")
    elif kvm is None:
        chosen = dataclasses.replace(chosen, detail=f"{chosen.detail}; no /dev/kvm")
    if chosen.ok:
        record = {"ident": ident.hexdigest(), "probe": dataclasses.asdict(chosen)}
        cache.write_text(json.dumps(record))
    return chosen


def probe(accel: str, timeout_s: float = 120.0, vm: VmImage | None = None) -> Probe:
    """Boot one guest with `accel` ("kvm" or "tcg") to its greeting on the channel."""
    vm = vm or require()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="codecage-vm-") as tmp:
        path, console = Path(tmp) / "channel.sock", Path(tmp) / "console.log"
        with open(Path(tmp) / "qemu.log", "w+b") as log:
            proc = subprocess.Popen(
                boot_argv(vm, path, console, accel),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                hello = _greeting(proc, path, started + timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                log.seek(0)
                output = log.read().decode(errors="replace").strip()
            if not output and console.exists():
                output = console.read_text(errors="replace").strip()
    seconds = time.monotonic() - started
    if hello is None:
        why = output.splitlines()[-1] if output else f"no greeting within {timeout_s:.0f} s"
        return Probe(accel, False, seconds, why[:300])
    return Probe(accel, True, seconds, f"guest Linux {hello.get('kernel', '?')}", hello)


def _greeting(
    proc: subprocess.Popen[bytes], path: Path, deadline: float
) -> dict[str, object] | None:
    """The guest's greeting, the channel closed after it (the guest then powers off)."""
    opened = open_channel(proc, path, deadline)
    if opened is None:
        return None
    opened[0].close()
    return opened[1]


def open_channel(
    proc: subprocess.Popen[bytes], path: Path, deadline: float
) -> tuple[socket.socket, dict[str, object], bytes] | None:
    """Connect to QEMU's end of the channel once it listens and read the guest's first
    line, its greeting (at most 4096 bytes): the connected socket, the greeting, and what
    came after it. None if QEMU ends, the deadline passes or the line is no greeting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise OSError("no channel")
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        line = b""
        while b"\n" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None or len(line) >= 4096:
                raise OSError("no greeting")
            if not select.select([sock], [], [], min(left, 0.5))[0]:
                continue
            data = sock.recv(4096 - len(line))
            if not data:
                raise OSError("the channel closed")
            line += data
        first, _, rest = line.partition(b"\n")
        message = json.loads(first)
        if not isinstance(message, dict) or message.get("ev") != "hello":
            raise OSError("no greeting")
        return sock, message, rest
    except (OSError, ValueError):
        sock.close()
        return None
