"""E2B's own SDK (`e2b`, unmodified) against a real `codecage serve`: commands and ptys
through envd's `process.Process` Connect service (foreground and background commands,
callbacks, exit codes as CommandExitException, envs, cwd, kill, list, connect, stdin, ptys),
tenants, the audit log, and bad input on the port (Connect errors, never a 500)."""

from __future__ import annotations

import json
import struct
import threading
import time

import httpx
import pytest
from e2b import CommandExitException, Sandbox, TimeoutException
from e2b.exceptions import InvalidArgumentException, NotFoundException
from e2b.sandbox.commands.command_handle import PtySize

from .conftest import Service
from .e2b_server import env_for
from .test_e2b import envd
from .test_processes import wait_until

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]
STREAM = "application/connect+json"


def frame(message: object, flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def frames(body: bytes) -> list[tuple[int, dict[str, object]]]:
    out, at = [], 0
    while at < len(body):
        flags, size = struct.unpack_from(">BI", body, at)
        out.append((flags, json.loads(body[at + 5 : at + 5 + size])))
        at += 5 + size
    return out


def test_foreground_commands(e2b_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        out: list[str] = []
        err: list[str] = []
        result = sbx.commands.run(
            'echo "$GREETING from $(pwd)"; echo warn >&2',
            envs={"GREETING": "hello"},
            cwd="/tmp",
            on_stdout=out.append,
            on_stderr=err.append,
        )
        assert result.exit_code == 0 and result.error is None
        assert result.stdout == "hello from /tmp\n" and result.stderr == "warn\n"
        assert "".join(out) == result.stdout and "".join(err) == result.stderr
        with pytest.raises(CommandExitException) as failed:
            sbx.commands.run("echo partial; exit 3")
        assert failed.value.exit_code == 3 and failed.value.stdout == "partial\n"
        assert failed.value.error == "exit status 3"
        assert sbx.commands.run("id -un", user="root").stdout == "user\n"  # one identity
        assert sbx.commands.run("echo $HOME").stdout == "/home/user\n"
    finally:
        sbx.kill()


def test_sudo_runs_the_command_as_the_same_user_and_gains_nothing(
    e2b_env: dict[str, str],
) -> None:
    """`sudo` is the runtime's shim (runtime/sudo): the command runs, as the sandbox's one
    unprivileged user. Attack: whatever the user cannot do (write the read-only system, read
    another uid's memory, raise a capability), `sudo` cannot either; the same command
    without it fails the same way, and `sudo` of what the user may do works (controls)."""
    sbx = Sandbox.create(timeout=300)
    try:
        run = sbx.commands.run
        assert run("sudo echo hi").stdout == "hi\n"
        assert run('FOO=x; sudo echo "$FOO"').stdout == "x\n"
        same = "id -u; id -g; grep -E '^Cap(Eff|Prm)' /proc/self/status"
        assert run(f'sudo -u root -E sh -c "{same}"').stdout == run(same).stdout
        assert run("sudo -i pwd").stdout == "/home/user\n"
        assert run("sudo -n true").exit_code == 0
        assert run("sudo -u root touch /home/user/ok && ls ok").stdout == "ok\n"  # control
        probe = "touch {} 2>/dev/null && echo wrote || echo refused"
        for target in ("/usr/bin/pwned", "/etc/pwned", "/pwned"):
            cmd = probe.format(target)
            assert run(f"sudo sh -c '{cmd}'").stdout == "refused\n"
            assert run(cmd).stdout == "refused\n"
        with pytest.raises(CommandExitException) as info:
            run("sudo")
        assert "usage: sudo" in info.value.stderr
    finally:
        sbx.kill()


def test_background_commands_list_connect_kill_stdin(e2b_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        ticker = sbx.commands.run(
            "for i in $(seq 1 600); do echo tick $i; sleep 0.1; done", background=True, timeout=0
        )
        listed = {p.pid: p for p in sbx.commands.list()}
        assert ticker.pid in listed
        assert listed[ticker.pid].cmd == "/bin/bash" and listed[ticker.pid].args[0] == "-l"
        again = sbx.commands.connect(ticker.pid, timeout=0)
        seen = ""
        for stdout, _, _ in again:
            seen += stdout or ""
            if "tick" in seen:
                break
        again.disconnect()
        assert ticker.kill() is True
        with pytest.raises(CommandExitException) as killed:
            ticker.wait()
        assert killed.value.exit_code == -1 and killed.value.error == "signal: killed"
        assert sbx.commands.kill(ticker.pid) is False  # ended: not found
        assert ticker.pid not in [p.pid for p in sbx.commands.list()]

        cat = sbx.commands.run("cat", background=True, stdin=True)
        sbx.commands.send_stdin(cat.pid, "through envd\n")
        cat.send_stdin(b"bytes too\n")
        sbx.commands.close_stdin(cat.pid)
        assert cat.wait().stdout == "through envd\nbytes too\n"
        with pytest.raises(NotFoundException):
            sbx.commands.send_stdin(99999, "x")
        with pytest.raises(NotFoundException):
            sbx.commands.connect(99999)
    finally:
        sbx.kill()


def test_commands_work_while_a_cell_runs_and_outlive_a_kernel_restart(
    e2b_env: dict[str, str],
) -> None:
    from codecage._service import e2b as front

    if not front.INTERPRETER_MODULES:
        pytest.skip("the code interpreter's port is not served on this branch")
    from e2b_code_interpreter import Sandbox as Interpreter

    sbx = Interpreter.create(timeout=300)
    try:
        sleeper = sbx.commands.run("sleep 600", background=True, timeout=0)
        cell = threading.Thread(target=lambda: sbx.run_code("import time; time.sleep(4)"))
        cell.start()
        wait_until(lambda: sbx.commands.run("echo meanwhile").stdout == "meanwhile\n")
        assert cell.is_alive()  # answered while the cell still ran
        cell.join()
        sbx.run_code("import os; os._exit(1)")  # the kernel dies; a new one comes
        assert sleeper.pid in [p.pid for p in sbx.commands.list()]
        assert sbx.commands.kill(sleeper.pid)
    finally:
        sbx.kill()


def test_the_timeout_bounds_the_command_as_envd_does(e2b_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 30", timeout=1)
        wait_until(lambda: not any("sleep 30" in " ".join(p.args) for p in sbx.commands.list()))
    finally:
        sbx.kill()


def test_pty(e2b_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        got = bytearray()
        term = sbx.pty.create(PtySize(rows=20, cols=70), timeout=0)
        sbx.pty.send_stdin(term.pid, b"stty size\n")
        for _, _, pty in term:
            got += pty or b""
            if b"20 70" in got:
                break
        sbx.pty.resize(term.pid, PtySize(rows=25, cols=90))
        sbx.pty.send_stdin(term.pid, b"stty size; exit 0\n")
        result = term.wait(on_pty=got.extend)
        assert result.exit_code == 0 and b"25 90" in got
        assert sbx.pty.kill(term.pid) is False
    finally:
        sbx.kill()


def test_flood_and_fork_bomb_are_bounded(e2b_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        result = sbx.commands.run(
            "head -c 50000000 /dev/zero | tr '\\0' a; echo; echo end", timeout=120
        )
        assert result.stdout.endswith("end\n") or "bytes of output dropped" in result.stderr
        assert len(result.stdout) <= 50_000_002
        bomb = sbx.commands.run("b() { b | b & }; b; sleep 600", background=True, timeout=0)
        time.sleep(2)
        assert sbx.commands.kill(bomb.pid)
        wait_until(lambda: _echo(sbx))
    finally:
        sbx.kill()


def _echo(sbx: Sandbox) -> bool:
    try:
        return sbx.commands.run("echo ok", timeout=10).stdout == "ok\n"
    except Exception:  # the bomb's last processes may still hold every pid
        return False


def test_other_tenants_and_bad_input(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        sleeper = sbx.commands.run("sleep 600", background=True, timeout=0)
        bob = Sandbox.create(timeout=300, **_as("bob", e2b_service))  # type: ignore[arg-type]
        try:
            # bob's own token does not open alice's sandbox
            with envd(e2b_service, sbx, token=bob._envd_access_token) as client:
                answer = client.post(
                    "/process.Process/List", json={}, headers={"Content-Type": "application/json"}
                )
                assert answer.status_code == 401
        finally:
            bob.kill()
        with envd(e2b_service, sbx, token="wrong") as client:
            answer = client.post("/process.Process/List", json={})
            assert answer.status_code == 401
        with envd(e2b_service, sbx) as client:
            unary = {"Content-Type": "application/json"}
            assert client.post("/process.Process/List", json={}, headers=unary).status_code == 200
            for method, body, code in [
                (
                    "SendSignal",
                    {"process": {"pid": 99999}, "signal": "SIGNAL_SIGKILL"},
                    "not_found",
                ),
                ("SendSignal", {"process": {"pid": sleeper.pid}, "signal": 5}, "invalid_argument"),
                (
                    "SendInput",
                    {"process": {"pid": sleeper.pid}, "input": {"stdin": "!!"}},
                    "invalid_argument",
                ),
                ("SendInput", {"process": {}, "input": {"stdin": ""}}, "invalid_argument"),
                ("CloseStdin", {"process": {"tag": "nope"}}, "not_found"),
                (
                    "Update",
                    {"process": {"pid": sleeper.pid}, "pty": {"size": {"rows": 0}}},
                    "invalid_argument",
                ),
                (
                    "Update",
                    {"process": {"pid": sleeper.pid}, "pty": {"size": {"rows": 5, "cols": 5}}},
                    "failed_precondition",
                ),
                (
                    "SendInput",
                    {"process": {"pid": sleeper.pid}, "input": {"stdin": "eA=="}},
                    "failed_precondition",
                ),
            ]:
                answer = client.post(f"/process.Process/{method}", json=body, headers=unary)
                assert answer.json().get("code") == code, (method, body, answer.text)
                assert answer.status_code < 500
            stream = {"Content-Type": STREAM}
            for body in [
                b"",  # no envelope
                b"\x00\x00\x00\x00\x10{}",  # a length that is not the body's
                b"\x01" + frame({})[1:],  # compressed
                frame({"process": {"cmd": ""}}),
                frame({"process": {"cmd": "/bin/true", "args": "not a list"}}),
                frame({"process": {"cmd": "/bin/true", "envs": {"A": 1}}}),
                frame({"process": {"cmd": "/bin/true"}, "pty": {"size": {"rows": 0, "cols": 0}}}),
                frame({"process": {"cmd": "/bin/true", "cwd": "/nonexistent"}}),
            ]:
                answer = client.post("/process.Process/Start", content=body, headers=stream)
                assert answer.status_code == 200, answer.text
                (flags, end), *_ = frames(answer.content)[-1:]
                assert flags == 2 and "error" in end, (body, answer.content)
            # positive control: a well-formed start streams start, data and end
            answer = client.post(
                "/process.Process/Start",
                content=frame({"process": {"cmd": "/bin/echo", "args": ["hi"]}}),
                headers=stream,
            )
            events = [m for _, m in frames(answer.content)]
            assert "start" in events[0]["event"]  # type: ignore[operator]
            assert events[-1] == {} and any("end" in e.get("event", {}) for e in events[:-1])  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgumentException):
            sbx.commands.run("id", user="admin")
        sleeper.kill()
    finally:
        sbx.kill()
    rows = httpx.get(
        f"{e2b_service.url}/v1/audit",
        params={"sandbox_id": sbx.sandbox_id},
        headers={"Authorization": f"Bearer {e2b_service.keys['alice']}"},
        timeout=30,
    ).json()
    codes = [r["code"] for r in rows if r["kind"] == "process"]
    assert "/bin/bash -l -c 'sleep 600'" in codes and "/bin/echo hi" in codes


def _as(tenant: str, service: Service) -> dict[str, str]:
    return {"api_key": env_for(service, tenant)["E2B_API_KEY"]}


def test_stream_input(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        cat = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
        sbx.commands.stream_input(cat.pid, ["one ", b"two\n", "three\n"])
        sbx.commands.close_stdin(cat.pid)
        assert cat.wait().stdout == "one two\nthree\n"
        term = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
        sbx.pty.stream_input(term.pid, [b"exit 5\n"])
        with pytest.raises(CommandExitException) as ended:
            term.wait()
        assert ended.value.exit_code == 5
        with pytest.raises(NotFoundException):
            sbx.commands.stream_input(99999, ["x"])
        with envd(e2b_service, sbx) as client:
            for body in [
                frame({"data": {"input": {"stdin": "eA=="}}}),  # data before start
                frame({"start": {"process": {"pid": 1}}})[:-1],  # cut inside an envelope
                b"\x03" + frame({})[1:],
                frame({"other": {}}),
            ]:
                answer = client.post(
                    "/process.Process/StreamInput", content=body, headers={"Content-Type": STREAM}
                )
                assert answer.status_code == 200
                (flags, end), *_ = frames(answer.content)[-1:]
                assert flags == 2 and "error" in end, (body, answer.content)
    finally:
        sbx.kill()


def test_oversized_requests_are_refused(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        with envd(e2b_service, sbx) as client:
            huge = frame({"process": {"cmd": "/bin/echo", "args": ["x" * (8 << 20)]}})
            answer = client.post(
                "/process.Process/Start", content=huge, headers={"Content-Type": STREAM}
            )
            assert answer.status_code in (200, 413) and answer.status_code < 500
            if answer.status_code == 200:
                assert "error" in frames(answer.content)[-1][1]
            big_arg = frame({"process": {"cmd": "/bin/echo", "args": ["x" * (200 << 10)]}})
            answer = client.post(
                "/process.Process/Start", content=big_arg, headers={"Content-Type": STREAM}
            )
            end = frames(answer.content)[-1][1]
            assert end["error"]["code"] == "invalid_argument"  # type: ignore[index]
        assert sbx.commands.run("echo still fine").stdout == "still fine\n"
    finally:
        sbx.kill()
