"""The newcomer's paths: the demo, `codecage shell`, `codecage doctor`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires_root
ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_brings_back_the_chart(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "revenue" in proc.stdout and "north" in proc.stdout and "ms" in proc.stdout
    assert (tmp_path / "demo-output" / "revenue.png").read_bytes().startswith(PNG_MAGIC)


def test_shell_takes_multi_line_input_and_saves_images(tmp_path: Path) -> None:
    cells = "x = 1\nfor i in range(2):\n    print(i)\n\nx + 41\nimport matplotlib.pyplot as plt; plt.plot([1])\nnope\n"
    proc = subprocess.run(
        [sys.executable, "-m", "codecage", "shell", "--images", str(tmp_path / "img")],
        input=cells,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0\n1\n42\n")
    assert f"[image saved to {tmp_path / 'img' / 'image-1.png'}]" in proc.stdout
    assert (tmp_path / "img" / "image-1.png").read_bytes().startswith(PNG_MAGIC)
    assert "NameError" in proc.stderr


def test_doctor_lists_each_protection() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "codecage", "doctor"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout
    names = [line.split()[1] for line in proc.stdout.splitlines()]
    for name in ("root", "namespaces", "cgroups", "seccomp", "landlock", "runtime"):
        assert name in names
    assert "ok       landlock" in proc.stdout
    # every registered backend, available here or with what is missing
    backends = {n.split(":", 1)[1] for n in names if n.startswith("backend:")}
    assert {"namespace", "bwrap"} <= backends, proc.stdout
    assert "ok       backend:namespace" in proc.stdout
