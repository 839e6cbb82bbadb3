"""A PostgreSQL server on this machine for the audit log: `codecage cluster up` and the tests.

`start(directory)` makes (once) and starts a server whose files are all in `directory`:
`data/` (the cluster, owned by the `postgres` user when run as root: PostgreSQL refuses
to run as root), `sock/` (its Unix socket), `log`, `port` and `password` (0600). It
listens on 127.0.0.1 only, on a free port chosen at the first start and kept; its one
role `codecage` logs in with a password (scram-sha-256, also on the socket), so another
user of the machine cannot rewrite the log. `stop(directory)` stops it (fast shutdown:
committed transactions are kept). The binaries are Debian's (`apt-get install
postgresql`): the newest /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .._errors import BackendUnavailable

ROLE = "codecage"
DATABASE = "codecage"
START_TIMEOUT_S = 60


def binaries() -> Path:
    """The directory of PostgreSQL's server binaries (the newest installed)."""
    found = sorted(
        (d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "pg_ctl").exists()),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    if not found:
        raise BackendUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl):"
            " apt-get install postgresql"
        )
    return found[-1]


@dataclass(frozen=True)
class Server:
    directory: Path
    port: int
    password: str

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database on this server (for a test of its own); its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _owner() -> tuple[int, int] | None:
    """The (uid, gid) the server runs as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise BackendUnavailable(
            "PostgreSQL will not run as root and there is no `postgres` user"
            " (apt-get install postgresql makes one)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _run(args: list[str], owner: tuple[int, int] | None) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    kwargs: dict[str, object] = {}
    if owner is not None:
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []}
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, cwd="/", check=False, **kwargs
    )  # type: ignore[call-overload]
    if done.returncode != 0:
        raise BackendUnavailable(
            f"{Path(args[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _give(path: Path, owner: tuple[int, int] | None, mode: int) -> None:
    path.chmod(mode)
    if owner is not None:
        os.chown(path, *owner)


def write_private(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """`text` in `path`, readable by its owner only from the moment it exists (written,
    then chmod, it could be opened in between: its directory is 0755)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # one that was there already
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def start(directory: str | Path) -> Server:
    """Make (once) and start the server kept in `directory`; returns it when it answers."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the server's user must reach data/ and sock/
    bin_dir, owner = binaries(), _owner()
    if owner is not None:
        for parent in directory.parents:
            st = parent.stat()
            if not st.st_mode & 0o001 and st.st_uid != owner[0]:
                raise BackendUnavailable(
                    f"PostgreSQL's user cannot reach {directory}: {parent} is mode"
                    f" {st.st_mode & 0o777:o}; keep its files in a directory it can reach"
                )
    data, sock = directory / "data", directory / "sock"
    password_file, port_file = directory / "password", directory / "port"
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)  # a make that stopped half-way
        data.mkdir()
        _give(data, owner, 0o700)
        password = secrets.token_urlsafe(24)
        pwfile = directory / ".pwfile"  # initdb reads it as the server's user; gone after
        write_private(pwfile, password + "\n", owner)
        try:
            _run(
                [
                    str(bin_dir / "initdb"),
                    f"--pgdata={data}",
                    f"--username={ROLE}",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                owner,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        write_private(password_file, password)
        port_file.write_text(str(_free_port()))
    password = password_file.read_text().strip()
    port = int(port_file.read_text())
    sock.mkdir(exist_ok=True)
    _give(sock, owner, 0o700)
    log = directory / "log"
    log.touch()
    _give(log, owner, 0o600)
    server = Server(directory, port, password)
    if _answers(server):
        return server
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock}"
    _run(
        [
            str(bin_dir / "pg_ctl"),
            "start",
            f"--pgdata={data}",
            f"--log={log}",
            "--wait",
            f"--timeout={START_TIMEOUT_S}",
            f"--options={options}",
        ],
        owner,
    )
    _ensure_database(server)
    return server


def _answers(server: Server) -> bool:
    import psycopg

    try:
        with psycopg.connect(server.url("postgres"), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _ensure_database(server: Server) -> None:
    import psycopg

    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if found.fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another start's
                conn.execute(f"CREATE DATABASE {DATABASE}")


def running(directory: str | Path) -> Server | None:
    """The server kept in `directory` if it is up."""
    directory = Path(directory)
    try:
        server = Server(
            directory, int((directory / "port").read_text()), (directory / "password").read_text()
        )
    except (OSError, ValueError):
        return None
    return server if _answers(server) else None


def stop(directory: str | Path) -> bool:
    """Stop the server kept in `directory` (fast: committed work is kept). False if it was
    not running."""
    data = Path(directory) / "data"
    if not (data / "postmaster.pid").exists():
        return False
    _run(
        [str(binaries() / "pg_ctl"), "stop", f"--pgdata={data}", "--mode=fast", "--wait"], _owner()
    )
    return True
