"""The guards on top of the jail: the module allowlist/denylist (enforced in the kernel),
static analysis (findings on the AST), and human approval of high-risk operations.

These are defence in depth. Their tests show what each layer stops and, for static
analysis and the module guard, what it misses; the misses are made harmless by the jail,
whose own tests (test_attacks.py) pass with every guard switched off.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import codecage
from codecage import (
    ApprovalDenied,
    ApprovalNotFound,
    ApprovalRequest,
    CodeRejected,
    Decision,
    Policy,
    PolicyError,
    QuotaExceeded,
    Sandbox,
    SandboxError,
    analyze,
)
from codecage._approvals import Approvals
from codecage._service.config import within

from .conftest import Service, cli, start_service, stop_service
from .test_terminal import FORBIDDEN, HOSTILE_TEXT

T = TypeVar("T")

pytestmark = pytest.mark.requires_root


def rules(code: str) -> set[str]:
    return {f.rule for f in analyze(code)}


# -- the module guard, in the real kernel -----------------------------------------------------


def test_a_denied_module_fails_even_when_the_template_already_imported_it() -> None:
    probe = "import sys; ('os' in sys.modules, 'socket' in sys.modules)"
    with Sandbox() as control:  # positive control: no guard, the same imports work
        assert control.run_code(probe).text == "(True, True)"
        assert control.run_code("import socket; socket.AF_INET > 0").text == "True"
    with Sandbox(Policy(modules_deny=("socket", "subprocess", "os.path"))) as sbx:
        assert sbx.run_code(probe).text == "(True, True)"  # loaded, and still refused:
        for code, name in [
            ("import socket", "socket"),
            ("from subprocess import run", "subprocess"),
            ("__import__('subprocess')", "subprocess"),
            ("import importlib; importlib.import_module('socket')", "socket"),
            ("from os import path", "os.path"),
            ("import os.path", "os.path"),
        ]:
            ex = sbx.run_code(code)
            assert ex.error is not None and ex.error.name == "ImportError", code
            assert f"import of {name!r} is blocked by the sandbox policy (modules_deny)" in (
                ex.error.value
            )
        # libraries import what they need; the user's other modules are unaffected
        assert (
            sbx.run_code("import pandas as pd; int(pd.DataFrame({'a': [1, 2]}).a.sum())").text
            == "3"
        )
        assert sbx.run_code("import os; os.getcwd()").text == "'/home/user'"


def test_an_allowlist_admits_only_its_modules_and_holds_for_workspace_modules() -> None:
    policy = Policy(modules_allow=("math", "pandas", "mymod", "time"), interrupt_grace_s=0)
    with Sandbox(policy) as sbx:
        assert sbx.run_code("import math; math.factorial(5)").text == "120"
        assert sbx.run_code("import pandas; int(pandas.Series([1, 2]).sum())").text == "3"
        ex = sbx.run_code("import numpy")
        assert ex.error is not None and "(modules_allow)" in ex.error.value
        # a module the user wrote into the workspace is user code: the guard applies there too
        sbx.files.write("mymod.py", "import json\n")
        ex = sbx.run_code("import mymod")
        assert ex.error is not None and "import of 'json' is blocked" in ex.error.value
        # a kernel restart (timeout past the grace period) brings the guard back with it
        ex = sbx.run_code("import time; time.sleep(30)", timeout=0.5)
        assert ex.killed_by == "timeout" and ex.state_lost
        ex = sbx.run_code("import numpy")
        assert ex.error is not None and "(modules_allow)" in ex.error.value


def test_the_module_guard_is_not_the_boundary() -> None:
    """A documented miss: `sys.modules` hands out a module the guard refuses to import. The
    jail is what stops the code: the socket cannot reach a listener on the host's loopback,
    which the same code reaches from the host (positive control)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            "import sys\nsocket = sys.modules['socket']\n"
            "s = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
            "except OSError as e:\n    print('BLOCKED', e.errno)\n"
        )
        # on the host, load socket first, as the template has in the sandbox
        host = subprocess.run(
            [sys.executable, "-c", "import socket\n" + code], capture_output=True, text=True
        )
        assert "CONNECTED" in host.stdout
        with Sandbox(Policy(modules_deny=("socket",))) as sbx:
            assert "blocked by the sandbox policy" in (sbx.run_code("import socket").error.value)  # type: ignore[union-attr]
            out = "".join(sbx.run_code(code).logs.stdout)
            assert "BLOCKED" in out and "CONNECTED" not in out


def test_an_allowlist_admits_what_the_interpreter_imports_on_the_codes_behalf() -> None:
    allow = ("pandas", "numpy", "datetime", "io")
    with Sandbox(Policy(modules_allow=allow)) as sbx:
        sbx.files.write("data.csv", "a,b\n1,caf\xe9\n".encode("cp1252"))
        for code, expected in [
            ("import pandas as pd; pd.read_csv('data.csv', encoding='cp1252').b[0]", "'café'"),
            ("import datetime; datetime.datetime.strptime('2020-01-02', '%Y-%m-%d').day", "2"),
            ("from __future__ import annotations\n1", "1"),
            ("import pandas as pd; pd.Timestamp('2020-01-01').strftime('%A')", "'Wednesday'"),
        ]:
            ex = sbx.run_code(code)
            assert ex.error is None and ex.text == expected, (code, ex.error)
        ex = sbx.run_code("import importlib; importlib.__import__('socket')")
        assert ex.error is not None and "blocked by the sandbox policy" in ex.error.value


def test_module_names_are_validated() -> None:
    with pytest.raises(PolicyError, match="modules_deny"):
        Policy(modules_deny=("not a module",))
    assert Policy().with_overrides(["modules_allow=numpy, pandas"]).modules_allow == (
        "numpy",
        "pandas",
    )
    assert Policy().with_overrides(["modules_allow=none"]).modules_allow is None


# -- static analysis --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "rule", "severity", "line"),
    [
        ("import subprocess\nsubprocess.run(['ls'])", "CC101", "high", 1),
        ("x = 1\nimport os as o\no.system('ls')", "CC102", "high", 3),
        ("from os import execv", "CC102", "high", 1),
        ("!ls -la", "CC103", "high", 1),
        ("files = !ls", "CC103", "high", 1),
        ("%%bash\nls", "CC103", "high", 1),
        ("import urllib.request as u\nu.urlopen('http://x')", "CC201", "medium", 1),
        ("import socket\ns = socket.socket()", "CC202", "medium", 2),
        ("eval('1+1')", "CC301", "high", 1),
        ("f = exec", "CC301", "high", 1),
        ("import importlib\nimportlib.import_module('os')", "CC302", "medium", 2),
        ("getattr(object, 'x' + 'y')", "CC303", "low", 1),
        ("%time import os; os.system('id')", "CC102", "high", 1),
        ("%timeit -n 10 eval('1')", "CC301", "high", 1),
        ("%%time\nimport subprocess", "CC101", "high", 2),
        ("%%capture out\nimport ctypes", "CC401", "high", 2),
        ("%pip install requests", "CC103", "high", 1),
        ("%run other.py", "CC104", "medium", 1),
        ("%%writefile /etc/motd\nhi", "CC501", "medium", 1),
        ("%%nosuchmagic\nx", "CC002", "high", 1),
        ("!ls\ndef (:", "CC002", "high", 2),
        ("import ctypes", "CC401", "high", 1),
        ("from ctypes import CDLL\nCDLL(None)", "CC402", "high", 1),
        ("open('/etc/passwd', 'a').write('x')", "CC501", "medium", 1),
        ("open('../../usr/lib/x', mode='w')", "CC501", "medium", 1),
        ("import shutil\nshutil.rmtree('/usr/lib')", "CC501", "medium", 2),
        ("from pathlib import Path\nPath('/etc/x').write_text('y')", "CC501", "medium", 2),
        ("while True:\n    pass", "CC601", "low", 1),
        ("import itertools\nfor i in itertools.count():\n    pass", "CC601", "low", 2),
        ("().__class__.__base__.__subclasses__()", "CC701", "high", 1),
        ("def (:", "CC001", "low", 1),
        ("x = 1\n" * 20000, "CC002", "high", 1),
        ("x" + ".a" * 30000, "CC002", "high", 1),
        ("-" * 50000 + "1", "CC002", "high", 1),
    ],
)
def test_findings_have_a_rule_severity_line_and_message(
    code: str, rule: str, severity: str, line: int
) -> None:
    found = [f for f in analyze(code) if f.rule == rule]
    assert found, f"{rule} not found in {analyze(code)}"
    assert found[0].severity == severity and found[0].line == line and found[0].message


@pytest.mark.parametrize(
    "code",
    [
        "print(sum(range(10)))",
        "import pandas as pd\ndf = pd.read_csv('data.csv')\ndf.describe()",
        "open('out.csv', 'w').write('a,b')",
        "open('/tmp/x', 'w')",
        "with open('/etc/hostname') as f:\n    f.read()",
        "while True:\n    if input():\n        break",
        "%matplotlib inline\nimport matplotlib.pyplot as plt",
        "x = 10 % 3",
        "a = 1\nb = (a\n     != 2)",
        'msg = ("user: %s"\n       % "x")',
        's = """\n![chart](chart.png)\n%matplotlib inline\n"""',
        "%%html\n<b>bold</b>",
        "import asyncio\nawait asyncio.sleep(0)",
        "match 1:\n    case 1:\n        pass",
        "while True:\n    x = " + "-" * 1000 + "1\n    break",
    ],
)
def test_ordinary_code_has_no_findings(code: str) -> None:
    assert analyze(code) == []


def test_ipython_syntax_cannot_hide_code_from_the_analysis() -> None:
    # a `%` that continues an expression is the operator, not a magic: the cell parses as it
    # is and the import is seen (stripping it as a magic used to hide the whole cell)
    code = 'import subprocess\nmsg = ("user: %s"\n       % "x")\nsubprocess.run(["id"])'
    assert "CC101" in rules(code)
    # the statement of a timing magic is Python, and analysed
    assert "CC102" in rules('%time import os; os.system("id")')


def test_classic_evasions_what_is_caught_and_what_is_missed() -> None:
    # caught: unicode identifiers are normalised (NFKC) by the parser, decorators are names,
    # getattr with a literal reaches the same table, walks through __subclasses__ are seen
    assert "CC301" in rules("\uff45\uff58\uff45\uff43('print(1)')")  # fullwidth "exec"
    assert "CC301" in rules("@exec\ndef f():\n    pass")
    assert "CC701" in rules("getattr(getattr(object, '__subclasses__'), '__call__')()")
    assert "CC701" in rules("[c for c in ().__class__.__mro__[1].__subclasses__()]")
    assert "CC102" in rules("import os\ngetattr(os, 'system')('ls')")
    # flagged only as "computed name" (low), not as what it really does
    assert rules("getattr(__builtins__, 'ex' + 'ec')('1')") == {"CC303"}
    # missed entirely: names built from strings and looked up in a dict, encoded source
    assert analyze("import builtins\nvars(builtins)['ex' + 'ec']('import os')") == []
    assert analyze("import codecs\nsrc = codecs.decode('vzcbeg bf', 'rot13')") == []
    assert analyze("import sys\nsys.modules['o' + 's']") == []


def test_findings_are_in_the_execution_and_a_policy_can_block() -> None:
    with Sandbox(Policy(analysis_block_at="high")) as sbx:
        ex = sbx.run_code("import socket\nx = 1")
        assert [f.rule for f in ex.findings] == ["CC201"] and ex.error is None
        with pytest.raises(CodeRejected, match="CC101") as info:
            sbx.run_code("y = 2\nimport subprocess")
        assert [f.rule for f in info.value.findings] == ["CC101"]
        ex = sbx.run_code("'y' in globals()")  # the rejected cell never ran
        assert ex.text == "False"


def test_a_one_shot_run_is_blocked_before_it_starts() -> None:
    with pytest.raises(CodeRejected):
        codecage.run("import socket\nprint(1)", Policy(analysis_block_at="medium"))
    assert codecage.run("print(1)", Policy(analysis_block_at="low")).logs.stdout == ["1\n"]


# -- approvals in the SDK -----------------------------------------------------------------------


def test_an_approved_run_runs_and_a_denied_one_never_does() -> None:
    asked: list[ApprovalRequest] = []

    def approver(request: ApprovalRequest) -> Decision:
        asked.append(request)
        ok = "touch" not in request.subject
        return Decision(ok, "test", "looks fine" if ok else "no files please")

    policy = Policy(approval_findings_at="medium", approval_window_s=10)
    with Sandbox(policy, approver=approver) as sbx:
        assert sbx.run_code("1 + 1").text == "2" and not asked  # nothing found: no question
        ex = sbx.run_code("import socket\nsocket.AF_INET > 0")
        assert ex.text == "True"
        assert asked[-1].kind == "execute" and asked[-1].findings[0].rule == "CC201"
        assert asked[-1].sandbox_id == sbx.id
        with pytest.raises(ApprovalDenied, match="no files please") as info:
            sbx.run_code("import os\nos.system('touch /home/user/ran')")
        assert info.value.decision.by == "test"
        assert not sbx.files.exists("ran")  # it never ran


def test_no_answer_within_the_window_is_a_no() -> None:
    policy = Policy(approval_commands=True, approval_window_s=0.5)
    with Sandbox(policy) as sbx:  # no callback and nobody answering
        started = time.monotonic()
        with pytest.raises(ApprovalDenied, match=r"no answer within approval_window_s=0\.5"):
            sbx.commands.run("touch /home/user/ran")
        assert 0.5 <= time.monotonic() - started < 60  # it waited the window, not for ever
        assert not sbx.files.exists("ran")
        assert codecage.approvals.pending() == []


def test_another_thread_can_answer_through_the_process_broker() -> None:
    policy = Policy(approval_commands=True, approval_window_s=30)
    with Sandbox(policy) as sbx:

        def person() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                for request in codecage.approvals.pending():
                    if request.sandbox_id == sbx.id:
                        codecage.approvals.decide(request.id, True, "operator", "fine")
                        return
                time.sleep(0.01)

        thread = threading.Thread(target=person)
        thread.start()
        assert sbx.commands.run("echo approved").stdout == "approved\n"
        thread.join()


def test_large_downloads_and_raised_limits_need_a_yes() -> None:
    asked: list[ApprovalRequest] = []

    def approver(request: ApprovalRequest) -> bool:
        asked.append(request)
        return request.kind == "download"

    policy = Policy(approval_download_mb=0.01, approval_window_s=10)
    with Sandbox(policy, approver=approver) as sbx:
        sbx.files.write("small.txt", b"x" * 100)
        sbx.files.write("big.bin", b"y" * 20_000)
        assert sbx.files.read("small.txt") == b"x" * 100 and not asked
        assert sbx.files.read("big.bin") == b"y" * 20_000
        assert asked[-1].kind == "download" and "20000 bytes" in asked[-1].reasons[0]
    raised = Policy(approval_limits_above_default=True, memory_mb=1024, approval_window_s=10)
    with pytest.raises(ApprovalDenied, match="create was not approved"):
        Sandbox(raised, approver=approver)
    assert "memory_mb 1024 > 512" in asked[-1].reasons[0]
    with Sandbox(Policy(approval_limits_above_default=True, memory_mb=256)) as sbx:
        assert sbx.run_code("1").text == "1"  # lower than the defaults: nothing to ask


def test_a_broken_callback_is_a_no() -> None:
    def approver(request: ApprovalRequest) -> bool:
        raise RuntimeError("boom")

    with (
        Sandbox(Policy(approval_commands=True, approval_window_s=10), approver=approver) as sbx,
        pytest.raises(ApprovalDenied, match="callback failed"),
    ):
        sbx.commands.run("true")


def test_unknown_and_already_decided_approvals_are_clear_errors() -> None:
    broker = Approvals()
    with pytest.raises(ApprovalNotFound, match="unknown or expired"):
        broker.decide("nope", True, "me")
    request = ApprovalRequest(id="r1", kind="command", reasons=["x"], subject="ls", tenant="a")
    with pytest.raises(ApprovalDenied):
        broker.ask(request, 0.05)
    with pytest.raises(ApprovalNotFound, match="already decided: denied by timeout"):
        broker.decide("r1", True, "me")
    with pytest.raises(ApprovalNotFound, match="unknown or expired"):
        broker.decide("r1", True, "me", tenant="b")  # another tenant learns nothing


def test_tenants_can_only_tighten_the_operators_guards() -> None:
    base = Policy(modules_deny=("socket",), approval_findings_at="medium", approval_commands=True)
    ceiling = Policy(memory_mb=4096)
    tighter = within(
        base, {"modules_deny": ["socket", "ctypes"], "approval_findings_at": "low"}, ceiling
    )
    assert tighter.modules_deny == ("socket", "ctypes") and tighter.approval_findings_at == "low"
    for looser in (
        {"modules_deny": []},
        {"approval_findings_at": "high"},
        {"approval_findings_at": None},
        {"approval_commands": False},
        {"approval_window_s": 3600},
    ):
        with pytest.raises(PolicyError, match="can only be made stricter"):
            within(base, looser, ceiling)


# -- approvals in the service: HTTP API, CLI, remote callback, audit ---------------------------


def _wait_for(probe: Callable[[], list[T]], timeout_s: float = 20) -> list[T]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("nothing appeared in time")


def _rows(db: Path, sql: str, *params: object) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


HOSTILE_CODE = f"import subprocess\nNOTE = '''{HOSTILE_TEXT}'''\nprint('ran')"


def test_the_service_holds_a_run_until_a_person_approves(
    service: Service, alice: codecage.Client
) -> None:
    policy = Policy(approval_findings_at="high", approval_window_s=60)
    with alice.Sandbox(policy) as sbx:
        lines: list[dict[str, Any]] = []

        def stream() -> None:  # the raw NDJSON stream, as any HTTP client sees it
            body = {"code": HOSTILE_CODE}
            with alice._http.stream(
                "POST",
                f"/v1/sandboxes/{sbx.id}/execute",
                json=body,
                headers={"Accept": "application/x-ndjson"},
                timeout=90,
            ) as response:
                lines.extend(json.loads(line) for line in response.iter_lines() if line)

        thread = threading.Thread(target=stream)
        thread.start()
        pending = _wait_for(alice.approvals)
        assert pending[0].kind == "execute" and pending[0].sandbox_id == sbx.id
        assert [f.rule for f in pending[0].findings] == ["CC101"]
        with service.client("bob") as bob:  # another tenant sees nothing and cannot answer
            assert bob.approvals() == []
            with pytest.raises(ApprovalNotFound):
                bob.approve(pending[0].id)
        listed = cli("approvals", "list", "--url", service.url, "--key", service.keys["alice"])
        assert pending[0].id in listed and "CC101" in listed
        # the subject's terminal controls never reach the operator (tests/test_terminal.py)
        shown = cli(
            "approvals", "show", pending[0].id, "--url", service.url, "--key", service.keys["alice"]
        )  # fmt: skip
        assert pending[0].subject == HOSTILE_CODE and "<A><B>0;pwned<C>" in shown, shown
        assert not FORBIDDEN.search(listed + shown) and "held terminal controls" in shown, shown
        out = cli(
            "approvals", "approve", pending[0].id, "--url", service.url,
            "--key", service.keys["alice"], "--reason", "reviewed", "--by", "carol",
        )  # fmt: skip
        assert "approved by carol" in out
        thread.join(timeout=60)
        assert lines[0]["ev"] == "pending_approval"
        assert lines[0]["approval"]["id"] == pending[0].id
        assert {"ev": "stdout", "text": "ran\n"} in lines and lines[-1]["ev"] == "execution"
        with pytest.raises(ApprovalNotFound, match="already decided: approved by carol"):
            alice.deny(pending[0].id)
    [run] = _rows(service.db, "SELECT * FROM runs WHERE sandbox_id=? AND kind='execute'", sbx.id)
    assert run["outcome"] == "ok" and run["status"] == "completed"
    assert json.loads(run["findings"])[0]["rule"] == "CC101"
    approval = json.loads(run["approval"])
    assert (approval["approved"], approval["by"], approval["reason"]) == (True, "carol", "reviewed")
    [row] = _rows(service.db, "SELECT * FROM approvals WHERE id=?", pending[0].id)
    assert row["tenant"] == "alice" and row["run_id"] == run["id"]
    assert row["approved"] == 1 and row["decided_by"] == "carol" and row["decided_at"] > 0


def test_a_remote_callback_answers_and_a_no_is_recorded(
    service: Service, alice: codecage.Client
) -> None:
    policy = Policy(approval_commands=True, approval_window_s=60)

    def no(request: ApprovalRequest) -> Decision:
        return Decision(False, "dave", "not now")

    with alice.Sandbox(policy, approver=no) as sbx:
        with pytest.raises(ApprovalDenied, match="not now"):
            sbx.commands.run("touch /home/user/ran")
        assert not sbx.files.exists("ran")
    [run] = _rows(service.db, "SELECT * FROM runs WHERE sandbox_id=? AND kind='command'", sbx.id)
    assert run["outcome"] == "denied" and run["error_name"] == "ApprovalDenied"
    [row] = _rows(service.db, "SELECT * FROM approvals WHERE run_id=?", run["id"])
    assert (row["approved"], row["decided_by"], row["reason"]) == (0, "dave", "not now")
    assert row["decided_key"] and row["client_ref"]  # the key that answered, the caller's ref
    with alice.Sandbox(policy, approver=lambda request: True) as sbx:
        assert sbx.commands.run("echo yes").stdout == "yes\n"


def test_blocked_code_over_http_names_its_findings(
    service: Service, alice: codecage.Client
) -> None:
    with alice.Sandbox(Policy(analysis_block_at="high")) as sbx:
        with pytest.raises(CodeRejected) as info:
            sbx.run_code("import ctypes")
        assert [f.rule for f in info.value.findings] == ["CC401"]
        with pytest.raises(CodeRejected):  # the streaming path says the same
            sbx.run_code("import ctypes", on_stdout=print)
        ex = sbx.run_code("import socket\n1")
        assert ex.text == "1" and [f.rule for f in ex.findings] == ["CC201"]
    rows = _rows(service.db, "SELECT outcome FROM runs WHERE sandbox_id=? ORDER BY rowid", sbx.id)
    assert [r["outcome"] for r in rows] == ["rejected", "rejected", "ok"]
    with pytest.raises(PolicyError, match="can only be made stricter"):
        alice.Sandbox(Policy(approval_window_s=3600))  # longer than the operator's 300 s


def test_a_remote_callback_answers_only_its_own_requests(
    service: Service, alice: codecage.Client
) -> None:
    """Two clients of one tenant: the one with a callback never answers the other's."""
    result: dict[str, BaseException] = {}

    def other() -> None:  # waits for a yes nobody gives: denied when its window closes
        with service.client("alice") as client:
            try:
                client.run(
                    "import subprocess", Policy(approval_findings_at="high", approval_window_s=3)
                )
            except ApprovalDenied as exc:
                result["denied"] = exc

    thread = threading.Thread(target=other)
    thread.start()
    _wait_for(alice.approvals)
    with alice.Sandbox(Policy(approval_commands=True), approver=lambda request: True) as sbx:
        assert sbx.commands.run("echo mine").stdout == "mine\n"
        time.sleep(0.5)  # its watcher has seen the other request by now, and left it alone
    thread.join(timeout=30)
    assert "timeout" in str(result["denied"])


def test_approver_keys_and_the_pending_quota(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('approvers = "approver_keys"\n[quotas]\npending_approvals = 1\n')
    svc = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        approver_key = cli(
            "keys", "create", "--tenant", "alice", "--role", "approver", "--db", str(svc.db)
        )
        policy = Policy(approval_commands=True, approval_window_s=30)
        with svc.client("alice") as client, client.Sandbox(policy) as sbx:
            with pytest.raises(SandboxError, match="approver keys only"):
                client.approvals()  # a client key may not answer here
            outcome: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda: outcome.update(result=sbx.commands.run("echo ok"))
            )
            thread.start()
            with codecage.connect(svc.url, approver_key) as approver:
                pending = _wait_for(approver.approvals)
                with pytest.raises(QuotaExceeded, match="wait for approval"):
                    sbx.commands.run("echo second")  # one pending per tenant here
                with pytest.raises(SandboxError, match="only answer approvals"):
                    approver.Sandbox()  # an approver key runs nothing
                decision = approver.approve(pending[0].id, "fine", "erin")
            thread.join(timeout=30)
            assert outcome["result"].stdout == "ok\n" and decision.key
        [row] = _rows(svc.db, "SELECT * FROM approvals WHERE id=?", pending[0].id)
        assert row["decided_by"] == "erin" and row["decided_key"] == decision.key
    finally:
        stop_service(svc)
