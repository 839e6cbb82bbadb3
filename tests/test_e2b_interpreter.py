"""The code interpreter surface (port 49999) with E2B's real code-interpreter SDK as the
client, against a real `codecage serve` on loopback: streaming callbacks, errors, charts and
DataFrames, contexts, bash, languages, execution counts, client timeouts, a sandbox killed
mid-run, and bad input on /execute and /contexts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage

e2b = pytest.importorskip("e2b")
e2b_ci = pytest.importorskip("e2b_code_interpreter")

from e2b import InvalidArgumentException, NotFoundException, SandboxException  # noqa: E402
from e2b import TimeoutException as E2BTimeout  # noqa: E402
from e2b_code_interpreter import Sandbox  # noqa: E402
from e2b_code_interpreter.charts import (  # noqa: E402
    BarChart,
    BoxAndWhiskerChart,
    ChartType,
    LineChart,
    SuperChart,
)

from .conftest import Service  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.requires_root]


@pytest.fixture
def server(e2b_service: Service, e2b_env: dict[str, str]) -> Service:
    """The shared service (tests/e2b_server.py), with E2B's SDKs pointed at it as alice."""
    return e2b_service


@pytest.fixture
def sbx(server: Service) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=120)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def headers(sandbox: Sandbox, token: str | None = "own") -> dict[str, str]:
    out = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999"}
    if token is not None:
        out["X-Access-Token"] = sandbox._envd_access_token if token == "own" else token
    return out


def test_streaming_callbacks_results_and_errors(sbx: Sandbox) -> None:
    out: list[Any] = []
    err: list[Any] = []
    results: list[Any] = []
    ex = sbx.run_code(
        "import sys\nprint('one')\nprint('two', file=sys.stderr)\n'text'",
        on_stdout=out.append,
        on_stderr=err.append,
        on_result=results.append,
    )
    assert [m.line for m in out] == ["one\n"] and [m.line for m in err] == ["two\n"]
    assert ex.text == "text" and results[0].is_main_result  # quotes stripped, as E2B's
    assert ex.logs.stdout == ["one\n"] and ex.error is None
    errors: list[Any] = []
    bad = sbx.run_code("def f():\n    raise ValueError('nope')\nf()", on_error=errors.append)
    assert bad.error is not None and bad.error.name == "ValueError"
    assert bad.error.value == "nope" and "raise ValueError" in bad.error.traceback
    assert errors and errors[0].name == "ValueError"
    # state persists, and the count follows the cells (a syntax error counts too)
    sbx.run_code("x = 41")
    assert sbx.run_code("x + 1").text == "42"
    sbx.run_code("echo 'not python'")
    count = sbx.run_code("!pwd")
    assert count.logs.stdout == ["/home/user\n"]
    assert count.execution_count == sbx.run_code("1").execution_count - 1


def test_charts_and_dataframes(sbx: Sandbox) -> None:
    ex = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.figure()\nplt.bar(['a', 'b', 'c'], [3, 1, 2], label='sales')\n"
        "plt.title('Sales'); plt.xlabel('Shop'); plt.ylabel('Amount [EUR]')\nplt.show()"
    )
    result = ex.results[0]
    assert result.png and isinstance(result.chart, BarChart) and not result.extra
    assert result.chart.type == ChartType.BAR and result.chart.title == "Sales"
    assert (result.chart.x_label, result.chart.y_unit) == ("Shop", "EUR")
    assert [(b.label, b.value, b.group) for b in result.chart.elements] == [
        ("a", 3, "sales"),
        ("b", 1, "sales"),
        ("c", 2, "sales"),
    ]
    lines = sbx.run_code(
        "fig, axs = plt.subplots(1, 2)\nfig.suptitle('Both')\n"
        "axs[0].plot([1, 2, 3], [1, 4, 9], label='sq')\naxs[1].plot([0, 1], [1, 0])\nplt.show()"
    )
    chart = lines.results[0].chart
    assert isinstance(chart, SuperChart) and chart.title == "Both"
    first = chart.elements[0]
    assert isinstance(first, LineChart) and first.elements[0].label == "sq"
    assert first.elements[0].points == [(1.0, 1.0), (2.0, 4.0), (3.0, 9.0)]
    frame = sbx.run_code(
        "import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', None, 'z']})"
    )
    main = frame.results[0]
    assert main.data == {"a": [1, 2, 3], "b": ["x", None, "z"]} and main.html
    assert main.to_json if hasattr(main, "to_json") else True
    serialized = frame.to_json()
    assert '"data"' in serialized


BOXES = """
import matplotlib.pyplot as plt
scores = {"A": [85, 90, 78, 92, 88], "B": [95, 89, 76, 91, 84, 87], "C": [75, 82, 88, 79, 86]}
fig, ax = plt.subplots()
ax.set_title("Scores"); ax.set_xlabel("Class"); ax.set_ylabel("Score")
ax.boxplot(list(scores.values()), {labels}=list(scores.keys()), patch_artist=True)
plt.show()
"""


@pytest.mark.parametrize("labels", ["tick_labels", "labels"])
def test_box_and_whisker_charts(sbx: Sandbox, labels: str) -> None:
    """E2B's BoxAndWhiskerChart: quartiles, whiskers, median and outliers per box. `labels=`
    is how E2B's code spells it (matplotlib 3.10, which the runtime pins as E2B's image
    does; 3.11 removed it), `tick_labels=` the newer spelling."""
    ex = sbx.run_code(BOXES.replace("{labels}", labels))
    assert ex.error is None, ex.error
    chart = ex.results[0].chart
    assert isinstance(chart, BoxAndWhiskerChart) and chart.type == ChartType.BOX_AND_WHISKER
    assert (chart.title, chart.x_label, chart.y_label) == ("Scores", "Class", "Score")
    assert [b.label for b in chart.elements] == ["A", "B", "C"]
    assert [b.outliers for b in chart.elements] == [[], [76], []]
    assert [b.min for b in chart.elements] == [78, 84, 75]
    assert [b.first_quartile for b in chart.elements] == [85, 84.75, 79]
    assert [b.median for b in chart.elements] == [88, 88, 82]
    assert [b.third_quartile for b in chart.elements] == [90, 90.5, 86]
    assert [b.max for b in chart.elements] == [92, 95, 88]


def test_malformed_rich_results_do_not_break_the_client(sbx: Sandbox) -> None:
    """Code that displays bundles of its own: a chart that is no chart, data that is no
    object, an unknown MIME type. The client still gets a usable execution."""
    ex = sbx.run_code(
        "from IPython.display import display\n"
        "display({'application/vnd.codecage.chart+json': 'junk',"
        " 'application/vnd.codecage.data+json': [1, 2], 'text/plain': 'p',"
        " 'application/x-odd': 'odd'}, raw=True)\n"
        "display({'application/vnd.codecage.chart+json': {'type': 'bar'}, 'text/plain': 'q'},"
        " raw=True)\n"
        "print('after')"
    )
    assert ex.error is None and ex.logs.stdout == ["after\n"]
    assert ex.results[0].text == "p" and ex.results[0].chart is None
    assert ex.results[0].data is None and ex.results[0].extra == {"application/x-odd": "odd"}
    assert ex.results[1].text == "q"  # a chart the SDK cannot read is dropped by the SDK


def test_huge_output_is_bounded(sbx: Sandbox) -> None:
    seen: list[int] = []
    ex = sbx.run_code(
        "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\n",
        on_stdout=lambda m: seen.append(len(m.line)),
    )
    total = sum(len(s) for s in ex.logs.stdout)
    assert 0 < total <= 16 << 20  # the policy's output budget, never the 64 MiB written
    assert sum(seen) == total


def test_a_kernel_killed_from_a_command_is_back_for_the_next_cell(sbx: Sandbox) -> None:
    """What E2B's systemd tests check of their image (its servers restarted after a
    `kill -9` from inside), as codecage has it: the sandbox's init restarts the kernel, and
    the next cell is told that the state is lost instead of running without it."""
    assert sbx.run_code("x = 41").error is None
    pid = sbx.run_code("import os; os.getpid()").text
    assert pid and pid.isdigit()
    killed = sbx.commands.run(f"kill -9 {pid}; echo sent", user="root")
    assert killed.stdout == "sent\n"  # the command is no part of the kernel: it lives on
    after = sbx.run_code("x = 1; x")  # told the state is gone; this code did not run
    assert after.error is not None and after.error.name == "KernelDied", after
    assert "did not run" in after.error.value and after.text is None
    assert sbx.run_code("x = 1; x").text == "1"  # the new kernel's state from here on
    assert sbx.run_code("x").text == "1"


def test_a_context_in_root_works_in_the_workspace(sbx: Sandbox) -> None:
    """E2B's sandboxes run as root in /root: here /root is the one user's workspace."""
    for language, code in (("python", "open('made-in-root', 'w').write('r')"), ("bash", "pwd")):
        ctx = sbx.create_code_context(cwd="/root", language=language)
        assert ctx.cwd == "/root" and sbx.list_code_contexts()[-1].cwd == "/root"
        ex = sbx.run_code(code, context=ctx)
        assert ex.error is None, ex.error
    assert sbx.files.read("/home/user/made-in-root") == "r"
    assert sbx.files.read("/root/made-in-root") == "r"
    assert sbx.commands.run("cd ~root && pwd -P").stdout.strip() == "/home/user"


def test_contexts_are_independent_and_keep_their_cwd(sbx: Sandbox) -> None:
    sbx.run_code("x = 1")
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    missing = sbx.run_code("x", context=ctx)
    assert missing.error is not None and missing.error.value == "name 'x' is not defined"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert sbx.run_code("import os; os.getcwd()").text == "/home/user"
    sbx.run_code("y = 2", context=ctx)
    listed = sbx.list_code_contexts()
    assert listed[0].id == "default" and listed[-1].id == ctx.id
    sbx.restart_code_context(ctx)
    gone = sbx.run_code("y", context=ctx)
    assert gone.error is not None and gone.error.name == "NameError"
    assert sbx.run_code("x").text == "1"  # the default context kept its state
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)
    with pytest.raises(NotFoundException):
        sbx.restart_code_context(ctx.id)
    with pytest.raises(InvalidArgumentException):
        sbx.run_code("1", context=ctx, language="python")


def test_bash_keeps_shell_state(sbx: Sandbox) -> None:
    first = sbx.run_code('cd /tmp && X=5 && f() { echo "fn $1"; }; echo hi', language="bash")
    assert first.logs.stdout == ["hi\n"] and first.error is None
    again = sbx.run_code("echo $X; f a; pwd", language="bash")
    assert "".join(again.logs.stdout) == "5\nfn a\n/tmp\n"
    failed = sbx.run_code("echo out; echo err >&2; false", language="bash")
    assert failed.error is not None and failed.error.name == "ExitCodeError"
    assert failed.logs.stderr == ["err\n"]
    env = sbx.run_code("echo $FOO", language="bash", envs={"FOO": "bar"})
    assert env.logs.stdout == ["bar\n"]
    assert sbx.run_code("echo ${FOO:-unset}", language="bash").logs.stdout == ["unset\n"]
    ctx = sbx.create_code_context(language="bash")
    fresh = sbx.run_code("echo ${X:-none}; pwd", context=ctx)
    assert "".join(fresh.logs.stdout) == "none\n/home/user\n"


def test_unknown_language_names_the_supported_ones(sbx: Sandbox) -> None:
    with pytest.raises(SandboxException, match="supported are python, bash"):
        sbx.run_code("console.log(1)", language="js")
    with pytest.raises(SandboxException, match="supported are python, bash"):
        sbx.create_code_context(language="r")


def test_a_client_timeout_interrupts_the_run(sbx: Sandbox) -> None:
    with pytest.raises(E2BTimeout):
        sbx.run_code("import time; time.sleep(120)", timeout=2)
    # the server saw the client go and interrupted the cell: the next one runs at once
    assert sbx.run_code("1 + 1", timeout=30).text == "2"


def test_a_sandbox_killed_mid_run_is_reported_as_killed(server: Service) -> None:
    sandbox = Sandbox.create(timeout=120)
    timer = threading.Timer(2.0, sandbox.kill)
    timer.start()
    try:
        with pytest.raises(E2BTimeout, match="killed"):
            sandbox.run_code("import time; time.sleep(60)", timeout=60)
    finally:
        timer.cancel()
        sandbox.kill()


def test_keepalives_and_events_on_the_wire(sbx: Sandbox, server: Service) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/execute",
        json={"code": "import time\nprint(1)\ntime.sleep(6)\n2"},
        headers=headers(sbx),
        timeout=60,
    ) as response:
        kinds = [__import__("json").loads(line)["type"] for line in response.iter_lines()]
    # streamed: the line printed first came before a keepalive (5 s of silence), the result after
    assert kinds[0] == "stdout" and kinds.index("keepalive") < kinds.index("result")
    assert kinds[-3:] == ["result", "number_of_executions", "end_of_execution"]


def test_bad_input_on_execute_and_contexts(sbx: Sandbox, server: Service) -> None:
    url = server.url
    own = headers(sbx)
    with httpx.Client(timeout=30) as client:
        # a positive control first: the same request, well formed, runs
        ok = client.post(f"{url}/execute", json={"code": "1"}, headers=own)
        assert ok.status_code == 200 and '"end_of_execution"' in ok.text
        for bad in (
            {},
            {"code": 5},
            {"code": "1", "env_vars": {"A": 1}},
            {"code": "1", "context_id": "x", "language": "python"},
            {"code": "1", "env_vars": {"": "v"}},
            {"code": "1", "language": "cobol"},
        ):
            r = client.post(f"{url}/execute", json=bad, headers=own)
            assert r.status_code == 400, (bad, r.text)
            assert set(r.json()) == {"code", "message"}
        json_type = {**own, "Content-Type": "application/json"}
        r = client.post(f"{url}/execute", content=b'{"code": "\\ud800"}', headers=json_type)
        assert r.status_code == 400 and r.json()["code"] == 400  # valid JSON, not valid text
        r = client.post(f"{url}/execute", content=b"{not json", headers=json_type)
        assert r.status_code == 400 and r.json()["code"] == 400
        r = client.post(f"{url}/execute", json={"code": "1", "context_id": "nope"}, headers=own)
        assert r.status_code == 404 and "nope" in r.json()["message"]
        big = client.post(f"{url}/execute", json={"code": "#" * (17 << 20)}, headers=own)
        assert big.status_code in (400, 413)
        for method, path in (("POST", "/contexts/nope/restart"), ("DELETE", "/contexts/nope")):
            r = client.request(method, f"{url}{path}", headers=own)
            assert r.status_code == 404 and r.json()["code"] == 404
        r = client.post(f"{url}/contexts", json={"cwd": "/no/such/dir"}, headers=own)
        assert r.status_code == 404 and "no such" in r.json()["message"]
        r = client.post(f"{url}/contexts", json={"cwd": 7}, headers=own)
        assert r.status_code == 400
        # credentials: none, a wrong token, and another tenant's key cannot reach it
        for hdrs in (headers(sbx, None), headers(sbx, "wrong")):
            for method, path in (("POST", "/execute"), ("GET", "/contexts")):
                r = client.request(method, f"{url}{path}", json={"code": "1"}, headers=hdrs)
                assert r.status_code == 401 and set(r.json()) == {"code", "message"}
        r = client.get(f"{url}/contexts", headers={**own, "E2b-Sandbox-Id": "f" * 32})
        assert r.status_code == 502 and "was not found" in r.json()["message"]
        # the traffic token the control plane hands out is the contexts calls' credential
        r = client.get(
            f"{url}/contexts",
            headers={**headers(sbx, None), "E2B-Traffic-Access-Token": sbx.traffic_access_token},
        )
        assert r.status_code == 200 and r.json()[0]["id"] == "default"


def test_runs_and_context_operations_are_audited(sbx: Sandbox, server: Service) -> None:
    import sqlite3

    ctx = sbx.create_code_context()
    sbx.run_code("print('audited')", context=ctx)
    sbx.run_code("echo audited", language="bash")
    sbx.run_code("1 + 1")
    time.sleep(0.2)
    conn = sqlite3.connect(Path(server.db))
    rows = conn.execute(
        "SELECT kind, code, outcome, language, context_id FROM runs WHERE sandbox_id = ?"
        " ORDER BY started_at",
        (sbx.sandbox_id,),
    ).fetchall()
    conn.close()
    kinds = [r[0] for r in rows]
    assert "context" in kinds
    cells = [r[1:] for r in rows if r[0] == "execute"]
    assert cells == [
        ("print('audited')", "ok", "python", ctx.id),
        ("echo audited", "ok", "bash", "default-bash"),
        ("1 + 1", "ok", "python", "default"),
    ]


# -- smolagents' E2B executor, unchanged ---------------------------------------------------------


def test_smolagents_e2b_executor_runs_in_codecage(server: Service) -> None:
    smolagents = pytest.importorskip("smolagents")
    from smolagents.monitoring import AgentLogger, LogLevel
    from smolagents.remote_executors import E2BExecutor

    logger = AgentLogger(level=LogLevel.OFF)
    # It starts with `!pip install pillow numpy`: installed already, so no network is needed.
    executor = E2BExecutor(additional_imports=["pillow", "numpy"], logger=logger)
    try:
        executor.send_tools({"final_answer": smolagents.FinalAnswerTool()})
        out = executor(
            "import numpy as np\nprint('mean', np.mean([1, 2, 3]))\nint(np.arange(3).sum())"
        )
        assert out.logs.strip() == "mean 2.0" and out.output == "3"
        final = executor("final_answer({'answer': 42})")
        assert final.is_final_answer and final.output == {"answer": 42}
        with pytest.raises(smolagents.utils.AgentError, match="ZeroDivisionError"):
            executor("1 / 0")
    finally:
        executor.cleanup()


def test_smolagents_code_agent_with_the_e2b_executor(server: Service) -> None:
    smolagents = pytest.importorskip("smolagents")
    from smolagents.models import ChatMessage, MessageRole, Model

    class Scripted(Model):  # type: ignore[misc]
        """A model that writes the same two steps every time (no network, no weights)."""

        def __init__(self) -> None:
            super().__init__(model_id="scripted")
            self.steps = iter(
                [
                    "Thought: compute.\n<code>\nvalue = sum(range(10))\nprint(value)\n</code>",
                    "Thought: done.\n<code>\nfinal_answer(value * 2)\n</code>",
                ]
            )

        def generate(self, messages: Any, **kwargs: Any) -> Any:
            return ChatMessage(role=MessageRole.ASSISTANT, content=next(self.steps))

    agent = smolagents.CodeAgent(tools=[], model=Scripted(), executor_type="e2b", verbosity_level=0)
    try:
        assert agent.run("What is twice the sum of 0..9?") == 90
    finally:
        agent.cleanup()


# -- approvals and static analysis, through the E2B surface --------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose default policy asks a person about code with findings of medium
    severity or above, and blocks high ones."""
    from .conftest import start_service, stop_service
    from .e2b_server import CONFIG

    where = tmp_path_factory.mktemp("e2b-guarded")
    config = where / "service.toml"
    policy = '[policy]\napproval_findings_at = "medium"\nanalysis_block_at = "high"\napproval_window_s = 30\n'
    config.write_text(CONFIG.replace("pool_size = 1\n", "pool_size = 0\n") + policy)
    service = start_service(where / "audit.db", ("alice",), config)
    try:
        yield service
    finally:
        stop_service(service)


def test_flagged_code_waits_for_a_person_and_blocked_code_never_runs(
    guarded: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .e2b_server import env_for, kill_all

    for name, value in env_for(guarded).items():
        monkeypatch.setenv(name, value)
    operator = codecage.connect(guarded.url, guarded.keys["alice"])
    sandbox = Sandbox.create(timeout=120)
    try:
        assert sandbox.run_code("1 + 1").text == "2"  # nothing found: nothing asked

        def answer(yes: bool) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for request in operator.approvals():
                    if yes:
                        operator.approve(request.id, "fine", "test")
                    else:
                        operator.deny(request.id, "not today", "test")
                    return
                time.sleep(0.1)

        lines: list[str] = []
        for yes, expected in ((True, None), (False, "ApprovalDenied")):
            helper = threading.Thread(target=answer, args=(yes,))
            helper.start()
            ex = sandbox.run_code(
                "import socket\nprint(socket.AF_INET > 0)", on_stdout=lambda m: lines.append(m.line)
            )
            helper.join()
            if expected is None:
                assert ex.error is None and ex.logs.stdout == ["True\n"]
            else:
                assert ex.error is not None and ex.error.name == expected
                assert "not today" in ex.error.value and ex.logs.stdout == []
        blocked = sandbox.run_code("import os\nos.system('echo ran')")
        assert blocked.error is not None and blocked.error.name in (
            "CodeRejected",
            "ApprovalDenied",
        )
    finally:
        sandbox.kill()
        operator.close()
        kill_all(guarded)


def test_the_async_sdk_streams_to_async_callbacks(server: Service) -> None:
    import asyncio

    from e2b_code_interpreter import AsyncSandbox

    async def main() -> tuple[list[str], str | None, list[str]]:
        sandbox = await AsyncSandbox.create(timeout=120)
        try:
            seen: list[str] = []

            async def on_stdout(message: Any) -> None:
                seen.append(message.line)

            ex = await sandbox.run_code("print('a')\nprint('b')\n6 * 7", on_stdout=on_stdout)
            ctx = await sandbox.create_code_context(language="bash")
            bash = await sandbox.run_code("echo $((6 * 7))", context=ctx)
            return seen, ex.text, bash.logs.stdout
        finally:
            await sandbox.kill()

    seen, text, bash = asyncio.run(main())
    assert "".join(seen) == "a\nb\n" and text == "42" and bash == ["42\n"]
