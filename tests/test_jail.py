"""The namespace jail's configuration, read from inside a real sandbox, and allowed work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import codecage
from codecage import Policy

pytestmark = pytest.mark.requires_root


def run_json(code: str, policy: Policy | None = None) -> dict:  # type: ignore[type-arg]
    ex = codecage.run(code, policy)
    assert ex.error is None, ex.error and ex.error.traceback
    return json.loads("".join(ex.logs.stdout).strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_hello_and_exit_status() -> None:
    ex = codecage.run("print('hi')")
    assert ex.logs.stdout == ["hi\n"] and ex.exit_code == 0 and ex.killed_by is None
    assert ex.duration_ms > 0
    ex = codecage.run("import sys; sys.exit(3)")
    assert ex.exit_code == 3 and ex.error is None
    ex = codecage.run("raise KeyError('k')")
    assert ex.exit_code == 1 and ex.error is not None and ex.error.name == "KeyError"
    assert "raise KeyError" in ex.error.traceback and "_inside" not in ex.error.traceback


PROBE_STATUS = r"""
import json, os, threading, resource
def status(path):
    fields = {}
    for line in open(path):
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return {k: fields[k] for k in ("CapEff", "CapBnd", "CapPrm", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp")}
t = threading.Thread(target=lambda: __import__("time").sleep(0.3)); t.start()
threads = {tid: status(f"/proc/self/task/{tid}/status") for tid in os.listdir("/proc/self/task")}
t.join()
print(json.dumps({
    "threads": threads,
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "hostname": os.uname().nodename,
    "ifaces": [name for _, name in __import__("socket").if_nameindex()],
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
    "mem": open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip(),
    "pids_max": open("/sys/fs/cgroup/pids/pids.max").read().strip(),
    "quota": open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read().strip(),
    "cgroup": open("/proc/self/cgroup").read(),
    "mounts": open("/proc/self/mounts").read(),
    "sid": os.getsid(0) == os.getpid() or os.getsid(0),
    "env": dict(os.environ),
}))
"""


def test_configuration_in_force_read_from_inside() -> None:
    policy = Policy(memory_mb=300, pids_max=50, cpu_cores=0.5, open_files_max=256, disk_mb=32)
    got = run_json(PROBE_STATUS, policy)
    assert len(got["threads"]) >= 2
    for tid, st in got["threads"].items():  # every thread, not just the main one
        assert (
            st["CapEff"] == st["CapBnd"] == st["CapPrm"] == st["CapInh"] == st["CapAmb"] == "0" * 16
        ), tid
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", tid
    assert got["uid"] >= 1 << 20 and got["gid"] >= 1 << 20 and got["groups"] == []
    assert got["pids"][0] == 1 and len(got["pids"]) <= 4  # init, the kernel, nothing of the host
    assert got["hostname"] == "sandbox" and got["ifaces"] == ["lo"]
    assert got["nofile"] == [256, 256] and got["core"] == [0, 0]
    assert got["mem"] == str(300 << 20) and got["pids_max"] == "50" and got["quota"] == "50000"
    assert all(line.endswith(":/") for line in got["cgroup"].split())  # a cgroup namespace
    mounts = {line.split()[1]: line.split()[3].split(",") for line in got["mounts"].splitlines()}
    assert "ro" in mounts["/"] and "ro" in mounts["/usr"]
    for point in ("/home/user", "/tmp", "/dev/shm"):
        assert {"rw", "nosuid", "nodev"} <= set(mounts[point]), point
    assert "size=32768k" in mounts["/home/user"]
    assert all("nosuid" in opts for opts in mounts.values())
    assert got["env"]["HOME"] == "/home/user"


def test_caller_environment_and_allowlist(monkeypatch: object) -> None:
    os.environ["CODECAGE_TEST_SECRET"] = "s3cr3t-value"
    os.environ["CODECAGE_TEST_ALLOWED"] = "fine"
    try:
        env = run_json(
            "import os, json; print(json.dumps(dict(os.environ)))",
            Policy(env_allowlist=("CODECAGE_TEST_ALLOWED",)),
        )
    finally:
        del os.environ["CODECAGE_TEST_SECRET"], os.environ["CODECAGE_TEST_ALLOWED"]
    assert "CODECAGE_TEST_SECRET" not in env and env["CODECAGE_TEST_ALLOWED"] == "fine"
    got = codecage.run("import os; print(os.environ['K'])", envs={"K": "v"})
    assert got.logs.stdout == ["v\n"]


def test_allowed_work_still_works() -> None:
    code = r"""
import threading, subprocess, sys, os, json
import numpy as np, pandas as pd, matplotlib.pyplot as plt
out = []
t = threading.Thread(target=lambda: out.append(sum(range(1000)))); t.start(); t.join()
sub = subprocess.run([sys.executable, "-c", "print(6*7)"], capture_output=True, text=True)
df = pd.DataFrame({"a": np.arange(5)})
plt.plot([1, 2, 3]); plt.savefig("/tmp/p.png")
open("/home/user/f.txt", "w").write("data"); open("/tmp/g.txt", "w").write("tmp")
open("/dev/shm/s", "w").write("shm")
print(json.dumps({"thread": out[0], "sub": sub.stdout.strip(), "df": int(df.a.sum()),
                  "png": os.path.getsize("/tmp/p.png") > 1000,
                  "files": open("f.txt").read() + open("/tmp/g.txt").read()}))
"""
    got = run_json(code)
    assert got == {"thread": 499500, "sub": "42", "df": 10, "png": True, "files": "datatmp"}


def test_random_state_differs_between_sandboxes() -> None:
    code = "import random, numpy, json; print(json.dumps([random.random(), float(numpy.random.rand())]))"
    a, b = run_json(code), run_json(code)
    assert a[0] != b[0] and a[1] != b[1]


def test_bad_input_is_a_clear_answer() -> None:
    ex = codecage.run("")
    assert ex.error is None and ex.exit_code == 0
    ex = codecage.run("def f(:\n")
    assert ex.error is not None and ex.error.name == "SyntaxError"
    try:
        codecage.run(b"print('\xff')")
    except codecage.PolicyError as exc:
        assert "UTF-8" in str(exc)
    else:
        raise AssertionError("invalid UTF-8 was accepted")
    ex = codecage.run("# " + "c" * (10 << 20) + "\nprint(1)")  # 10 MB of code
    assert ex.logs.stdout == ["1\n"] and ex.error is None
    # 10 MB of statements: CPython's compiler needs gigabytes for them, a clear memory_limit.
    ex = codecage.run("x = 1\n" * ((10 << 20) // 6) + "print(x)")
    assert ex.killed_by == "memory_limit" and ex.exit_code == 137


def test_cli_run_mirrors_exit_status(tmp_path: object) -> None:
    cli = [sys.executable, "-m", "codecage"]
    proc = subprocess.run(
        [*cli, "run", "-c", "print('out'); raise SystemExit(4)"], capture_output=True, text=True
    )
    assert proc.returncode == 4 and proc.stdout == "out\n"
    proc = subprocess.run([*cli, "run", "--json", "-c", "1/0"], capture_output=True, text=True)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and data["error"]["name"] == "ZeroDivisionError"
    proc = subprocess.run(
        [*cli, "run", "--set", "timeout_s=1", "-c", "while 1: pass"], capture_output=True, text=True
    )
    assert proc.returncode == 137 and "timeout" in proc.stderr
    proc = subprocess.run(
        [*cli, "run", "--set", "bogus=1", "-c", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown policy field 'bogus'" in proc.stderr


# The container engine's seccomp profile, compiled here the way the engine's runtime does
# (libseccomp; MASKED_EQ takes `value` as the mask, `valueTwo` as the datum) and loaded in
# a host process, so its argument rules are probed even where no engine runs. Every op the
# Docker format allows for our rules is mapped; the probe is test_attacks.py's.
LOAD_DOCKER_PROFILE = r"""
import ctypes
from codecage._inside import libc, seccomp
from codecage._jail.container import docker_seccomp_profile
lib = seccomp._lib()
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(seccomp.SCMP_ACT_ALLOW)
ops = {"SCMP_CMP_EQ": 4, "SCMP_CMP_MASKED_EQ": seccomp.SCMP_CMP_MASKED_EQ}
for entry in docker_seccomp_profile()["syscalls"]:
    assert entry["action"] == "SCMP_ACT_ERRNO", entry
    action = seccomp.SCMP_ACT_ERRNO(entry["errnoRet"])
    cmps = [
        seccomp._ArgCmp(a["index"], ops[a["op"]], a["value"], a.get("valueTwo", 0))
        for a in entry.get("args", [])
    ]
    for name in entry["names"]:
        seccomp._rule(lib, ctx, action, name, *cmps)
libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
assert lib.seccomp_load(ctx) == 0
"""


def test_container_profile_argument_rules_hold_in_every_spelling() -> None:
    from codecage.testing import on_host

    from .test_attacks import arg_rule_probe, assert_reaches_the_kernel

    probe = arg_rule_probe()
    assert_reaches_the_kernel(on_host(probe))
    confined = on_host(LOAD_DOCKER_PROFILE + probe)
    assert confined and all(got == "EPERM" for got in confined.values()), {
        k: v for k, v in confined.items() if v != "EPERM"
    }


# Under Landlock a process cannot write its own /proc/self/oom_score_adj (the kernel's
# trap): setting it must raise, never report success or be swallowed, while a descriptor
# opened before Landlock (init's) still works. Host process, real Landlock.
OOM_UNDER_LANDLOCK = r"""
import json, os
from codecage._inside import caps, landlock
fd = caps.open_oom_score_adj()
landlock.WRITABLE_DIRS, landlock.WRITABLE_DEVICES = ("/tmp",), ("/dev/null",)
landlock.restrict()
out = {}
try:
    out["set"] = caps.set_oom_score_adj(1000)
except OSError as exc:
    out["set"] = type(exc).__name__
caps.write_oom_score_adj(fd, 1000)
out["through_fd"] = int(open("/proc/self/oom_score_adj").read())
print(json.dumps(out))
"""


def test_oom_score_failure_is_raised_and_inits_descriptor_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", OOM_UNDER_LANDLOCK], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"set": "PermissionError", "through_fd": 1000}
