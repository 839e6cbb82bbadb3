"""The full-VM level's groundwork (docs/backends.md, "vm"): the guest images `codecage vm
build` makes, a real QEMU guest booted from them, and the doctor's choice of accelerator.
The backend itself (`isolation="vm"`) is not there yet."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from codecage._jail import vmimage

pytestmark = pytest.mark.requires_root


@pytest.fixture(scope="module")
def vm() -> vmimage.VmImage:
    if shutil.which(vmimage.QEMU) is None:
        pytest.skip("QEMU is not installed (scripts/install-backends)")
    return vmimage.build(progress=lambda line: None)


def test_the_guest_images_are_built_once_and_cached(vm: vmimage.VmImage) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in (vm.kernel, vm.initrd, vm.root)}
    again = vmimage.build(progress=lambda line: None)
    assert again == vm == vmimage.current()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was made again
    assert vm.root.stat().st_size > 100 << 20  # the sandbox image: the runtime, numpy, ...


def _host_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def _host_root_options() -> str:
    with open("/proc/mounts") as f:
        return [line.split()[3] for line in f if line.split()[1] == "/"][-1]


def test_a_guest_boots_with_no_network_device_and_a_read_only_root(vm: vmimage.VmImage) -> None:
    """What the guest sees, in its own words (its greeting on the virtio-serial port)."""
    booted = vmimage.probe("tcg", vm=vm)
    assert booted.ok, booted.detail
    hello = booted.hello
    assert hello is not None and hello["pid"] == 1
    assert hello["kernel"] == vm.kernel.name.removeprefix("vmlinuz-")  # our kernel, not the host's
    assert hello["kernel"] != os.uname().release
    assert hello["interfaces"] == ["lo"]  # no network device at all
    options = str(hello["root_options"]).split(",")
    assert options[0] == "ro" and {"nosuid", "nodev"} <= set(options)
    # positive controls: the host itself has a network device and a writable root
    assert [i for i in _host_interfaces() if i != "lo"]
    assert _host_root_options().split(",")[0] == "rw"


def test_the_accelerator_is_the_one_a_guest_really_boots_with(vm: vmimage.VmImage) -> None:
    found = vmimage.accelerator(refresh=True, vm=vm)
    assert found.ok and found.accel in ("kvm", "tcg"), found
    if found.accel == "tcg" and Path("/dev/kvm").exists():  # a node without working KVM
        assert "KVM:" in found.detail
    kept = vmimage.accelerator(vm=vm)  # booted once, then kept
    assert kept == found
