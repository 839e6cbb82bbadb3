"""PID 1 of a full-VM guest (`isolation="vm"`, _jail/vmimage.py), after the initramfs has
switched into the read-only root. Standard library only, like everything in _inside/.

At this stage it greets the host on the guest's virtio-serial port (its kernel's release,
so the host knows which guest answered; the network interfaces and the root's mount
options it sees, the host's check of what the VM was given) and powers the guest off once
the host closes its end: the host's boot probe (`codecage doctor`, `vmimage.probe`).
"""

from __future__ import annotations

import ctypes
import json
import os

PORT = "/dev/vport0p1"  # the guest's one virtio-serial port (vmimage.PORT)
RB_POWER_OFF = 0x4321FEDC


def _facts() -> dict[str, object]:
    """What the guest was given: its network interfaces, its root's mount options."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount(b"proc", b"/proc", b"proc", 0, None)
    libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None)
    with open("/proc/mounts") as f:
        root = [line.split()[3] for line in f if line.split()[1] == "/"]
    net = "/sys/class/net"
    return {
        "interfaces": sorted(os.listdir(net)) if os.path.isdir(net) else None,
        "root_options": root[-1] if root else None,
    }


def main() -> None:
    try:
        channel = os.open(PORT, os.O_RDWR | os.O_CLOEXEC)
        hello = {"ev": "hello", "pid": os.getpid(), "kernel": os.uname().release, **_facts()}
        os.write(channel, json.dumps(hello).encode() + b"\n")
        while os.read(channel, 4096):  # until the host closes its end
            pass
    finally:
        os.sync()
        ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)


if __name__ == "__main__":
    main()
