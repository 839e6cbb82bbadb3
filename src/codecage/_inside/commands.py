"""Shell commands inside the sandbox (`sbx.commands.run`)."""

from __future__ import annotations

import os
import signal
import subprocess

from .messages import CommandReply


def run(cmd: str, timeout_s: float | None, envs: dict[str, str], output_bytes: int) -> CommandReply:
    env = dict(os.environ) | envs
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/home/user",
        env=env,
        start_new_session=True,  # its own process group, killed whole on timeout
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    truncated = len(out) + len(err) > output_bytes
    out = out[:output_bytes]
    err = err[: max(0, output_bytes - len(out))]
    return CommandReply(
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        exit_code=124
        if timed_out
        else (proc.returncode if proc.returncode >= 0 else 128 - proc.returncode),
        timed_out=timed_out,
        truncated=truncated,
    )
