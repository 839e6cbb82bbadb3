"""The service is an extra: `pip install codecage` (the SDK and the remote client) brings no
web server, the SDK never imports the service, and `codecage serve` without the extra says
which extra to install."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codecage._cli.main import SERVICE_MODULES, require_service

SRC = Path(__file__).resolve().parent.parent / "src" / "codecage"
# Everything only the service may import (and starlette, which comes with fastapi).
SERVICE_ONLY = (*SERVICE_MODULES, "starlette")

SDK_SESSION = """
import json, sys, asyncio
BLOCK = {block!r}
for name in BLOCK:
    sys.modules[name] = None  # an import of it raises ImportError: as if not installed
import codecage
from codecage import AsyncSandbox, Policy, Sandbox, run
with Sandbox(Policy(memory_mb=256)) as sbx:
    assert sbx.run_code("x = 20").error is None
    assert sbx.run_code("x * 2 + 2").text == "42"
assert run("print(6 * 7)").logs.stdout == ["42\\n"]
async def main():
    async with await AsyncSandbox.create() as sbx:
        return (await sbx.run_code("1 + 1")).text
assert asyncio.run(main()) == "2"
codecage.connect("http://127.0.0.1:9", "no-key").close()  # the remote client: httpx only
import codecage.tools
{after}
print(json.dumps(sorted(m for m in sys.modules if sys.modules[m] is not None
                        and m.split(".")[0] in {watch!r})))
"""


def session(block: tuple[str, ...] = (), after: str = "") -> list[str]:
    code = SDK_SESSION.format(block=block, after=after, watch=SERVICE_ONLY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.requires_root
def test_the_sdk_never_imports_the_service() -> None:
    assert session() == []
    # The control: the same check sees the service's modules once something imports them.
    seen = session(after=f"import codecage._service.app, {', '.join(SERVICE_ONLY)}")
    assert {m.split(".")[0] for m in seen} == set(SERVICE_ONLY)


@pytest.mark.requires_root
def test_the_sdk_works_without_the_service_installed() -> None:
    assert session(block=SERVICE_ONLY) == []


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _requirements(dist: str, extra: str | None = None) -> set[str]:
    """The distributions `dist` requires: its core ones, or those of one extra."""
    out = set()
    for req in importlib.metadata.requires(dist) or []:
        marker = re.search(r'extra\s*==\s*"([^"]+)"', req)
        if (marker.group(1) if marker else None) == extra:
            out.add(_name(req))
    return out


def _closure(dists: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(dists)
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += _requirements(dist)  # not installed: a marker for another platform
    return seen


def test_pip_install_codecage_brings_no_web_server() -> None:
    core = _closure(_requirements("codecage"))
    assert {"pydantic", "httpx"} <= core  # the SDK's and the remote client's
    web = {"fastapi", "uvicorn", "starlette", "httptools", "uvloop", "prometheus-client"}
    assert core.isdisjoint(web), core & web
    assert web - {"starlette"} <= _requirements("codecage", "service")


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "codecage"}


def test_the_extra_brings_everything_the_service_imports() -> None:
    """Each module the service's files import comes from the core requirements or the
    service extra (with their own requirements), never only from a dev dependency."""
    provides = importlib.metadata.packages_distributions()
    installed = _closure(_requirements("codecage") | _requirements("codecage", "service"))
    service_files = sorted((SRC / "_service").glob("*.py"))
    imported = set().union(*(_third_party_imports(f) for f in service_files))
    assert {"fastapi", "uvicorn", "python_multipart", "prometheus_client"} <= imported
    for module in imported:
        dists = {_name(d) for d in provides.get(module, [])}
        assert dists & installed, f"{module} ({dists}) is in neither core nor [service]"
    for module in SERVICE_MODULES:  # and require_service() checks what the extra brings
        assert {_name(d) for d in provides[module]} & _requirements("codecage", "service")


@pytest.mark.parametrize("command", ["serve", "openapi"])
@pytest.mark.parametrize("missing", SERVICE_MODULES)
def test_serve_without_the_extra_names_it(command: str, missing: str) -> None:
    require_service()  # the control: here the extra is installed
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from codecage._cli import main\n"
        f"sys.exit(main([{command!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "pip install 'codecage[service]'" in out.stderr and missing in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
