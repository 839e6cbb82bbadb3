"""`pip install` at run time without network (docs/packages.md): every form installs from
the operator's wheelhouse through the host, into the sandbox's workspace; the policy
refuses or asks; the audit log keeps what was handed in; a hostile request reads nothing of
the host outside the wheelhouse. On the real jail, on every backend of this host."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import codecage
from codecage import ApprovalDenied, PackageRefused, Sandbox, SandboxError
from codecage._approvals import ApprovalRequest, Decision
from codecage._jail.template import Runtime
from codecage.testing import policy
from codecage.testing.wheels import make_wheel

from .conftest import start_service, stop_service
from .e2b_server import env_for, kill_all

pytestmark = pytest.mark.requires_root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def house(tmp_path: Path) -> Path:
    """The operator's wheelhouse: tinypkg (needs tinydep), tinydep, and three more."""
    where = tmp_path / "wheelhouse"
    where.mkdir()
    make_wheel(where, "tinydep", "1.0", "VALUE = 41\n")
    make_wheel(where, "tinypkg", "2.0", "from tinydep import VALUE\nANSWER = VALUE + 1\n", ("tinydep>=1",))  # fmt: skip
    for name in ("percentpkg", "shellpkg", "bgpkg"):
        make_wheel(where, name, "0.1", f"NAME = {name!r}\n")
    return where


VERSIONS = {"tinypkg": "2.0", "percentpkg": "0.1", "shellpkg": "0.1", "bgpkg": "0.1"}


def _install(sbx: Sandbox, form: str) -> str:
    """Install one package of the house in `form`, import it in the sandbox; its name."""
    if form == "!pip":  # then an import in the same cell; the dependency comes with it
        ex = sbx.run_code(
            "!pip install tinypkg\nimport tinypkg\nprint(tinypkg.ANSWER, tinypkg.__file__)"
        )
        assert ex.error is None, ex
        out = "".join(ex.logs.stdout)
        assert "42 /home/user/.local/lib/python" in out and "Successfully installed" in out, out
        return "tinypkg"
    if form == "%pip":
        ex = sbx.run_code("%pip install percentpkg\nimport percentpkg\nprint(percentpkg.NAME)")
        assert ex.error is None and "percentpkg\n" in ex.logs.stdout[-1], ex
        return "percentpkg"
    if form == "command":
        result = sbx.commands.run(
            "pip install shellpkg && python -c 'import shellpkg; print(shellpkg.NAME)'"
        )
        assert result.exit_code == 0 and result.stdout.endswith("shellpkg\n"), result
        return "shellpkg"
    # a background command runs in a login shell, whose /etc/profile resets PATH (on the
    # OCI images no `python` is left on it): the runtime's interpreter by its path
    handle = sbx.commands.run(f"{Runtime.default().python} -m pip install bgpkg", background=True)
    assert handle.wait().exit_code == 0
    assert sbx.run_code("import bgpkg\nbgpkg.NAME").text == "'bgpkg'"
    return "bgpkg"


# Each form in a sandbox of its own: on the backends other than the default, one form each
# (tests/conftest.py), every form with CODECAGE_FULL_MATRIX=1.
@pytest.mark.parametrize("form", ["!pip", "%pip", "command", "background"])
def test_every_form_of_pip_install_installs_from_the_wheelhouse(
    backend: str, house: Path, form: str
) -> None:
    with Sandbox(policy(timeout_s=120), wheelhouse=house) as sbx:
        name = _install(sbx, form)
        # installed in the workspace: the shared runtime is read-only and untouched
        where = sbx.run_code(f"import {name}\n{name}.__file__").text
        assert where.startswith("'/home/user/.local/"), where
        ex = sbx.run_code(f"open({str(Runtime.default().site_packages / 'x')!r}, 'w')")
        assert ex.error is not None and ex.error.name in ("OSError", "PermissionError"), ex
        # again: installed already, nothing handed in twice, and pip says so offline
        again = sbx.commands.run(f"pip install {name}")
        assert again.exit_code == 0 and "already satisfied" in again.stdout, again
        records = {r["name"]: r for r in sbx.packages}
    assert sorted(records) == sorted([name, "tinydep"] if name == "tinypkg" else [name])
    for record in records.values():  # what the host read from the wheelhouse
        assert record["sha256"] == sha256(house / record["wheel"])
    assert records[name]["requested"] and records[name]["version"] == VERSIONS[name]
    if name == "tinypkg":  # the dependency came with it, not asked for
        assert not records["tinydep"]["requested"] and records["tinydep"]["version"] == "1.0"
    assert not (Runtime.default().site_packages / name).exists()


@pytest.mark.backends("namespace")  # host-side policy: the same on every backend
def test_packages_the_runtime_has_need_no_wheelhouse_and_no_network(
    backend: str, tmp_path: Path
) -> None:
    # smolagents' E2B executor starts so; the wheelhouse does not even exist here
    with Sandbox(policy(timeout_s=120), wheelhouse=tmp_path / "none") as sbx:
        ex = sbx.run_code("!pip install pillow numpy\nimport PIL, numpy\nprint('ok')")
        assert ex.error is None and ex.logs.stdout[-1] == "ok\n", ex
        assert "already satisfied: pillow" in "".join(ex.logs.stdout)
        assert sbx.packages == []


@pytest.mark.backends("namespace")  # host-side policy: the same on every backend
def test_a_package_not_in_the_wheelhouse_is_a_clear_error(backend: str, house: Path) -> None:
    with Sandbox(policy(timeout_s=120), wheelhouse=house) as sbx:
        with pytest.raises(PackageRefused, match="nosuchpkg: not available from the operator"):
            sbx.run_code("print('ran')\n!pip install nosuchpkg")
        with pytest.raises(PackageRefused, match="nosuchpkg"):
            sbx.commands.run("pip install -q nosuchpkg")
        # pip run where the host does not look (from Python) finds nothing, and tries no index
        pip = (
            "import os, subprocess, sys\n"
            "def pip(*args, **env):\n"
            "    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}\n"
            "    p = subprocess.run([sys.executable, '-m', 'pip', 'install', *args],"
            " capture_output=True, text=True, env=env)\n"
            "    return p.stdout + p.stderr\n"
        )
        out = sbx.run_code(pip + "pip('--index-url', 'http://192.0.2.1/simple', 'nosuchpkg')").text
        assert "No matching distribution found for nosuchpkg" in out, out
        assert "Looking in indexes" not in out, out
        # positive control: without PIP_NO_INDEX, pip would look there; and the jail has
        # no network to look with (the boundary)
        control = "pip('--index-url', 'http://192.0.2.1/simple', 'nosuchpkg', PIP_NO_INDEX=None)"
        out = sbx.run_code(control).text
        assert "Looking in indexes: http://192.0.2.1/simple" in out, out
        ex = sbx.run_code("import socket\nsocket.create_connection(('192.0.2.1', 80), 2)")
        assert ex.error is not None and ex.error.name == "OSError", ex
        assert any(w in ex.error.value for w in ("unreachable", "No route to host")), ex
        assert sbx.packages == [] and sbx.run_code("1 + 1").text == "2"


@pytest.mark.backends("namespace")  # host-side policy: the same on every backend
def test_the_policy_refuses_packages_it_does_not_allow(backend: str, house: Path) -> None:
    with Sandbox(policy(timeout_s=120, packages_allow=("tinydep",)), wheelhouse=house) as sbx:
        with pytest.raises(PackageRefused, match="tinypkg: not allowed by the policy"):
            sbx.run_code("!pip install tinypkg")
        with pytest.raises(PackageRefused, match="not allowed"):
            sbx.commands.run("pip install shellpkg", background=True)
        assert sbx.packages == []
        ex = sbx.run_code("!pip install tinydep\nimport tinydep\nprint(tinydep.VALUE)")
        assert ex.error is None and ex.logs.stdout[-1] == "41\n", ex
        assert [r["name"] for r in sbx.packages] == ["tinydep"]
        # what the runtime has is not the policy's business (nothing is handed in)
        assert sbx.run_code("!pip install numpy").error is None


@pytest.mark.backends("namespace")  # host-side policy: the same on every backend
def test_an_approval_policy_waits_for_a_yes(backend: str, house: Path) -> None:
    asked: list[ApprovalRequest] = []

    def approver(request: ApprovalRequest) -> Decision:
        asked.append(request)
        return Decision("percentpkg" not in request.subject, "operator", "reviewed")

    rules = policy(timeout_s=120, approval_packages=True, approval_window_s=30)
    with Sandbox(rules, approver=approver, wheelhouse=house) as sbx:
        ex = sbx.run_code("!pip install tinypkg\nimport tinypkg\nprint(tinypkg.ANSWER)")
        assert ex.error is None and ex.logs.stdout[-1] == "42\n", ex
        assert [r.kind for r in asked] == ["packages"]
        assert "tinypkg==2.0" in asked[0].subject and "tinydep==1.0" in asked[0].subject
        with pytest.raises(ApprovalDenied, match="denied by operator"):
            sbx.run_code("%pip install percentpkg")
        assert sorted(r["name"] for r in sbx.packages) == ["tinydep", "tinypkg"]
        assert sbx.run_code("!pip install tinypkg").error is None  # nothing new: no question
        assert len(asked) == 2
        assert sbx.run_code("import percentpkg").error.name == "ModuleNotFoundError"


def test_an_unanswered_package_approval_waits_then_is_a_no(house: Path) -> None:
    rules = policy(timeout_s=120, approval_packages=True, approval_window_s=20)
    with Sandbox(rules, wheelhouse=house) as sbx:
        seen: list[list[ApprovalRequest]] = []

        def answer() -> None:  # a person answers through the broker, as `approvals` does
            for _ in range(200):
                pending = codecage.approvals.pending()
                if pending:
                    seen.append(pending)
                    codecage.approvals.decide(pending[0].id, True, "carol")
                    return
                threading.Event().wait(0.05)

        thread = threading.Thread(target=answer)
        thread.start()
        assert sbx.commands.run("pip install shellpkg").exit_code == 0
        thread.join()
        assert seen and seen[0][0].kind == "packages" and seen[0][0].sandbox_id == sbx.id


# -- hostile requests ------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A wheel outside the wheelhouse, the host's: the host can read it (the control)."""
    where = tmp_path / "secret"
    where.mkdir()
    wheel = make_wheel(where, "evilpkg", "1.0", "SECRET = 'host-only-7c1e'\n")
    assert b"host-only-7c1e" in zipfile.ZipFile(wheel).read("evilpkg/__init__.py")
    return wheel


# Requests that name a place (pip runs in the sandbox, on its own file system), and requests
# the host must refuse (a link out of the wheelhouse, markers, floods): on the backends other
# than the default, one of the two each (tests/conftest.py).
@pytest.mark.parametrize("kind", ["places", "refused"])
def test_a_hostile_request_reads_nothing_outside_the_wheelhouse(
    backend: str, house: Path, secret: Path, kind: str
) -> None:
    (house / "evilpkg-1.0-py3-none-any.whl").symlink_to(secret)  # a link out of it
    with Sandbox(policy(timeout_s=120), wheelhouse=house) as sbx:
        relative = f"../{secret.parent.name}/{secret.name}"
        places = (
            f"!pip install {secret}",  # a path: the sandbox's own file system, not the host's
            f"!pip install {relative}",
            f"!pip install 'evilpkg @ file://{secret}'",
            f"!pip install -f {secret.parent} evilpkg",
            f"!pip install --find-links={secret.parent} --index-url=file://{secret.parent} evilpkg",
            "!pip install 'evilpkg;cat /etc/shadow'",
        )
        for cell in places if kind == "places" else ():
            try:
                ex = sbx.run_code(cell + "\nimport evilpkg\nprint(evilpkg.SECRET)")
            except PackageRefused:
                continue
            assert ex.error is not None and "host-only" not in "".join(ex.logs.stdout), cell
        refused = ("!pip install evilpkg", "!pip install \"evilpkg; python_version>'3'\"")
        for cell in refused if kind == "refused" else ():
            with pytest.raises(PackageRefused):
                sbx.run_code(cell)
        if kind == "refused":
            with pytest.raises(PackageRefused, match="more than 64"):
                sbx.run_code("!pip install " + " ".join(f"p{i}" for i in range(10_000)))
            with pytest.raises(PackageRefused, match="not a package"):
                sbx.run_code("!pip install " + "a" * 100_000)
        assert sbx.packages == []
        assert sbx.run_code("import evilpkg").error.name == "ModuleNotFoundError"
    # positive control: from a wheelhouse that holds it, the same wheel installs
    with Sandbox(policy(timeout_s=120), wheelhouse=secret.parent) as sbx:
        ex = sbx.run_code("!pip install evilpkg\nimport evilpkg\nprint(evilpkg.SECRET)")
        assert ex.logs.stdout[-1] == "host-only-7c1e\n", ex


def test_a_forged_reply_to_the_hand_in_is_an_error_not_a_record(house: Path) -> None:
    with Sandbox(policy(timeout_s=120), wheelhouse=house) as sbx:
        # the code shares the kernel's process: it answers the host's writes with lies
        sbx.run_code(
            "import sys\nk = sys.modules['codecage._inside.kernel']\n"
            "k.HANDLERS['write'] = lambda self, request: self.done(request, "
            "{'path': '/etc/shadow', 'size': 'huge', 'entry': {'name': 1}})"
        )
        with pytest.raises(SandboxError):
            sbx.run_code("!pip install tinydep")
        assert sbx.packages == []


# -- the service: the audit log -------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, house: Path) -> Iterator[Any]:
    config = tmp_path / "service.toml"
    config.write_text(f'wheelhouse = "{house}"\npool_size = 0\n')
    svc = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        yield svc
    finally:
        stop_service(svc)


def test_the_audit_log_records_what_was_installed(served: Any, house: Path) -> None:
    with served.client("alice") as alice, alice.Sandbox(codecage.Policy(timeout_s=120)) as sbx:
        ex = sbx.run_code("!pip install tinypkg\nimport tinypkg\nprint(tinypkg.ANSWER)")
        assert ex.error is None and ex.logs.stdout[-1] == "42\n", ex
        result = sbx.commands.run("pip install shellpkg")
        assert result.exit_code == 0, result
        assert sbx.commands.run("pip install bgpkg", background=True).wait().exit_code == 0
        with pytest.raises(PackageRefused, match="nosuchpkg"):
            sbx.run_code("!pip install nosuchpkg")
        sandbox_id = sbx.id
    conn = sqlite3.connect(served.db)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM packages ORDER BY rowid")]
        runs = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    finally:
        conn.close()
    assert [r["name"] for r in rows] == ["tinypkg", "tinydep", "shellpkg", "bgpkg"]
    for row in rows:
        assert row["tenant"] == "alice" and row["sandbox_id"] == sandbox_id
        assert row["sha256"] == sha256(house / row["wheel"]) and row["size"] > 0
        assert runs[row["run_id"]]["sandbox_id"] == sandbox_id
    kinds = [runs[r["run_id"]]["kind"] for r in rows]
    assert kinds == ["execute", "execute", "command", "process"]
    refused = [r for r in runs.values() if r["error_name"] == "PackageRefused"]
    assert len(refused) == 1 and refused[0]["outcome"] == "failed"


def test_e2b_sdks_install_from_the_wheelhouse(
    served: Any, house: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e2b_ci = pytest.importorskip("e2b_code_interpreter")
    for name, value in env_for(served).items():
        monkeypatch.setenv(name, value)
    for name in ("E2B_DEBUG", "E2B_ACCESS_TOKEN", "E2B_DOMAIN", "E2B_HTTP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    sandbox = e2b_ci.Sandbox.create(timeout=120)
    try:
        ex = sandbox.run_code("!pip install tinypkg\nimport tinypkg\nprint(tinypkg.ANSWER)")
        assert ex.error is None and ex.logs.stdout[-1] == "42\n", ex
        done = sandbox.commands.run("pip install shellpkg", timeout=120)
        assert done.exit_code == 0, done
        refused = sandbox.run_code("!pip install nosuchpkg")
        assert refused.error is not None and refused.error.name == "PackageRefused", refused
    finally:
        sandbox.kill()
    assert kill_all(served) == []
    conn = sqlite3.connect(served.db)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM packages ORDER BY rowid")]
    finally:
        conn.close()
    assert names == ["tinypkg", "tinydep", "shellpkg"]
