"""Code contexts, languages and structured results with codecage's own SDKs: the in-process
Sandbox and the remote one (codecage.connect) against a real `codecage serve`, on the
default backend (the kernel-side feature is the same on every backend)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import codecage
from codecage import ContextNotFound, Policy, Sandbox, UnsupportedLanguage

from .conftest import Service

pytestmark = [pytest.mark.slow, pytest.mark.requires_root]


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox(Policy(timeout_s=60, interrupt_grace_s=1)) as sandbox:
        yield sandbox


def test_contexts_hold_their_own_state_and_cwd(sbx: Sandbox) -> None:
    sbx.run_code("x = 'default'")
    a = sbx.create_code_context()
    b = sbx.create_code_context(cwd="/tmp")
    assert (a.language, a.cwd, b.cwd) == ("python", "/home/user", "/tmp")
    sbx.run_code("x = 'a'", context=a)
    sbx.run_code("import os; os.chdir('/'); x = 'b'", context=b.id)
    assert [sbx.run_code("x", context=c).text for c in (None, a, b)] == ["'default'", "'a'", "'b'"]
    assert sbx.run_code("import os; os.getcwd()").text == "'/home/user'"
    assert sbx.run_code("import os; os.getcwd()", context=b).text == "'/'"  # b keeps its own
    counts = [sbx.run_code("1", context=a).execution_count for _ in range(2)]
    assert counts[1] == counts[0] + 1
    assert [c.id for c in sbx.list_code_contexts()] == ["default", a.id, b.id]
    sbx.restart_code_context(a)
    assert sbx.run_code("x", context=a).error.name == "NameError"  # type: ignore[union-attr]
    assert sbx.run_code("x", context=b).text == "'b'"
    sbx.remove_code_context(a)
    with pytest.raises(ContextNotFound):
        sbx.run_code("1", context=a)
    with pytest.raises(ContextNotFound):
        sbx.remove_code_context(a)
    with pytest.raises(codecage.SandboxError, match="cannot be removed"):
        sbx.remove_code_context("default")
    with pytest.raises(codecage.FileNotFoundInSandbox):
        sbx.create_code_context(cwd="/no/such/place")


def test_bash_keeps_its_shell_state_and_streams(sbx: Sandbox) -> None:
    seen: list[str] = []
    first = sbx.run_code(
        'cd /tmp; N=3; f() { echo "f:$1"; }; for i in 1 2; do echo line$i; done',
        language="bash",
        on_stdout=lambda m: seen.append(m.line),
    )
    assert first.error is None and first.exit_code == 0 and "".join(seen) == "line1\nline2\n"
    again = sbx.run_code("echo $N; f x; pwd", language="bash")
    assert "".join(again.logs.stdout) == "3\nf:x\n/tmp\n"
    status = sbx.run_code("exit_with() { return $1; }; exit_with 3", language="bash")
    assert status.exit_code == 3 and status.error is not None
    assert status.error.name == "ExitCodeError"
    gone = sbx.run_code("exit 4", language="bash")  # the shell itself ends: a new one next
    assert gone.error is not None and gone.error.name == "BashExited"
    assert sbx.run_code("echo ${N:-fresh}", language="bash").logs.stdout == ["fresh\n"]
    # stdin is /dev/null: a read gets nothing, it never eats the next cell
    assert sbx.run_code('read v; echo "[$v]"', language="bash").logs.stdout == ["[]\n"]


def test_timeouts_in_bash_and_after_a_kernel_restart(sbx: Sandbox) -> None:
    sbx.run_code("KEEP=1", language="bash")
    slow = sbx.run_code("sleep 30", language="bash", timeout=1)
    assert slow.killed_by == "timeout" and not slow.state_lost  # interrupted, shell intact
    assert sbx.run_code("echo $KEEP", language="bash").logs.stdout == ["1\n"]
    ctx = sbx.create_code_context(language="bash", cwd="/tmp")
    stuck = sbx.run_code("trap '' INT; sleep 30", context=ctx, timeout=1)
    assert stuck.killed_by == "timeout" and stuck.state_lost  # killed, the kernel restarted
    # the context's id still works after the restart, empty, in its cwd
    after = sbx.run_code("pwd; echo ${KEEP:-none}", context=ctx)
    assert "".join(after.logs.stdout) == "/tmp\nnone\n"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]


def test_other_languages_are_refused_naming_the_supported_ones(sbx: Sandbox) -> None:
    for call in (
        lambda: sbx.run_code("1", language="javascript"),
        lambda: sbx.create_code_context(language="r"),
    ):
        with pytest.raises(UnsupportedLanguage, match="supported are python, bash"):
            call()
    with pytest.raises(codecage.SandboxError, match="not both"):
        sbx.run_code("1", language="python", context="default")


def test_charts_and_dataframes_come_as_structured_results(sbx: Sandbox) -> None:
    ex = sbx.run_code(
        "import matplotlib.pyplot as plt\nimport datetime\n"
        "plt.figure()\nd = [datetime.date(2024, 1, i) for i in (1, 2, 3)]\n"
        "plt.plot(d, [1.0, float('nan'), 3.0], label='v')\nplt.title('T')\nplt.show()"
    )
    chart = ex.results[0].chart
    assert ex.results[0].png and chart is not None and chart["type"] == "line"
    assert chart["x_scale"] == "datetime" and chart["title"] == "T"
    points = chart["elements"][0]["points"]
    assert points[0][0].startswith("2024-01-01") and points[1][1] is None  # NaN as null
    box = (
        sbx.run_code(
            "fig, ax = plt.subplots()\n"
            "ax.boxplot([[1, 2, 3, 4, 5, 20], [2, 3, 4]], patch_artist=True)\nplt.show()"
        )
        .results[0]
        .chart
    )
    assert box is not None and box["type"] == "box_and_whisker"
    assert [b["median"] for b in box["elements"]] == [3.5, 3.0]
    assert box["elements"][0]["outliers"] == [20.0]
    pie = sbx.run_code("plt.figure(); plt.pie([3, 1], labels=['a', 'b']); plt.show()").results[0]
    assert pie.chart is not None and [w["angle"] for w in pie.chart["elements"]] == [270, 90]
    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'n': [1, 2], 't': ['x', 'y']})")
    assert frame.results[0].data == {"n": [1, 2], "t": ["x", "y"]}
    big = sbx.run_code("pd.DataFrame({'n': range(1_000_000)})")  # past the bound: no data
    assert big.results[0].data is None and big.results[0].text


def test_the_remote_sdk_has_the_same_contexts(service: Service, alice: codecage.Client) -> None:
    with alice.Sandbox() as remote:
        ctx = remote.create_code_context(cwd="/tmp")
        remote.run_code("x = 1")
        assert remote.run_code("x", context=ctx).error.name == "NameError"  # type: ignore[union-attr]
        assert remote.run_code("pwd", language="bash").logs.stdout == ["/home/user\n"]
        assert [c.id for c in remote.list_code_contexts()][-1] == "default-bash"
        remote.restart_code_context(ctx)
        remote.remove_code_context(ctx.id)
        with pytest.raises(ContextNotFound):
            remote.run_code("1", context=ctx)
        with pytest.raises(UnsupportedLanguage):
            remote.run_code("1", language="cobol")
        with pytest.raises(ContextNotFound):
            remote.restart_code_context("nope")


def test_an_image_the_code_saves_is_also_a_result(sbx: Sandbox) -> None:
    ex = sbx.run_code(
        "from PIL import Image\nImage.new('RGB', (4, 4)).save('i.png')\n"
        "import matplotlib.pyplot as plt\nplt.figure(); plt.plot([1, 2]); plt.savefig('p.png')\n"
        "plt.close('all')"
    )
    assert ex.error is None and len([r for r in ex.results if r.png]) == 1  # PIL's, not savefig's
    assert sbx.files.exists("i.png") and sbx.files.exists("p.png")


def test_a_full_tmp_is_the_bash_cells_error_not_the_kernels_end() -> None:
    with Sandbox(Policy(tmp_mb=1, timeout_s=60)) as sbx:
        sbx.run_code("true", language="bash")  # the shell and its cell directory exist
        sbx.run_code("open('/tmp/fill', 'wb').write(b'x' * (2 << 20))")  # fills /tmp
        full = sbx.run_code("echo " + "x" * 200_000, language="bash")
        assert full.error is not None and full.error.name == "OSError"
        assert not full.state_lost and sbx.run_code("1 + 1").text == "2"  # the kernel lives
        sbx.run_code("import os; os.remove('/tmp/fill')")
        assert sbx.run_code("echo ok", language="bash").logs.stdout == ["ok\n"]
