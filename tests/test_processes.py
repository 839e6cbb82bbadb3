"""Background commands and ptys (the process manager, docs/protocol.md "Process channel")
through the native SDK, against the real jail. The process manager is the same code on
every backend, but how its channel reaches the host (a descriptor, or a token on the OCI
backends' listener) and what the runtime's kernel implements are not: the first tests run
on every backend (the conformance kit), the rest, which start many processes, on the
default one."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import pytest

from codecage import (
    ApprovalDenied,
    ApprovalRequest,
    Client,
    FileNotFoundInSandbox,
    Policy,
    PolicyError,
    ProcessNotFound,
    PtySize,
    Sandbox,
    SandboxError,
    TransportError,
)
from codecage.testing import policy

from .conftest import Service

pytestmark = pytest.mark.requires_root


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox(Policy(timeout_s=60)) as sandbox:
        yield sandbox


def wait_until(check: object, timeout_s: float = 20.0) -> None:
    """Poll `check()` until it is true (never a timed assertion: the bound is generous)."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


# -- on every backend ------------------------------------------------------------------------


@pytest.fixture
def each(backend: str) -> Iterator[Sandbox]:
    """A sandbox of the backend under test."""
    with Sandbox(policy(timeout_s=60)) as sandbox:
        yield sandbox


def test_a_kernel_killed_by_a_background_command_is_back_for_the_next_cell(
    each: Sandbox,
) -> None:
    """The kernel dies between cells (a command kills it): the next cell is told the state
    was lost (its code not run), the one after runs in the fresh kernel, and the sandbox
    goes on (a file request too)."""
    assert each.run_code("x = 41").error is None
    pid = each.run_code("import os; os.getpid()").text
    assert pid and pid.isdigit()
    assert each.commands.run(f"kill -9 {pid}; echo sent", background=True).wait().stdout == "sent\n"
    after = each.run_code("x = 1; x")
    assert after.error is not None and after.error.name == "KernelDied" and after.state_lost
    assert after.text is None
    assert each.run_code("x = 1; x").text == "1"
    assert each.run_code("x").text == "1" and not each.run_code("x").state_lost
    pid = each.run_code("import os; os.getpid()").text
    each.commands.run(f"kill -9 {pid}", background=True).wait()
    each.files.write("after.txt", "ok")  # a request after a quiet death works too
    assert each.files.read("after.txt") == b"ok"


def test_background_commands_and_a_pty_on_every_backend(each: Sandbox, backend: str) -> None:
    quick = each.commands.run("echo out; echo err >&2; exit 3", background=True)
    assert quick.pid > 1
    done = quick.wait()
    assert (done.exit_code, done.stdout, done.stderr) == (3, "out\n", "err\n")

    slow = each.commands.run("echo started; exec sleep 300", background=True)
    assert slow.pid in [p.pid for p in each.commands.list()]
    got = ""
    for stdout, _, _ in slow:  # its output from the start (connect's is from now on)
        got += stdout or ""
        if "started" in got:
            break
    assert each.commands.connect(slow.pid).pid == slow.pid
    orphan = each.commands.run("sleep 300 & echo $!", background=True).wait().stdout.strip()
    # it outlives a kernel restart (init and the host spare the process manager's tree)
    died = each.run_code("import os\nos._exit(7)")
    assert died.error is not None and died.error.name == "KernelDied"
    assert slow.pid in [p.pid for p in each.commands.list()]
    # and so do its processes' orphans where the process manager is their subreaper; gVisor
    # has no PR_SET_CHILD_SUBREAPER: there they are init's, and go with the kernel's own
    alive = each.commands.run(f"kill -0 {orphan} && echo alive", background=True).wait()
    assert (alive.stdout == "alive\n") is (backend != "gvisor")
    assert each.commands.kill(slow.pid) is True
    assert slow.wait().exit_code == 128 + 9
    assert slow.pid not in [p.pid for p in each.commands.list()]
    assert each.commands.kill(slow.pid) is False

    term = each.pty.create(PtySize(rows=30, cols=100))
    term.send_stdin(b"stty size; tty; exit\n")
    out = bytearray()
    assert term.wait(on_pty=out.extend).exit_code == 0
    assert b"30 100" in out and b"/dev/pts/" in out


def test_a_process_manager_killed_from_inside_comes_back_with_the_next_request(
    each: Sandbox,
) -> None:
    assert each.commands.run("echo before", background=True).wait().stdout == "before\n"
    slow = each.commands.run("sleep 300", background=True)
    assert slow.pid in [p.pid for p in each.commands.list()]  # positive control
    manager = each._jailed.procs
    old = manager.host_pid() if manager is not None else None
    each.run_code(
        "import os, signal\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit() and int(pid) not in (1, os.getpid()):\n"
        "        stat = open(f'/proc/{pid}/stat').read()\n"
        "        if stat.rsplit(')', 1)[1].split()[1] == '1':\n"
        "            os.kill(int(pid), signal.SIGKILL)\n"
    )
    if old is not None:  # its end (SIGKILL lands a moment after the cell returns)
        wait_until(lambda: _exited(old))
    # the host finds the old one's channel at end of file and asks init for a new one
    assert each.commands.run("echo after", background=True).wait().stdout == "after\n"
    assert slow.pid not in [p.pid for p in each.commands.list()]  # a new one: empty


# -- the default backend ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_the_process_manager_starts_with_the_first_background_command(sbx: Sandbox) -> None:
    """A sandbox starts none (a fork of the template's image less for every sandbox that
    never needs one); the first request that needs it has init start it, once."""
    init = sbx._jailed.init_pid
    assert init is not None
    assert sbx.run_code("print(1)").logs.stdout == ["1\n"]
    assert sbx.commands.run("echo fg").stdout == "fg\n"  # a plain command is the kernel's
    assert len(_children(init)) == 1 and sbx._jailed.procs is None  # the kernel alone
    assert sbx.commands.run("echo bg", background=True).wait().stdout == "bg\n"
    assert len(_children(init)) == 2  # positive control: the kernel and the new manager
    manager = sbx._jailed.procs
    assert sbx.commands.run("echo again", background=True).wait().stdout == "again\n"
    assert sbx._jailed.procs is manager and len(_children(init)) == 2  # the same one


def test_foreground_with_callbacks_streams_and_returns_the_exit_code(sbx: Sandbox) -> None:
    seen: list[str] = []
    result = sbx.commands.run(
        'echo "$A in $(pwd)"; echo oops >&2; exit 3',
        envs={"A": "b"},
        cwd="/tmp",
        on_stdout=seen.append,
    )
    assert result.exit_code == 3
    assert result.stdout == "b in /tmp\n" and result.stderr == "oops\n"
    assert "".join(seen) == "b in /tmp\n"
    # positive control: the kernel path keeps its own shape (sh, the workspace)
    plain = sbx.commands.run("pwd")
    assert plain.exit_code == 0 and plain.stdout == "/home/user\n"


def test_background_wait_kill_list_connect(sbx: Sandbox) -> None:
    quick = sbx.commands.run("echo done", background=True)
    assert quick.pid > 1
    assert quick.wait().stdout == "done\n"

    slow = sbx.commands.run(
        "for i in $(seq 1 1000); do echo tick $i; sleep 0.05; done", background=True
    )
    assert slow.pid in [p.pid for p in sbx.commands.list()]
    info = next(p for p in sbx.commands.list() if p.pid == slow.pid)
    assert info.cmd == "/bin/bash" and info.args[:2] == ["-l", "-c"] and info.cwd == "/home/user"
    again = sbx.commands.connect(slow.pid)
    got: list[str] = []
    for stdout, _, _ in again:
        if stdout:
            got.append(stdout)
        if "tick" in "".join(got):
            break
    assert sbx.commands.kill(slow.pid) is True
    result = slow.wait()
    assert result.exit_code == 128 + 9 and "SIGKILL" in (result.error or "")
    assert sbx.commands.kill(slow.pid) is False  # ended: nothing to kill
    assert slow.pid not in [p.pid for p in sbx.commands.list()]


def test_stdin_is_sent_and_closed(sbx: Sandbox) -> None:
    cat = sbx.commands.run("cat; echo closed", background=True, stdin=True)
    cat.send_stdin("hello ")
    sbx.commands.send_stdin(cat.pid, b"world\n")
    cat.close_stdin()
    assert cat.wait().stdout == "hello world\nclosed\n"
    # without stdin=True a command reads /dev/null, and input is refused
    no_input = sbx.commands.run("cat; sleep 30", background=True)
    with pytest.raises(PolicyError, match="takes no input"):
        no_input.send_stdin("x")
    no_input.kill()


def test_processes_work_while_a_cell_runs(sbx: Sandbox) -> None:
    result: list[object] = []

    def cell() -> None:
        result.append(
            sbx.run_code(
                "open('/tmp/cell-running', 'w').close()\nimport time\ntime.sleep(3)\n'cell'"
            )
        )

    thread = threading.Thread(target=cell)
    thread.start()
    wait_until(
        lambda: (
            sbx.commands.run("test -e /tmp/cell-running && echo yes", background=True).wait().stdout
            == "yes\n"
        )
    )
    during = sbx.commands.run("echo during the cell", background=True).wait()
    assert during.stdout == "during the cell\n"
    thread.join()
    assert getattr(result[0], "text", None) == "'cell'"


def test_background_processes_outlive_an_interrupt_and_a_kernel_restart(sbx: Sandbox) -> None:
    sleeper = sbx.commands.run("sleep 300", background=True)
    # a cell past its timeout: SIGINT to the kernel's processes, not to the sleeper
    interrupted = sbx.run_code("import time\ntime.sleep(30)", timeout=0.5)
    assert interrupted.error is not None and interrupted.error.name == "KeyboardInterrupt"
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    # a cell that ignores the interrupt: the kernel is killed and restarted
    stuck = sbx.run_code(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.01)",
        timeout=0.5,
    )
    assert stuck.state_lost
    # a kernel that exits by itself
    died = sbx.run_code("import os\nos._exit(7)")
    assert died.error is not None and died.error.name == "KernelDied"
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.run_code("1 + 1").text == "2"
    assert sleeper.kill() is True
    assert sleeper.wait().exit_code == 137


def test_output_flood_is_bounded_and_marked() -> None:
    with Sandbox(Policy(output_bytes=64 << 10)) as small:
        flood = small.commands.run(
            "head -c 20000000 /dev/zero | tr '\\0' a; echo; echo end", background=True
        )
        result = flood.wait()
        assert result.exit_code == 0
        assert result.truncated
        assert len(result.stdout) <= 64 << 10
        assert "bytes of output dropped" in result.stderr
        # the session is intact
        assert small.commands.run("echo ok", background=True).wait().stdout == "ok\n"


def test_process_count_and_fork_bomb_are_bounded() -> None:
    with Sandbox(Policy(pids_max=32)) as tight:
        handles = []
        with pytest.raises(SandboxError, match="limit"):
            for _ in range(64):
                handles.append(tight.commands.run("sleep 300", background=True))
        assert 1 <= len(handles) <= 8  # pids_max // 4 at a time
        for h in handles:
            h.kill()
        for h in handles:
            h.wait()
        before = tight._jailed.usage().pids_max_events
        bomb = tight.commands.run("b() { b | b & }; b; sleep 5", background=True)
        wait_until(lambda: tight._jailed.usage().pids_max_events > before)  # the wall held
        bomb.kill()
        bomb.wait()
        wait_until(lambda: _echo(tight) == "alive\n")
        assert tight.run_code("1 + 1").text == "2"


def test_pty_create_input_resize(sbx: Sandbox) -> None:
    term = sbx.pty.create(PtySize(rows=30, cols=100))
    term.send_stdin(b"stty size\n")
    seen = bytearray()
    for _, _, pty in term:
        seen += pty or b""
        if b"30 100" in seen:
            break
    sbx.pty.resize(term.pid, PtySize(rows=40, cols=120))
    sbx.pty.send_stdin(term.pid, b"stty size; tty; exit\n")
    out = bytearray()
    result = term.wait(on_pty=out.extend)
    assert result.exit_code == 0
    assert b"40 120" in out and b"/dev/pts/" in out


def test_bad_input_is_a_clear_error(sbx: Sandbox) -> None:
    with pytest.raises(ProcessNotFound):
        sbx.commands.send_stdin(999999, "x")
    with pytest.raises(ProcessNotFound):
        sbx.commands.connect(999999)
    assert sbx.commands.kill(999999) is False
    with pytest.raises(PolicyError, match="user"):
        sbx.commands.run("id", background=True, user="admin")
    with pytest.raises(FileNotFoundInSandbox):
        sbx.commands.run("pwd", background=True, cwd="/nonexistent")
    with pytest.raises(PolicyError):
        sbx.pty.resize(sbx.commands.run("sleep 30", background=True).pid, PtySize(0, 0))
    # root and user are the same unprivileged identity
    as_root = sbx.commands.run("id -u", background=True, user="root").wait().stdout
    assert as_root == sbx.commands.run("id -u", background=True, user="user").wait().stdout
    assert as_root.strip() != "0"
    for p in sbx.commands.list():
        sbx.commands.kill(p.pid)


def _echo(sbx: Sandbox) -> str | None:
    try:
        return sbx.commands.run("echo alive", background=True).wait().stdout
    except SandboxError:  # the bomb's last processes may still hold every pid
        return None


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _broken(sbx: Sandbox) -> bool:
    try:
        sbx.commands.list()
    except TransportError:
        return True
    return False


# -- the same through the service (the remote SDK over its process routes) ------------------


def test_remote_background_processes_are_the_tenants_and_audited(service: Service) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        _remote_processes(alice, bob)


def _remote_processes(alice: Client, bob: Client) -> None:
    with alice.Sandbox() as sbx:
        cat = sbx.commands.run("cat; echo bye >&2", background=True, stdin=True)
        assert cat.pid in [p.pid for p in sbx.commands.list()]
        cat.send_stdin("over the wire\n")
        cat.close_stdin()
        result = cat.wait()
        assert (result.exit_code, result.stdout, result.stderr) == (0, "over the wire\n", "bye\n")
        streamed: list[str] = []
        fg = sbx.commands.run("echo one; exit 4", on_stdout=streamed.append)
        assert fg.exit_code == 4 and "".join(streamed) == "one\n"
        term = sbx.pty.create(PtySize(rows=12, cols=34))
        sbx.pty.resize(term.pid, PtySize(rows=13, cols=35))
        term.send_stdin(b"stty size; exit\n")
        out = bytearray()
        assert term.wait(on_pty=out.extend).exit_code == 0 and b"13 35" in out
        sleeper = sbx.commands.run("sleep 300", background=True)
        # another tenant sees no such sandbox, whatever it asks
        for method, path, body in [
            ("GET", "processes", None),
            ("POST", "processes", {"cmd": "id"}),
            ("GET", f"processes/{sleeper.pid}/output", None),
            ("POST", f"processes/{sleeper.pid}/signal", {"signal": "SIGKILL"}),
            ("POST", f"processes/{sleeper.pid}/stdin", {"data": ""}),
        ]:
            answer = bob._http.request(method, f"/v1/sandboxes/{sbx.id}/{path}", json=body)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "SandboxNotFound"
        assert sleeper.pid in [p.pid for p in sbx.commands.list()]  # untouched
        assert sbx.commands.kill(sleeper.pid) is True
        assert sleeper.wait().exit_code == 137
        assert sbx.commands.kill(sleeper.pid) is False
        with pytest.raises(ProcessNotFound):
            sbx.commands.send_stdin(sleeper.pid, "x")
        sid = sbx.id

    def recorded() -> list[dict[str, object]]:
        rows = alice._http.get("/v1/audit", params={"sandbox_id": sid}).json()
        return [r for r in rows if r["kind"] == "process"]

    wait_until(lambda: len(recorded()) == 4 and all(r["outcome"] for r in recorded()))
    by_code = {str(r["code"]): r for r in recorded()}
    assert by_code["/bin/bash -l -c 'cat; echo bye >&2'"]["outcome"] == "ok"
    assert by_code["/bin/bash -l -c 'sleep 300'"]["outcome"] == "killed"
    assert "/bin/bash -i -l" in by_code
    # what was sent to each: the input counted, hashed and its tail kept; signals; close
    [sent] = by_code["/bin/bash -l -c 'cat; echo bye >&2'"]["files"]  # type: ignore[misc]
    typed = b"over the wire\n"
    assert sent["stdin_bytes"] == len(typed) and sent["stdin_closed"] is True
    assert sent["stdin_sha256"] == hashlib.sha256(typed).hexdigest()
    assert sent["stdin_tail"] == typed.decode() and sent["signals"] == []
    [keys] = by_code["/bin/bash -i -l"]["files"]  # type: ignore[misc]
    assert keys["stdin_tail"] == "stty size; exit\n"  # a terminal's keys, as typed
    [killed] = by_code["/bin/bash -l -c 'sleep 300'"]["files"]  # type: ignore[misc]
    # what was sent until its end record was written (the watcher writes it within
    # POLL_S of the process's end, so the late kill and "x" may come after it): the kill
    # that ended it, then in order what came after it and before the record
    assert killed["signals"] in ([9], [9, 9]) and killed["stdin_bytes"] in (0, 1), killed
    if killed["stdin_bytes"]:  # the "x" was sent after the second kill
        assert killed["signals"] == [9, 9], killed


def test_remote_bad_input_is_a_clear_error(service: Service) -> None:
    with service.client("alice") as alice, alice.Sandbox() as sbx:
        base = f"/v1/sandboxes/{sbx.id}/processes"
        cases = [
            ("POST", base, {}, 400),  # neither a command nor a pty
            ("POST", base, {"cmd": "id", "user": "admin"}, 422),
            ("POST", base, {"cmd": "id", "pty": {"rows": 0, "cols": 80}}, 422),
            ("POST", base, {"cmd": "pwd", "cwd": "/nonexistent"}, 404),
            ("POST", f"{base}/999999/signal", {"signal": "SIGSTOP"}, 422),
            ("POST", f"{base}/999999/signal", {"signal": "SIGKILL"}, 404),
            ("POST", f"{base}/999999/stdin", {"data": "!!"}, 400),
            ("POST", f"{base}/999999/stdin", {"data": ""}, 404),
            ("GET", f"{base}/999999/output", None, 404),
            ("GET", f"{base}/abc/output", None, 422),
            ("GET", f"{base}/1/output?offset=-1", None, 422),
        ]
        for method, path, body, status in cases:
            answer = alice._http.request(method, path, json=body)
            assert answer.status_code == status, (path, body, answer.text)
            assert set(answer.json()["error"]) >= {"type", "message"}
        surrogate = alice._http.post(
            base, content=b'{"cmd": "\\ud800"}', headers={"Content-Type": "application/json"}
        )
        assert surrogate.status_code == 422, surrogate.text  # not valid Unicode: refused
        # positive control: a well-formed start works
        assert alice._http.post(base, json={"cmd": "true"}).status_code == 201


def test_remote_background_commands_ask_for_approval(service: Service) -> None:
    asked: list[str] = []

    def yes_for_echo(request: ApprovalRequest) -> bool:
        asked.append(request.subject)
        return "echo" in request.subject

    with (
        service.client("alice") as alice,
        alice.Sandbox(Policy(approval_commands=True), approver=yes_for_echo) as sbx,
    ):
        assert sbx.commands.run("echo approved", background=True).wait().stdout == "approved\n"
        with pytest.raises(ApprovalDenied):
            sbx.commands.run("rm -rf /home/user", background=True)
        with pytest.raises(ApprovalDenied):
            sbx.pty.create()
        assert [p.pid for p in sbx.commands.list()] == []  # the denied ones never started
        assert any("echo approved" in s for s in asked) and len(asked) == 3

        def outcomes() -> list[str]:
            rows = alice._http.get("/v1/audit", params={"sandbox_id": sbx.id}).json()
            return sorted(str(r["outcome"]) for r in rows if r["kind"] == "process")

        wait_until(lambda: "None" not in outcomes())
        assert outcomes() == ["denied", "denied", "ok"]


def test_async_background_commands_and_ptys() -> None:
    import asyncio

    from codecage import AsyncSandbox

    async def main() -> None:
        async with await AsyncSandbox.create() as sbx:
            seen: list[str] = []

            async def collect(text: str) -> None:
                seen.append(text)

            handle = await sbx.commands.run("echo async; exit 2", background=True)
            result = await handle.wait(on_stdout=collect)
            assert (result.exit_code, result.stdout, "".join(seen)) == (2, "async\n", "async\n")
            term = await sbx.pty.create(PtySize(rows=10, cols=20))
            await term.send_stdin(b"stty size; exit\n")
            out = bytearray()
            assert (await term.wait(on_pty=out.extend)).exit_code == 0 and b"10 20" in out

    asyncio.run(main())


def test_async_watch_dir_is_awaited_too() -> None:
    import asyncio

    from codecage import AsyncSandbox

    async def main() -> None:
        async with await AsyncSandbox.create() as sbx:
            watch = await sbx.files.watch_dir(".")
            await sbx.files.write("seen.txt", "x")
            events: list[str] = []
            for _ in range(100):  # the kernel's watcher reports within a few polls
                events += [e.name for e in await watch.get_new_events()]
                if events:
                    break
                await asyncio.sleep(0.05)
            assert "seen.txt" in events  # a coroutine: awaited, not a blocking call
            await watch.stop()

    asyncio.run(main())
