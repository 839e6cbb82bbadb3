"""The `codecage` command: run, doctor."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from ._errors import SandboxError
from ._policy import Policy

# CSI/OSC/other escape sequences and C0 controls but newline and tab: sandbox output must
# never drive the operator's terminal.
_ESCAPES = re.compile(
    r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])|[\x00-\x08\x0b-\x1f\x7f]"
)


def sanitize(text: str) -> str:
    return _ESCAPES.sub("", text)


def _writer(stream: TextIO) -> Any:
    clean = stream.isatty()

    def write(text: str) -> None:
        stream.write(sanitize(text) if clean else text)
        stream.flush()

    return write


def load_policy(args: argparse.Namespace) -> Policy:
    policy = Policy.from_toml(args.config) if args.config else Policy()
    return policy.with_overrides(args.set or [])


def cmd_run(args: argparse.Namespace) -> int:
    from ._api import run

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

    ex = run(code, policy, on_event=on_event)
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
    from ._doctor import checks

    worst = 0
    for check in checks():
        print(check.line())
        if check.status == "missing" and check.required:
            worst = 1
    return worst


def cmd_shell(args: argparse.Namespace) -> int:
    from ._shell import run_shell

    return run_shell(load_policy(args), Path(args.images))


def cmd_serve(args: argparse.Namespace) -> int:
    from ._config import ServerConfig
    from ._server import serve

    config = ServerConfig.load(args.config, host=args.host, port=args.port, db=args.db)
    print(
        f"codecage: serving on http://{config.host}:{config.port} (audit log {config.db})",
        file=sys.stderr,
    )
    serve(config)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import secrets

    from ._audit import AuditLog
    from ._config import ServerConfig

    config = ServerConfig.load(args.config, db=args.db)
    key = "cc_" + secrets.token_urlsafe(32)
    log = AuditLog(config.db)
    try:
        log.add_key(key, args.tenant)
    finally:
        log.close()
    print(key)  # shown once; only its hash is stored
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import time as _time

    from ._audit import AuditLog
    from ._config import ServerConfig

    config = ServerConfig.load(args.config, db=args.db)
    log = AuditLog(config.db)
    tty = sys.stdout.isatty()

    def show(text: str) -> str:
        return sanitize(text) if tty else text

    try:
        if args.action == "show":
            run = log.run(args.run_id)
            if run is None:
                raise SandboxError(f"no run {args.run_id!r}")
            for key, value in run.items():
                print(show(f"{key}: {value}"))
            return 0
        filters = {
            "tenant": args.tenant,
            "sandbox_id": args.sandbox,
            "outcome": args.outcome,
            "since": _when(args.since),
            "until": _when(args.until),
        }
        last = 0
        while True:
            rows = log.runs(after_rowid=last, **filters)
            for row in rows:
                last = row["rowid"]
                if args.action == "export":
                    print(json.dumps(row))
                else:
                    when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(row["started_at"]))
                    first = (row["code"] or "").splitlines()[0][:60] if row["code"] else ""
                    line = f"{when} {row['id'][:12]} {row['tenant']:<12} {row['kind']:<13} {row['status']:<11} {row['outcome'] or '-':<8} {row['killed_by'] or '-':<12} {first}"
                    print(show(line))
            if args.action != "tail":
                return 0
            sys.stdout.flush()
            _time.sleep(0.5)
    finally:
        log.close()


def _when(value: str | None) -> float | None:
    """A Unix time, or an ISO date/time."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        from datetime import datetime

        return datetime.fromisoformat(value).timestamp()


def cmd_openapi(args: argparse.Namespace) -> int:
    from ._config import ServerConfig
    from ._server import create_app

    print(json.dumps(create_app(ServerConfig()).openapi(), indent=2, sort_keys=True))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from . import _image

    image = _image.build(progress=lambda line: print(sanitize(line), flush=True))
    print(f"{image.tag} {image.root}")
    return 0


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
    serve.add_argument("--db", help="the audit log (SQLite file)")
    serve.set_defaults(func=cmd_serve)
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_action", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--config")
    create.add_argument("--db")
    create.set_defaults(func=cmd_keys)
    audit = sub.add_parser("audit", help="the audit log: list, show, tail, export")
    audit.add_argument(
        "action", choices=["list", "show", "tail", "export"], nargs="?", default="list"
    )
    audit.add_argument("run_id", nargs="?")
    audit.add_argument("--config")
    audit.add_argument("--db")
    audit.add_argument("--tenant")
    audit.add_argument("--sandbox")
    audit.add_argument("--outcome", choices=["ok", "error", "killed", "failed", "interrupted"])
    audit.add_argument("--since", help="Unix time or ISO date")
    audit.add_argument("--until", help="Unix time or ISO date")
    audit.set_defaults(func=cmd_audit)
    openapi = sub.add_parser("openapi", help="print the HTTP API's OpenAPI document")
    openapi.set_defaults(func=cmd_openapi)
    image = sub.add_parser("image", help="the root filesystem of the gvisor/container backends")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    image_sub.add_parser("build", help="build it (cached: only when its inputs change)")
    image.set_defaults(func=cmd_image)
    doctor = sub.add_parser("doctor", help="which protections this host supports")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SandboxError as exc:
        print(f"codecage: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
