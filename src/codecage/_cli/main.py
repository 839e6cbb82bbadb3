"""The `codecage` command: its parser and one `cmd_*` function per subcommand (run, shell,
serve, mcp, keys, audit, approvals, agent, openapi, image, template, doctor)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .._errors import SandboxError
from .._policy import Policy
from .prompt import FILTERED_NOTICE, terminal_approver
from .terminal import changed, clean, for_stream

if TYPE_CHECKING:
    from .._remote import Client


def _writer(stream: TextIO) -> Any:
    def write(text: str) -> None:
        stream.write(for_stream(stream, text))
        stream.flush()

    return write


def load_policy(args: argparse.Namespace) -> Policy:
    policy = Policy.from_toml(args.config) if args.config else Policy()
    return policy.with_overrides(args.set or [])


def cmd_run(args: argparse.Namespace) -> int:
    from .._api import run

    policy = load_policy(args)
    if args.code is not None:
        code: str | bytes = args.code
    elif args.file == "-":
        code = sys.stdin.buffer.read()
    elif args.file:
        try:
            code = Path(args.file).read_bytes()
        except OSError as exc:
            raise SandboxError(f"cannot read {args.file}: {exc.strerror}") from None
    else:
        raise SandboxError("give a FILE, '-' for standard input, or -c CODE")
    out, err = _writer(sys.stdout), _writer(sys.stderr)

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            return
        if event.get("ev") == "stdout":
            out(str(event.get("text", "")))
        elif event.get("ev") == "stderr":
            err(str(event.get("text", "")))

    ex = run(code, policy, on_event=on_event, approver=terminal_approver)
    if not args.json:
        for finding in ex.findings:
            err(f"codecage: static analysis: {finding}\n")
    if args.json:
        print(json.dumps(ex.to_dict(), indent=2))
    else:
        if ex.error is not None:
            err(
                ex.error.traceback if ex.error.traceback else f"{ex.error.name}: {ex.error.value}\n"
            )
        if ex.killed_by:
            err(f"codecage: killed by {ex.killed_by} after {ex.duration_ms:.0f} ms\n")
        elif ex.truncated:
            err(f"codecage: output cut at {policy.output_bytes} bytes\n")
    return ex.exit_code if ex.exit_code is not None else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import checks

    worst = 0
    for check in checks():
        print(check.line())
        if check.status == "missing" and check.required:
            worst = 1
    return worst


def cmd_shell(args: argparse.Namespace) -> int:
    from .shell import run_shell

    return run_shell(load_policy(args), Path(args.images))


# What the service imports that the SDK does not: the `service` extra (pyproject.toml).
SERVICE_MODULES = (
    "fastapi",
    "uvicorn",
    "httptools",
    "uvloop",
    "prometheus_client",
    "python_multipart",
    "jinja2",
)


def require_service() -> None:
    """The service's dependencies are an extra: say which to install, not a traceback."""
    import importlib

    missing = []
    for module in SERVICE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SandboxError(
            "the HTTP service needs the service extra: pip install 'codecage[service]' "
            f"(missing: {', '.join(missing)})"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    require_service()
    from .._service.app import serve
    from .._service.config import ServerConfig
    from .._service.db import redacted

    address, db = args.cluster, args.db
    if address == "local":  # the cluster `codecage cluster up` started on this machine
        from .._cluster import local

        running = local.load(args.cluster_dir)
        if running is None:
            print(
                f"codecage: no cluster in {args.cluster_dir}: codecage cluster up", file=sys.stderr
            )
            return 2
        os.environ.update(running.env())
        address, db = running.address, db or running.db
    config = ServerConfig.load(args.config, host=args.host, port=args.port, db=db)
    where = f"the cluster at {address}, " if address else ""
    print(
        f"codecage: serving on http://{config.host}:{config.port}"
        f" ({where}audit log {redacted(config.db)})",
        file=sys.stderr,
    )
    if address:
        from .._cluster.frontend import serve as serve_front

        serve_front(config, address)
        return 0
    serve(config)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from .._cluster import local

    def say(text: str) -> None:
        print(f"codecage cluster: {text}", file=sys.stderr)

    if args.cluster_action == "up":
        running = local.up(args.nodes, args.dir, progress=say)
        print(json.dumps({"address": running.address, "nodes": running.nodes,
                          "serve": f"codecage serve --cluster local --cluster-dir {running.directory}"}))  # fmt: skip
        return 0
    if args.cluster_action == "down":
        stopped = local.down(args.dir, progress=say)
        say("stopped" if stopped else f"no cluster in {args.dir}")
        return 0
    found = local.load(args.dir)
    if found is None:
        say(f"no cluster in {args.dir}")
        return 1
    print(
        json.dumps(
            {
                "address": found.address,
                "nodes": found.nodes,
                "raylets": len(local.raylets(args.dir)),
            }
        )
    )
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from ..mcp_server import serve
    except ImportError as exc:
        raise SandboxError(
            f"the MCP server needs the mcp extra (pip install 'codecage[mcp]'): {exc}"
        ) from None

    policy = load_policy(args)
    if args.transport == "http":
        where = f"http://{args.host}:{args.port}/mcp"
        print(f"codecage: MCP over streamable HTTP on {where}", file=sys.stderr, flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                "codecage: warning: the MCP endpoint has no authentication; anyone who reaches "
                "it can run code (see docs/mcp.md)",
                file=sys.stderr,
                flush=True,
            )
    if args.max_sandboxes < 1:
        raise SandboxError("--max-sandboxes must be at least 1")
    serve(policy, args.transport, args.host, args.port, args.max_sandboxes)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import secrets

    from .._service.audit import AuditLog
    from .._service.config import ServerConfig

    config = ServerConfig.load(args.config, db=args.db)
    key = "cc_" + secrets.token_urlsafe(32)
    log = AuditLog(config.db)
    try:
        log.add_key(key, args.tenant, args.role)
    finally:
        log.close()
    print(key)  # shown once; only its hash is stored
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import time as _time

    from .._service.config import ServerConfig

    config = ServerConfig.load(args.config, db=args.db)
    log = config.open_audit()
    tty = sys.stdout.isatty()

    def show(text: str) -> str:
        return clean(text) if tty else text  # the one terminal filter (codecage._cli.terminal)

    try:
        if args.action == "show":
            run = log.run(args.run_id)
            if run is None:
                raise SandboxError(f"no run {args.run_id!r}")
            for key, value in run.items():
                print(show(f"{key}: {value}"))
            return 0
        if args.action == "prune":
            return _prune(log, config.audit_retention_days, args)
        filters = {
            "tenant": args.tenant,
            "sandbox_id": args.sandbox,
            "outcome": args.outcome,
            "since": _when(args.since),
            "until": _when(args.until),
        }
        last = args.after
        limit = args.limit if args.action == "list" else 0
        shown = 0
        while True:
            for row in log.iter_runs(after_rowid=last, **filters):  # a page at a time
                if limit and shown == limit:
                    print(
                        f"codecage: stopped after {limit} runs; more with --after {last}"
                        " (or --limit 0 for all)",
                        file=sys.stderr,
                    )
                    return 0
                last, shown = row["rowid"], shown + 1
                if args.action == "export":
                    print(json.dumps(row))
                else:
                    print(show(_list_line(row)))
            if args.action != "tail":
                return 0
            sys.stdout.flush()
            _time.sleep(0.5)
    finally:
        log.close()


def _list_line(row: dict[str, Any]) -> str:
    import time as _time

    when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(row["started_at"]))
    first = (row["code"] or "").splitlines()[0][:60] if row["code"] else ""
    cell = f"{row.get('language') or '-'}/{row.get('context_id') or '-'}"[:24]
    return (
        f"{when} {row['id'][:12]} {row['tenant']:<12} {row['kind']:<13} {row['status']:<11}"
        f" {row['outcome'] or '-':<8} {row['killed_by'] or '-':<12} {cell:<16}"
        f" {(row.get('node') or '-')[:16]:<16} {first}"
    )


def _prune(log: Any, default_days: float | None, args: argparse.Namespace) -> int:
    """Delete finished runs older than --older-than (else the config's retention)."""
    import time as _time

    if args.older_than is not None:
        age = _duration(args.older_than)
    elif default_days is not None:
        age = default_days * 86400
    else:
        raise SandboxError("audit prune: give --older-than (e.g. 30d) or audit_retention_days")
    deleted = log.prune(_time.time() - age)
    if args.vacuum:
        log.vacuum()
    print(
        f"codecage: deleted {deleted} runs started over {args.older_than or default_days}"
        f"{'' if args.older_than else ' days'} ago",
        file=sys.stderr,
    )
    return 0


def _duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "12h", "30d" or "2w"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise SandboxError(f"not a duration: {text!r} (e.g. 30d, 12h, 90s)") from None
    if not value >= 0:
        raise SandboxError(f"not a duration: {text!r}")
    return value


def _when(value: str | None) -> float | None:
    """A Unix time, or an ISO date/time."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        from datetime import datetime

        return datetime.fromisoformat(value).timestamp()


def _listing(
    found: list[dict[str, Any]], as_json: bool, what: str, row: Callable[[dict[str, Any]], str]
) -> None:
    """A `list` action's output: the JSON as it came, or a line each (`row`), or "no WHAT"."""
    if as_json:
        print(json.dumps(found, indent=2))
    elif not found:
        print(f"no {what}")
    else:
        for each in found:
            print(clean(row(each)))


def _service_client(args: argparse.Namespace) -> Client:
    """A client of the running service `--url`/`--key` (or CODECAGE_URL, CODECAGE_API_KEY)."""
    import os

    from .._remote import connect

    url = args.url or os.environ.get("CODECAGE_URL")
    key = args.key or os.environ.get("CODECAGE_API_KEY")
    if not url or not key:
        raise SandboxError("give --url and --key (or set CODECAGE_URL and CODECAGE_API_KEY)")
    return connect(url, key)


def cmd_approvals(args: argparse.Namespace) -> int:
    """Pending approvals of a running service: list, approve, deny (over its HTTP API)."""
    import os
    import time as _time

    with _service_client(args) as client:
        if args.action == "list":
            pending = client.approvals()
            if args.json:
                print(json.dumps([r.to_dict() for r in pending], indent=2))
                return 0
            if not pending:
                print("no pending approvals")
            for request in pending:
                left = max(0.0, request.expires_at - _time.time())
                lines = request.subject.splitlines() or [""]
                first = lines[0][:60]
                if len(lines) > 1 or len(lines[0]) > 60:  # never hide what follows
                    first += f" [... {len(request.subject)} chars, {len(lines)} lines: see 'show']"
                print(clean(f"{request.id}  {request.kind:<9} {left:5.0f}s left  {first}"))
                for reason in request.reasons:
                    print(clean(f"    {reason}"))
                if changed(request.subject) or any(changed(r) for r in request.reasons):
                    print(FILTERED_NOTICE, end="")
            return 0
        if not args.approval_id:
            raise SandboxError(
                f"approvals {args.action}: give the approval id (see 'approvals list')"
            )
        if args.action == "show":
            found = [r for r in client.approvals() if r.id == args.approval_id]
            if not found:
                raise SandboxError(f"no pending approval {args.approval_id!r}")
            request = found[0]
            print(clean(f"approval {request.id}: {request.kind}, sandbox {request.sandbox_id}"))
            for reason in request.reasons:
                print(clean(f"  - {reason}"))
            if changed(request.subject) or any(changed(r) for r in request.reasons):
                print(FILTERED_NOTICE, end="")
            print("--- subject, in full ---")
            print(clean(request.subject))
            print("---")
            return 0
        by = args.by or os.environ.get("USER") or "cli"
        decide = client.approve if args.action == "approve" else client.deny
        decision = decide(args.approval_id, args.reason or "", by)
        verdict = "approved" if decision.approved else "denied"
        print(f"{args.approval_id}: {verdict} by {decision.by}")
        return 0


def cmd_sandboxes(args: argparse.Namespace) -> int:
    """A running service's sandboxes of the key's tenant: list, pause, resume, fork, kill."""
    from .._remote import segment

    with _service_client(args) as client:
        if args.action == "list":
            found = client.request("GET", "/v1/sandboxes").json()
            _listing(
                found,
                args.json,
                "sandboxes",
                lambda each: f"{each['id']}  {each['state']:<8} created {each['created_at']:.0f}",
            )
            return 0
        if not args.sandbox_id:
            raise SandboxError(
                f"sandboxes {args.action}: give the sandbox id (see 'sandboxes list')"
            )
        path = f"/v1/sandboxes/{segment(args.sandbox_id)}"
        if args.action == "fork":
            made = client.request("POST", f"{path}/fork", json={"count": args.count}).json()
            for each in made:
                print(f"{each['id']}: forked from {args.sandbox_id}")
            return 0
        if args.action == "kill":
            client.request("DELETE", path)
            print(f"{args.sandbox_id}: killed")
            return 0
        state = client.request("POST", f"{path}/{args.action}").json()["state"]
        print(f"{args.sandbox_id}: {state}")
        return 0


def cmd_volume(args: argparse.Namespace) -> int:
    """Volumes (docs/volumes.md): create, list, delete, export, import, check. Of a running
    service's tenant with --url/--key (or CODECAGE_URL), else of this host's local store
    (--dir, CODECAGE_VOLUME_DIR or /var/lib/codecage/volumes), which the SDK uses."""
    import contextlib
    import os
    import sys

    from .._volumes import Volumes

    remote = bool(args.url or os.environ.get("CODECAGE_URL"))
    if args.action != "list" and not args.name:
        raise SandboxError(f"volume {args.action}: give the volume's name")
    if remote:
        client = _service_client(args)
    store = None if remote else Volumes(args.dir)
    if args.action == "create":
        if args.size_mb is None:
            raise SandboxError("volume create: give --size-mb")
        if remote:
            made = client.create_volume(args.name, args.size_mb, args.inodes)
        else:
            assert store is not None
            made = vars(store.create(args.name, args.size_mb, args.inodes))
        print(
            json.dumps(made)
            if args.json
            else f"{made['name']}: {made['size_mb']} MiB, {made['inodes']} inodes"
        )
    elif args.action == "list":
        found = client.volumes() if remote else [vars(v) for v in store.list()]  # type: ignore[union-attr]
        _listing(
            found,
            args.json,
            "volumes",
            lambda v: f"{v['name']}  {v['size_mb']} MiB  {v['inodes']} inodes",
        )
    elif args.action == "delete":
        client.delete_volume(args.name) if remote else store.delete(args.name)  # type: ignore[union-attr]
        print(f"{args.name}: deleted")
    elif args.action == "export":
        chunks = client.export_volume(args.name) if remote else store.export(args.name)  # type: ignore[union-attr]
        with contextlib.ExitStack() as stack:
            to_file = args.file and args.file != "-"
            out = stack.enter_context(open(args.file, "wb")) if to_file else sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
    elif args.action == "import":
        if not args.file:
            raise SandboxError("volume import: give --file (a tar archive, or - for stdin)")
        with contextlib.ExitStack() as stack:
            from_file = args.file != "-"
            source = stack.enter_context(open(args.file, "rb")) if from_file else sys.stdin.buffer
            data = iter(lambda: source.read(4 << 20), b"")
            if remote:
                members = client.import_volume(args.name, b"".join(data))
            else:
                assert store is not None
                members = store.import_(args.name, data)
        print(f"{args.name}: {members} members imported")
    elif args.action == "check":
        if remote:
            raise SandboxError("volume check: on this host's store only (no --url)")
        assert store is not None
        print(clean(store.check(args.name)))
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    """A running service's snapshots of the key's tenant: list, delete (docs/fork.md)."""
    with _service_client(args) as client:
        if args.action == "list":
            _listing(
                client.snapshots(),
                args.json,
                "snapshots",
                lambda snap: (
                    f"{snap['id']}  {','.join(snap['names']) or '-'}  "
                    f"from {snap['sandbox_id']}  {snap['size']} bytes"
                ),
            )
            return 0
        if not args.snapshot_id:
            raise SandboxError("snapshots delete: give the snapshot id (see 'snapshots list')")
        client.delete_snapshot(args.snapshot_id)
        print(f"{args.snapshot_id}: deleted")
        return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from ..agents import ToolCall, data_agent, math_agent

    out, err = _writer(sys.stdout), _writer(sys.stderr)
    seen: list[ToolCall] = []

    def on_event(kind: str, call: ToolCall) -> None:
        if kind == "call":
            seen.append(call)
            code = "".join(f"  | {line}\n" for line in call.code.splitlines())
            err(f"[{len(seen)}] execute_python\n{code}")
            return
        printed = json.loads(call.output).get("stdout", "").splitlines()
        shown = "".join(f"  > {line}\n" for line in printed[:8])
        more = f"  > ... ({len(printed) - 8} more lines)\n" if len(printed) > 8 else ""
        images = f", {call.images} image(s)" if call.images else ""
        err(f"{shown}{more}  = {call.status}{images}\n")

    options: dict[str, Any] = {
        "provider": args.provider,
        "model": args.model,
        "policy": load_policy(args),
        "on_event": on_event,
        "max_turns": args.max_turns,
    }
    if args.agent == "data":
        result = data_agent(args.file, args.question, **options)
    else:
        result = math_agent(args.question, **options)
    out(result.answer.strip() + "\n")
    if result.charts:
        where = Path(args.save_charts)
        where.mkdir(parents=True, exist_ok=True)
        for i, png in enumerate(result.charts, 1):
            (where / f"chart-{i}.png").write_bytes(png)
            out(f"[chart saved to {where / f'chart-{i}.png'}]\n")
    if result.stop_reason != "answer":
        err(f"codecage: the model was still calling tools after {result.turns} turns\n")
        return 1
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    require_service()
    from .._service.app import create_app
    from .._service.config import ServerConfig

    print(json.dumps(create_app(ServerConfig()).openapi(), indent=2, sort_keys=True))
    return 0


def cmd_vm(args: argparse.Namespace) -> int:
    from .._jail import vmimage

    if args.vm_command == "build":
        vm = vmimage.build(progress=lambda line: print(clean(line), flush=True))
        print(f"{vm.kernel}\n{vm.initrd}\n{vm.root}")
        return 0
    found = vmimage.accelerator(refresh=args.refresh)
    state = "boots" if found.ok else "does not boot"
    print(f"{found.accel}: a guest {state} ({found.seconds:.1f} s): {found.detail}")
    return 0 if found.ok else 1


def cmd_image(args: argparse.Namespace) -> int:
    from .._jail import image as _image

    image = _image.build(progress=lambda line: print(clean(line), flush=True))
    print(f"{image.tag} {image.root}")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    """The node's templates (docs/templates.md): build FILE, list, rm NAME."""
    from .._jail import layers

    if args.template_command == "build":
        from .._templates import TemplateSpec, build

        spec = TemplateSpec.from_file(args.file)
        if args.name:
            spec = TemplateSpec(**(spec.model_dump() | {"name": args.name}))
        made = build(
            spec,
            offline=args.offline,
            wheelhouse=args.wheelhouse,
            progress=None if args.json else lambda line: print(clean(line), flush=True),
        )
        print(json.dumps(made, indent=2) if args.json else f"{made['name']} {made['id']}")
        return 0
    if args.template_command == "list":
        _listing(
            layers.listing(),
            args.json,
            "templates",
            lambda t: (
                f"{t['name']}  {t['id']}  {(t['bytes'] or 0) >> 20} MiB  "
                f"{' '.join(t['packages']) or '-'}"
            ),
        )
        return 0
    print(f"{args.name}: removed ({layers.remove(args.name)})")
    return 0


def _service_options(parser: argparse.ArgumentParser) -> None:
    """The options of a command that talks to a running service (`_service_client`)."""
    parser.add_argument("--url", help="the service (or CODECAGE_URL)")
    parser.add_argument("--key", help="an API key of the tenant (or CODECAGE_API_KEY)")
    parser.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codecage", description="Run untrusted Python in a sandbox."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a file or -c CODE in a fresh sandbox")
    run.add_argument("file", nargs="?", help="a Python file, or - for standard input")
    run.add_argument("-c", dest="code", help="code to run")
    run.add_argument("--config", help="a TOML policy file")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a policy field")
    run.add_argument("--json", action="store_true", help="print the whole Execution as JSON")
    run.set_defaults(func=cmd_run)
    shell = sub.add_parser("shell", help="an interactive session in a sandbox")
    shell.add_argument("--config", help="a TOML policy file")
    shell.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a policy field"
    )
    shell.add_argument("--images", default="codecage-images", help="where images are saved")
    shell.set_defaults(func=cmd_shell)
    serve = sub.add_parser("serve", help="the HTTP service")
    serve.add_argument("--config", help="a TOML service config")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--db", help="the audit log: an SQLite file or a postgresql:// URL")
    serve.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="a stateless front end of a Ray cluster (docs/cluster.md): auto, ray://HOST:10001,"
        " HOST:PORT, or local (the one `codecage cluster up` started)",
    )
    serve.add_argument(
        "--cluster-dir", default="/var/lib/codecage/cluster", help="for --cluster local"
    )
    serve.set_defaults(func=cmd_serve)
    cluster = sub.add_parser("cluster", help="a cluster on this machine: Ray and PostgreSQL")
    cluster_sub = cluster.add_subparsers(dest="cluster_action", required=True)
    for action, text in (("up", "start it"), ("down", "stop it"), ("status", "what runs")):
        one = cluster_sub.add_parser(action, help=text)
        one.add_argument("--dir", default="/var/lib/codecage/cluster", help="where it is kept")
        if action == "up":
            one.add_argument("--nodes", type=int, default=2, help="sandbox nodes (default 2)")
    cluster.set_defaults(func=cmd_cluster)
    mcp = sub.add_parser("mcp", help="an MCP server (stdio or streamable HTTP)")
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="for --transport http")
    mcp.add_argument("--port", type=int, default=8765, help="for --transport http")
    mcp.add_argument("--max-sandboxes", type=int, default=64, help="live sandboxes in all")
    mcp.add_argument("--config", help="a TOML policy file")
    mcp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a policy field")
    mcp.set_defaults(func=cmd_mcp)
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_action", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--role",
        choices=["client", "approver", "operator"],
        default="client",
        help="client: the API; approver: only list and answer the tenant's approvals;"
        " operator: only the per-sandbox series of /metrics",
    )
    create.add_argument("--config")
    create.add_argument("--db")
    create.set_defaults(func=cmd_keys)
    audit = sub.add_parser("audit", help="the audit log: list, show, tail, export, prune")
    audit.add_argument(
        "action", choices=["list", "show", "tail", "export", "prune"], nargs="?", default="list"
    )
    audit.add_argument("run_id", nargs="?")
    audit.add_argument("--config")
    audit.add_argument("--db")
    audit.add_argument("--tenant")
    audit.add_argument("--sandbox")
    audit.add_argument(
        "--outcome",
        choices=["ok", "error", "killed", "failed", "interrupted", "rejected", "denied"],
    )
    audit.add_argument("--since", help="Unix time or ISO date")
    audit.add_argument("--until", help="Unix time or ISO date")
    audit.add_argument(
        "--limit", type=int, default=1000, help="list: at most this many runs (0: all)"
    )
    audit.add_argument(
        "--after", type=int, default=0, metavar="ROWID", help="only runs after this rowid"
    )
    audit.add_argument("--older-than", help="prune: runs started this long ago (30d, 12h)")
    audit.add_argument("--vacuum", action="store_true", help="prune: give the space back")
    audit.set_defaults(func=cmd_audit)
    approvals = sub.add_parser(
        "approvals", help="pending approvals of a running service: list, approve, deny"
    )
    approvals.add_argument("action", choices=["list", "show", "approve", "deny"])
    approvals.add_argument("approval_id", nargs="?")
    _service_options(approvals)
    approvals.add_argument("--reason", help="why (kept in the audit log)")
    approvals.add_argument("--by", help="who decides (default: $USER)")
    approvals.set_defaults(func=cmd_approvals)

    boxes = sub.add_parser(
        "sandboxes", help="sandboxes of a running service: list, pause, resume, fork, kill"
    )
    boxes.add_argument("action", choices=["list", "pause", "resume", "fork", "kill"])
    boxes.add_argument("sandbox_id", nargs="?")
    boxes.add_argument("--count", type=int, default=1, help="fork: how many (at most 20)")
    _service_options(boxes)
    boxes.set_defaults(func=cmd_sandboxes)

    snaps = sub.add_parser("snapshots", help="snapshots of a running service: list, delete")
    snaps.add_argument("action", choices=["list", "delete"])
    snaps.add_argument("snapshot_id", nargs="?")
    _service_options(snaps)
    snaps.set_defaults(func=cmd_snapshots)

    vol = sub.add_parser(
        "volume", help="persistent volumes: create, list, delete, export, import, check"
    )
    vol.add_argument("action", choices=["create", "list", "delete", "export", "import", "check"])
    vol.add_argument("name", nargs="?")
    vol.add_argument("--size-mb", type=int, help="create: its size (a hard limit)")
    vol.add_argument("--inodes", type=int, help="create: files at most (default one per 16 KiB)")
    vol.add_argument("--file", help="export: write the tar here (- stdout); import: read it")
    vol.add_argument(
        "--dir",
        help="the local store (default CODECAGE_VOLUME_DIR or "
        "/var/lib/codecage/volumes); with --url, the service's",
    )
    _service_options(vol)
    vol.set_defaults(func=cmd_volume)

    agent = sub.add_parser("agent", help="the example agents: data analysis, math")
    agent_sub = agent.add_subparsers(dest="agent", required=True)
    data = agent_sub.add_parser("data", help="answer a question about a CSV file")
    data.add_argument("file", help="the data file, uploaded to /home/user in the sandbox")
    data.add_argument("question")
    math = agent_sub.add_parser("math", help="answer a math question, computing with code")
    math.add_argument("question")
    for each in (data, math):
        each.add_argument(
            "--provider",
            choices=["anthropic", "openai", "openai-responses"],
            help="default: anthropic if ANTHROPIC_API_KEY is set, else openai",
        )
        each.add_argument("--model", help="default: $CODECAGE_MODEL, else the provider's")
        each.add_argument(
            "--save-charts", default="codecage-charts", metavar="DIR", help="where charts go"
        )
        each.add_argument(
            "--max-turns", type=int, default=12, metavar="N", help="model turns at most"
        )
        each.add_argument("--config", help="a TOML policy file")
        each.add_argument("--set", action="append", metavar="KEY=VALUE", help="a policy field")
        each.set_defaults(func=cmd_agent)
    openapi = sub.add_parser("openapi", help="print the HTTP API's OpenAPI document")
    openapi.set_defaults(func=cmd_openapi)
    image = sub.add_parser("image", help="the root filesystem of the gvisor/container backends")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    image_sub.add_parser("build", help="build it (cached: only when its inputs change)")
    image.set_defaults(func=cmd_image)
    vm = sub.add_parser("vm", help="the full-VM level: its guest images, which accelerator")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    vm_sub.add_parser("build", help="the guest kernel, initramfs and root (cached)")
    probe = vm_sub.add_parser("probe", help="boot a guest: KVM if it really works here, else TCG")
    probe.add_argument("--refresh", action="store_true", help="boot again (else: kept answer)")
    vm.set_defaults(func=cmd_vm)
    template = sub.add_parser("template", help="custom templates: build, list, rm")
    template_sub = template.add_subparsers(dest="template_command", required=True)
    tbuild = template_sub.add_parser("build", help="build a template from a TOML or JSON spec")
    tbuild.add_argument("file", help="the spec (docs/templates.md)")
    tbuild.add_argument("--name", help="its name (instead of the spec's)")
    tbuild.add_argument(
        "--offline", action="store_true", help="wheels from the wheelhouse only, no index"
    )
    tbuild.add_argument("--wheelhouse", help="a directory of wheels (or CODECAGE_WHEELHOUSE)")
    tbuild.add_argument("--json", action="store_true")
    tlist = template_sub.add_parser("list", help="the templates built on this node")
    tlist.add_argument("--json", action="store_true")
    trm = template_sub.add_parser("rm", help="remove a template (by name)")
    trm.add_argument("name")
    template.set_defaults(func=cmd_template)
    doctor = sub.add_parser("doctor", help="which protections this host supports")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SandboxError as exc:
        print(for_stream(sys.stderr, f"codecage: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
