"""A cluster on this machine: `codecage cluster up --nodes N` / `down` / `status`.

A real Ray cluster (a head, which holds no sandbox, and N sandbox nodes, each its own
raylet with the resource `codecage_node`) and a PostgreSQL for the audit log, all on
loopback (Ray's address is 127.0.0.2: Ray replaces 127.0.0.1 with the host's public
address, any other loopback address it keeps), with Ray's token authentication on (the
token in `<dir>/ray-token`, 0600). Everything is kept in one directory (default
/var/lib/codecage/cluster): `cluster.json` says what runs (address, database URL, nodes),
so that `codecage serve --cluster local` joins it and `down` stops it. The tests use the
same functions (tests/test_cluster.py).

Clusters on one machine keep out of each other's way: each node's Ray files are under the
cluster's own `<dir>/ray` (Ray's processes name it in their command lines, which is how
`down` finds exactly this cluster's processes: `ray stop` would stop every Ray on the
machine), and the ports Ray would take at a fixed default are chosen free (Ray picks the
others as it binds them); a start that loses a port to another process is tried again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable
from . import postgres
from .node import RESOURCE

DEFAULT_DIR = Path("/var/lib/codecage/cluster")
HOST = "127.0.0.2"
# Node liveness for a machine of its own: a node that stops answering is dead in ~10 s
# (Ray's default, ~30 s, suits a network that drops packets; loopback does not, but a
# loaded machine can hold a raylet off the CPU for seconds: five misses of 2 s each).
HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}


@dataclass
class Cluster:
    directory: str
    address: str  # the head's GCS, HOST:port
    db: str  # the audit log's URL (with its password: the file is 0600)
    nodes: int

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to join (Ray's token)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(Path(self.directory) / "ray-token"),
            "RAY_ADDRESS": self.address,
        }


def ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise BackendUnavailable("Ray is not installed: pip install 'codecage[cluster]'")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ports(head: bool) -> list[str]:
    """The ports Ray would take at a fixed default (two clusters on one machine would meet
    there), each chosen free; the others Ray picks itself, as it binds them."""
    names = ["dashboard-agent-listen"]
    if head:
        names += ["dashboard"]
    return [f"--{name}-port={_free_port()}" for name in names]


STARTS = 3  # tries of a `ray start`: a port chosen free can be taken before Ray binds it


def _ray(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(
            [ray_bin(), *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=180,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BackendUnavailable(f"ray {args[0]} failed ({done.returncode}): {tail}")


def load(directory: str | Path = DEFAULT_DIR) -> Cluster | None:
    try:
        data = json.loads((Path(directory) / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    return Cluster(**data)


def up(
    nodes: int = 2,
    directory: str | Path = DEFAULT_DIR,
    *,
    cpus_per_node: int | None = None,
    progress: Any = None,
) -> Cluster:
    """Start PostgreSQL, a Ray head and `nodes` sandbox nodes (or return the cluster that
    runs already). `progress(text)` hears each step."""
    say = progress or (lambda text: None)
    directory = Path(directory).resolve()
    running = load(directory)
    if running is not None:
        say(f"a cluster runs already ({running.nodes} nodes at {running.address})")
        return running
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    say("PostgreSQL ...")
    db = postgres.start(directory / "postgres")
    token = directory / "ray-token"
    if not token.exists():
        postgres.write_private(token, secrets.token_hex(32))
    cluster = Cluster(str(directory), f"{HOST}:{_free_port()}", db.url(), nodes)
    env = {**cluster.env(), **HEALTH}
    env.pop("RAY_ADDRESS")
    log = directory / "ray.log"
    temp = f"--temp-dir={directory / 'ray'}"
    for attempt in range(STARTS):
        say(f"Ray head at {cluster.address} ...")
        try:
            _ray(
                ["start", "--head", f"--node-ip-address={HOST}",
                 f"--port={cluster.address.split(':')[1]}", "--num-cpus=0",
                 "--include-dashboard=false", "--disable-usage-stats", temp, *_ports(head=True)],
                env,
                log,
            )  # fmt: skip
            break
        except BackendUnavailable:
            _kill(directory)  # what the failed start left
            if attempt == STARTS - 1:
                raise
            cluster.address = f"{HOST}:{_free_port()}"
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1))
    for n in range(nodes):
        say(f"sandbox node {n + 1} of {nodes} ...")
        add_node(cluster, cpus, env, log)
    state = directory / "cluster.json"
    postgres.write_private(state, json.dumps(asdict(cluster)))  # the database's password
    return cluster


def add_node(
    cluster: Cluster,
    cpus: int | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> None:
    """One more sandbox node (a raylet with the resource `codecage_node`)."""
    directory = Path(cluster.directory)
    if env is None:
        env = {**cluster.env(), **HEALTH}
        env.pop("RAY_ADDRESS")
    for attempt in range(STARTS):
        try:
            _ray(
                ["start", f"--address={cluster.address}", f"--node-ip-address={HOST}",
                 f"--num-cpus={cpus or max(1, os.cpu_count() or 1)}",
                 f"--resources={json.dumps({RESOURCE: 1})}", "--disable-usage-stats",
                 f"--temp-dir={directory / 'ray'}", *_ports(head=False)],
                env,
                log or directory / "ray.log",
            )  # fmt: skip
            return
        except BackendUnavailable:
            if attempt == STARTS - 1:
                raise


# Run as a driver of its own (this process stays out of Ray): every node host ends its app,
# so its sandboxes are killed and their cgroups removed before Ray's processes go.
_STOP = """
import ray, sys
ray.init(address=sys.argv[1], namespace="codecage", log_to_driver=False)
hosts = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
         if a["name"].startswith("codecage-node-")]
refs = []
for name in hosts:
    try:
        refs.append(ray.get_actor(name, namespace="codecage").stop.remote())
    except ValueError:
        pass
ray.wait(refs, num_returns=len(refs), timeout=60)
"""


def stop_node_hosts(cluster: Cluster) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-c", _STOP, cluster.address],
            env={**os.environ, **cluster.env()},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=90,
            check=False,
        )


def sweep() -> int:
    """The cgroups of node hosts that are gone (killed with their node), removed: what the
    next jail to start on this machine would do."""
    from .._jail import cgroups

    version = cgroups.detect_version()
    return 0 if version is None else cgroups.sweep(version, keep_owner=cgroups.owner_name())


def _kill(directory: Path) -> None:
    """SIGKILL every Ray process of the cluster kept in `directory`, until none is left."""
    deadline = time.monotonic() + 30
    while (left := _processes(directory)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _processes(directory: Path) -> list[int]:
    """This cluster's Ray processes: those naming its Ray directory, and their children."""
    mark = str(directory / "ray").encode()
    table: dict[int, tuple[int | None, bytes]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                table[int(proc.name)] = (_ppid(int(proc.name)), (proc / "cmdline").read_bytes())
            except OSError:
                continue
    mine = {pid for pid, (_, argv) in table.items() if mark in argv}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in mine and pid not in mine}
        mine |= more
        grew = bool(more)
    return sorted(mine)


def raylets(directory: str | Path = DEFAULT_DIR) -> list[int]:
    """The pids of this cluster's raylets (one per Ray node, the head's first)."""
    found = []
    for pid in _processes(Path(directory).resolve()):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"/raylet"):
            found.append(pid)
    return found


def kill_node(raylet_pid: int) -> None:
    """SIGKILL one node: its raylet and every process it started (its workers, the node
    host among them), at once: what a machine's death looks like to the cluster."""
    children = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _ppid(int(p.name)) == raylet_pid
    ]
    for pid in [raylet_pid, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def down(directory: str | Path = DEFAULT_DIR, progress: Any = None) -> bool:
    """Stop the cluster kept in `directory` (Ray's processes on this machine, then its
    PostgreSQL). False if none was up."""
    say = progress or (lambda text: None)
    directory = Path(directory)
    cluster = load(directory)
    if cluster is None and not (directory / "postgres").exists():
        return False
    if cluster is not None:
        say("node hosts ...")
        stop_node_hosts(cluster)
    say("Ray ...")
    _kill(directory.resolve())
    sweep()
    say("PostgreSQL ...")
    postgres.stop(directory / "postgres")
    (directory / "cluster.json").unlink(missing_ok=True)
    return True
