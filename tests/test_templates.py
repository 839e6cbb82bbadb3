"""Custom templates (docs/templates.md) on the real jail: built offline from a wheelhouse of
wheels made here (no network at all), a preload that starts threads refused at build, a
sandbox of a template importing what the runtime lacks, the layer read-only inside, an
unknown name (the SDK, the HTTP API, E2B's SDK), the LRU of template processes, pools
per template."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import codecage
from codecage import Policy, Sandbox, Template, TemplateError, TemplateNotFound
from codecage._jail import layers
from codecage._jail.namespace import NamespaceJail
from codecage.testing.wheels import make_wheel

from .conftest import Service, cli, start_service, stop_service

THREADS = (
    "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
)


@pytest.fixture(scope="module")
def store() -> Iterator[dict[str, Path]]:
    """A template store and a wheelhouse of its own (outside /tmp, which the jail hides),
    CODECAGE_TEMPLATES pointing at it for the module; both removed after."""
    base = Path(f"/var/tmp/codecage-test-templates-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    house = base / "wheelhouse"
    house.mkdir(parents=True)
    make_wheel(house, "cctiny", "1.0", "VALUE = 42\n")
    make_wheel(house, "ccdep", "2.0", "NAME = 'dep'\n")
    # ccuses needs ccdep: a dependency the resolver must find in the wheelhouse
    make_wheel(house, "ccuses", "1.0", "import ccdep\nVALUE = ccdep.NAME\n", ("ccdep>=2",))
    make_wheel(house, "ccthreads", "1.0", THREADS)
    old = os.environ.get("CODECAGE_TEMPLATES")
    os.environ["CODECAGE_TEMPLATES"] = str(base / "store")
    try:
        yield {"house": house, "root": base / "store"}
    finally:
        if old is None:
            os.environ.pop("CODECAGE_TEMPLATES", None)
        else:
            os.environ["CODECAGE_TEMPLATES"] = old
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(store: dict[str, Path]) -> dict[str, object]:
    """Template `tiny`: cctiny preloaded, ccuses (and its dependency), an env default."""
    return (
        Template()
        .pip_install("cctiny", "ccuses")
        .preload("cctiny")
        .env(TINY_MODE="on")
        .build("tiny", offline=True, wheelhouse=store["house"])
    )


def test_offline_build_from_a_wheelhouse(store: dict[str, Path], tiny: dict[str, object]) -> None:
    assert tiny["name"] == "tiny"
    assert tiny["packages"] == ["ccdep==2.0", "cctiny==1.0", "ccuses==1.0"]
    layer = layers.resolve("tiny")
    assert layer.id == tiny["id"]
    assert (layer.site / "cctiny" / "__init__.py").exists()
    # only what the runtime lacks: not one of the runtime's packages is in the layer
    assert not (layer.site / "numpy").exists()
    # the same spec again is the same build (its id is the spec's and the wheels' hash)
    again = Template().pip_install("cctiny", "ccuses").preload("cctiny").env(TINY_MODE="on")
    assert again.build("tiny2", offline=True, wheelhouse=store["house"])["id"] == tiny["id"]
    assert {t["name"] for t in layers.listing()} >= {"tiny", "tiny2"}
    assert layers.remove("tiny2") == tiny["id"]
    assert layers.resolve("tiny").path.exists()  # still named by "tiny": kept


def test_offline_build_needs_a_wheelhouse_and_never_the_index(store: dict[str, Path]) -> None:
    empty = store["house"].parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(TemplateError, match="--offline needs a wheelhouse"):
        Template().pip_install("cctiny").build("x", offline=True, wheelhouse=empty)
    # a package that exists on PyPI but not in the wheelhouse: offline, never fetched
    with pytest.raises(TemplateError, match="pip install failed"):
        Template().pip_install("six").build("x", offline=True, wheelhouse=store["house"])
    with pytest.raises(TemplateNotFound):
        layers.resolve("x")


def test_a_preload_that_starts_threads_is_refused_at_build(store: dict[str, Path]) -> None:
    spec = Template().pip_install("ccthreads").preload("ccthreads")
    with pytest.raises(TemplateError, match=r"preload 'ccthreads' starts threads at import"):
        spec.build("threads", offline=True, wheelhouse=store["house"])
    with pytest.raises(TemplateNotFound):
        layers.resolve("threads")
    # positive control: the same package, not preloaded, builds (and imports lazily)
    made = (
        Template()
        .pip_install("ccthreads")
        .build("threads", offline=True, wheelhouse=store["house"])
    )
    assert made["packages"] == ["ccthreads==1.0"]
    layers.remove("threads")


def test_specs_are_validated() -> None:
    # the rule `pip install` in a sandbox uses (_wheelhouse.REQUIREMENT), spaces dropped
    assert Template().pip_install("numpy >= 1.0", "pandas[excel]>=2, <3").spec.pip == (
        "numpy>=1.0",
        "pandas[excel]>=2,<3",
    )
    for bad in ("--index-url=http://evil/", "./x.whl", "x @ file:///etc/shadow", "x; cat /y"):
        with pytest.raises(TemplateError, match="is not a requirement"):
            Template().pip_install(bad)
    with pytest.raises(TemplateError, match="cannot be a template's variable"):
        Template().env(LD_PRELOAD="/x.so")
    with pytest.raises(TemplateError, match="reserved"):
        Template().build("base")
    with pytest.raises(TemplateError, match="not a module name"):
        Template().preload("os; import x")


@pytest.mark.backends("namespace", "bwrap")
def test_a_sandbox_of_a_template_imports_what_the_runtime_lacks(
    backend: str, tiny: dict[str, object]
) -> None:
    with Sandbox(Policy(isolation=backend), template="tiny") as sbx:
        ran = sbx.run_code(
            "import ccuses, cctiny, os; (cctiny.VALUE, ccuses.VALUE, os.environ['TINY_MODE'])"
        )
        assert ran.error is None, ran.error
        assert ran.text == "(42, 'dep', 'on')"
        # a command's `python` finds the layer too
        out = sbx.commands.run("python -c 'import cctiny; print(cctiny.VALUE)'")
        assert out.stdout.strip() == "42", out
    # positive control: the base runtime has none of it
    with Sandbox(Policy(isolation=backend)) as sbx:
        ran = sbx.run_code("import cctiny")
        assert ran.error is not None and ran.error.name == "ModuleNotFoundError"


@pytest.mark.backends("namespace")
def test_the_namespace_template_preloads(backend: str, tiny: dict[str, object]) -> None:
    with Sandbox(Policy(isolation=backend), template="tiny") as sbx:
        assert sbx.run_code("import sys; 'cctiny' in sys.modules").text == "True"


@pytest.mark.requires_root
@pytest.mark.backends("namespace", "bwrap")
def test_the_layer_is_read_only_inside(backend: str, tiny: dict[str, object]) -> None:
    layer = layers.resolve("tiny")
    target = layer.site / "cctiny" / "planted.py"
    probe = (
        "import errno\n"
        "try:\n"
        f"    open({str(target)!r}, 'w').write('x = 1')\n"
        "    print('WROTE')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    with Sandbox(Policy(isolation=backend), template="tiny") as sbx:
        out = "".join(sbx.run_code(probe).logs.stdout).strip()
        assert out == "EROFS", out  # the read-only mount's answer, not a file's mode
    assert not target.exists()
    # positive control: the same write on the host, as root, succeeds
    target.write_text("x = 1\n")
    assert target.read_text() == "x = 1\n"
    target.unlink()


def test_an_unknown_template_is_a_clear_error(store: dict[str, Path]) -> None:
    with pytest.raises(TemplateNotFound, match=r"template 'no-such' not found"):
        Sandbox(template="no-such")
    with pytest.raises(codecage.PolicyError, match="template"):
        Sandbox(template="Not A Name!")


@pytest.mark.backends("gvisor", "container")
def test_other_backends_refuse_templates(backend: str, tiny: dict[str, object]) -> None:
    with pytest.raises(codecage.PolicyError, match="does not run custom templates"):
        Sandbox(Policy(isolation=backend, allow_weaker=True), template="tiny")


def test_template_processes_start_on_demand_and_idle_ones_stop(
    store: dict[str, Path], tiny: dict[str, object]
) -> None:
    other = Template().pip_install("cctiny").build("other", offline=True, wheelhouse=store["house"])
    jail = NamespaceJail(max_templates=1)
    try:
        assert not jail.custom  # none started before a sandbox asks for one
        first = jail.create(Policy(template="tiny"))
        tiny_process = jail.custom[str(tiny["id"])]
        second = jail.create(Policy(template="other"))
        # beyond max_templates, but the first is not idle (a sandbox of it lives): kept
        assert tiny_process.process.poll() is None
        assert set(jail.custom) == {tiny["id"], other["id"]}
        assert first.execute("import cctiny; cctiny.VALUE").text == "42"
        first.kill()
        second.kill()
        third = jail.create(Policy(template="other"))
        # now the least recently used one is idle: stopped
        assert tiny_process.process.wait(timeout=20) is not None
        assert set(jail.custom) == {other["id"]}
        third.kill()
        # and it starts again on demand
        fourth = jail.create(Policy(template="tiny"))
        assert fourth.execute("import cctiny; cctiny.VALUE").text == "42"
        fourth.kill()
    finally:
        jail.close()
        layers.remove("other")


def test_pools_belong_to_a_template(tiny: dict[str, object]) -> None:
    templated, plain = Policy(template="tiny"), Policy()
    with codecage.start_pool(1, templated) as pool:
        assert pool.wait_ready(60)
        with Sandbox(templated) as sbx:
            assert sbx.run_code("import cctiny; cctiny.VALUE").text == "42"
        assert pool.hits == 1
        with Sandbox(plain) as sbx:  # another template (the base): not from this pool
            assert sbx.run_code("import cctiny").error is not None
        assert pool.hits == 1


@pytest.fixture(scope="module")
def templated_service(
    store: dict[str, Path], tiny: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    where = tmp_path_factory.mktemp("templates")
    svc = start_service(
        where / "audit.db", ("alice", "bob"), env={"CODECAGE_TEMPLATES": str(store["root"])}
    )
    try:
        yield svc
    finally:
        stop_service(svc)


def test_the_http_api_and_the_remote_sdk(templated_service: Service) -> None:
    for tenant in ("alice", "bob"):  # the node's templates: any tenant's sandboxes may use them
        with (
            templated_service.client(tenant) as client,
            client.create(Policy(template="tiny")) as sbx,
        ):
            assert sbx.run_code("import cctiny; cctiny.VALUE").text == "42"
    headers = {"Authorization": f"Bearer {templated_service.keys['alice']}"}
    made = httpx.post(
        f"{templated_service.url}/v1/sandboxes", json={"template": "tiny"}, headers=headers
    )
    assert made.status_code == 201, made.text
    assert made.json()["policy"]["template"] == "tiny"
    httpx.delete(f"{templated_service.url}/v1/sandboxes/{made.json()['id']}", headers=headers)
    missing = httpx.post(
        f"{templated_service.url}/v1/sandboxes", json={"template": "no-such"}, headers=headers
    )
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["type"] == "TemplateNotFound"
    assert "template 'no-such' not found" in missing.json()["error"]["message"]
    for hostile in ("../../etc", "/var/lib/codecage/runtime", "tiny/../tiny", "x" * 65):
        refused = httpx.post(
            f"{templated_service.url}/v1/sandboxes", json={"template": hostile}, headers=headers
        )
        assert refused.status_code == 422, (hostile, refused.text)
        refused = httpx.post(
            f"{templated_service.url}/v1/sandboxes",
            json={"policy": {"template": hostile}},
            headers=headers,
        )
        assert refused.status_code == 422, (hostile, refused.text)


def test_e2b_create_from_a_template(
    templated_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b.exceptions import SandboxException
    from e2b_code_interpreter import Sandbox as E2BSandbox

    from .e2b_server import env_for, kill_all

    for name, value in env_for(templated_service).items():
        monkeypatch.setenv(name, value)
    try:
        sbx = E2BSandbox.create("tiny")
        try:
            assert sbx.run_code("import cctiny; cctiny.VALUE").text == "42"
        finally:
            sbx.kill()
        for unknown in ("no-such", "../../etc", "tiny/../tiny", "0123456789abcdef"):
            with pytest.raises(
                SandboxException, match=re.escape(f"template '{unknown}' not found")
            ):
                E2BSandbox.create(unknown)
    finally:
        assert kill_all(templated_service) == []


def test_the_cli_builds_lists_and_removes(store: dict[str, Path]) -> None:
    spec = store["house"].parent / "cli.toml"
    spec.write_text('name = "from-cli"\npip = ["cctiny"]\n[env]\nCLI_MODE = "yes"\n')
    house = str(store["house"])
    built = json.loads(
        cli("template", "build", str(spec), "--offline", "--wheelhouse", house, "--json")
    )
    assert built["name"] == "from-cli" and built["packages"] == ["cctiny==1.0"]
    listed = json.loads(cli("template", "list", "--json"))
    assert {"from-cli": built["id"]}.items() <= {t["name"]: t["id"] for t in listed}.items()
    assert cli("template", "rm", "from-cli") == f"from-cli: removed ({built['id']})"
    assert "from-cli" not in cli("template", "list")
    bad = subprocess.run(
        [sys.executable, "-m", "codecage", "template", "rm", "from-cli"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "template 'from-cli' not found" in bad.stderr
    spec.write_text('name = "x"\npip = ["cctiny"]\nunknown = 1\n')
    bad = subprocess.run(
        [sys.executable, "-m", "codecage", "template", "build", str(spec), "--offline",
         "--wheelhouse", str(store["house"])],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid template spec: unknown" in bad.stderr


@pytest.mark.requires_root
@pytest.mark.backends("namespace", "bwrap")
def test_a_plain_apt_package(backend: str, store: dict[str, Path]) -> None:
    """`tree` (one small .deb, its libraries the host's): fetched at build (the network:
    skipped where apt cannot reach its mirror), unpacked without scripts, on the PATH."""
    try:
        Template().apt_install("tree").build("apt-tree")
    except TemplateError as exc:
        if "apt-get download failed" in str(exc):
            pytest.skip(f"no apt mirror reachable: {exc}")
        raise
    assert (layers.resolve("apt-tree").path / "apt/usr/bin/tree").exists()
    try:
        with Sandbox(Policy(isolation=backend), template="apt-tree") as sbx:
            out = sbx.commands.run("tree --version")
            assert out.exit_code == 0 and "tree v" in out.stdout, out
        with Sandbox(Policy(isolation=backend)) as sbx:  # positive control: the base has none
            assert sbx.commands.run("tree --version").exit_code != 0
    finally:
        layers.remove("apt-tree")
