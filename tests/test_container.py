"""The container backend: docker-py against Podman's Docker-compatible service (started
here, with runc), the seed's DockerSandbox settings, and the same sandbox API. Every probe
has a positive control outside the container."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator

import pytest

import codecage
from codecage import Policy
from codecage._jail import available_backends, get_jail
from codecage._jail.container import INIT_CAPABILITIES, LABEL, ContainerJail
from codecage._jail.host import UID_BASE
from codecage._jail.image import package_root

pytestmark = [pytest.mark.requires_root, pytest.mark.requires_podman]

# allow_weaker: the engine's root mount has no nosuid (container.LACKING, refused without it)
POLICY = Policy(isolation="container", memory_mb=256, disk_mb=16, allow_weaker=True)


@pytest.fixture(scope="module")
def jail() -> Iterator[ContainerJail]:
    from codecage._jail import image as _image

    _image.build(progress=lambda line: None)
    why = available_backends()["container"]
    if why is not None:  # tests/engine.py starts Podman's service when podman is installed
        pytest.skip(f"container backend unavailable: {why}")
    j = get_jail("container")
    assert isinstance(j, ContainerJail)
    yield j


def containers(j: ContainerJail, sandbox_id: str) -> list[str]:
    labelled = {"label": f"{LABEL}={sandbox_id}"}
    return [c.id for c in j.client.containers.list(all=True, filters=labelled)]


@pytest.fixture
def sandbox(jail: ContainerJail) -> Iterator[codecage.Sandbox]:
    with codecage.Sandbox(policy=POLICY) as sbx:
        assert len(containers(jail, sbx.id)) == 1
        yield sbx
    assert containers(jail, sbx.id) == []  # the engine's container is gone with the sandbox


def test_what_the_level_lacks_is_refused_without_allow_weaker(jail: ContainerJail) -> None:
    with pytest.raises(codecage.PolicyError, match="cannot enforce nosuid_mounts"):
        jail.create(POLICY.model_copy(update={"allow_weaker": False}))


def test_the_seed_settings_reach_the_engine(jail: ContainerJail) -> None:
    sbx = jail.create(POLICY)
    try:
        (found,) = jail.client.containers.list(filters={"label": f"{LABEL}={sbx.id}"})
        host = found.attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["Memory"] == 256 << 20
        assert host["NanoCpus"] == 10**9
        assert host["PidsLimit"] == POLICY.pids_max
        assert "no-new-privileges" in " ".join(host["SecurityOpt"])
        # Podman lists what ALL dropped, but for init's own capabilities (it needs them to
        # drop to the sandbox's uid with no groups; test_identity...: none is left for code)
        dropped = {c.removeprefix("CAP_") for c in host["CapDrop"]}
        assert {"CHOWN", "DAC_OVERRIDE", "KILL"} <= dropped, dropped
        assert not set(INIT_CAPABILITIES) & dropped, dropped
    finally:
        sbx.kill()


def test_identity_capabilities_seccomp_inside(sandbox: codecage.Sandbox) -> None:
    status = sandbox.commands.run("cat /proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = int(fields["Uid"].split()[0])
    assert uid >= UID_BASE  # a fresh unprivileged host uid
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    probe = (
        "import ctypes; ctypes.CDLL(None, use_errno=True).unshare(0x10000000), ctypes.get_errno()"
    )
    assert sandbox.run_code(probe).text == "(-1, 1)"  # unshare(CLONE_NEWUSER): EPERM
    # positive control: the same call succeeds on the host
    control = subprocess.run(["unshare", "--user", "true"], capture_output=True)
    assert control.returncode == 0


def test_no_network_and_a_read_only_root(sandbox: codecage.Sandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=2)  # positive control
        server.accept()[0].close()
        client.close()
        ex = sandbox.run_code(
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        )
        assert ex.error is not None and ex.error.name == "ConnectionRefusedError"
    finally:
        server.close()
    devices = sandbox.commands.run("cat /proc/net/dev").stdout
    assert [line.split(":")[0].strip() for line in devices.splitlines()[2:]] == ["lo"]
    assert sandbox.run_code("open('/home/user/ok', 'w').write('x')").text == "1"  # control
    mounts = sandbox.commands.run("cat /proc/mounts").stdout.splitlines()
    root = next(line for line in mounts if line.split()[1] == "/")
    assert "ro" in root.split()[3].split(",")
    for path in ("/etc/x", "/usr/x", f"{package_root()}/codecage/x", "/run/codecage-channel/x"):
        ex = sandbox.run_code(f"open({path!r}, 'w')")
        assert ex.error is not None, path
    full = sandbox.run_code("open('/home/user/big', 'wb').write(b'x' * (64 << 20))")
    assert full.error is not None and "No space left" in full.error.value


def test_session_limits_and_recovery(sandbox: codecage.Sandbox) -> None:
    sandbox.run_code("x = 41")
    slow = sandbox.run_code("import time; time.sleep(60)", timeout=1)
    assert slow.killed_by == "timeout"
    assert sandbox.run_code("x + 1").text == "42"
    big = sandbox.run_code("b = bytearray(400 << 20)")
    assert big.killed_by == "memory_limit"  # the host's own cgroup reading
    assert sandbox.run_code("'alive'").text == "'alive'"
    sandbox.files.write("data.txt", b"hello")
    assert sandbox.files.read("data.txt") == b"hello"
    ex = sandbox.run_code("from IPython.display import HTML; HTML('<b>hi</b>')")
    assert ex.results and ex.results[0].html == "<b>hi</b>"


def test_start_up_sweep_removes_containers_of_a_process_that_is_gone(jail: ContainerJail) -> None:
    from codecage._jail.container import OWNER_LABEL

    gone = "4999999-1-container"  # above any pid_max: a crashed service's owner name
    left = jail.client.containers.create(
        jail.tag, ["true"], labels={OWNER_LABEL: gone, LABEL: "leftover"}
    )
    mine = jail.create(POLICY)  # a live sandbox of this process: never swept
    try:
        jail._sweep()
        labelled = {"label": f"{OWNER_LABEL}={gone}"}
        assert jail.client.containers.list(all=True, filters=labelled) == []
        assert len(containers(jail, mine.id)) == 1
        assert mine.execute("1 + 1").text == "2"
    finally:
        mine.kill()
        with contextlib.suppress(Exception):
            left.remove(force=True)
