"""The template's huge pages (zygote.huge_pages): dense anonymous memory is collapsed into
2 MiB pages, sparse memory is left as it is (collapsing it would fill it). Real memory of a
real process, no privilege needed; skipped where the kernel has no MADV_COLLAPSE or no
transparent huge pages."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import ctypes, mmap, sys
from codecage._inside import zygote

def anon_huge(start, end):
    huge, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not line.startswith(" "):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            huge += int(line.split()[1]) << 10
    return huge

size = 16 << 20
dense = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
sparse = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, 4096):
    dense[off] = 1
for off in range(0, size, 2 << 20):
    sparse[off] = 1
d = ctypes.addressof(ctypes.c_char.from_buffer(dense))
s = ctypes.addressof(ctypes.c_char.from_buffer(sparse))
# the kernel's own answer, on a region of its own: can it collapse on request at all?
probe = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
probe.write(b"x" * (4 << 20))
p = (ctypes.addressof(ctypes.c_char.from_buffer(probe)) + (2 << 20) - 1) & ~((2 << 20) - 1)
try:
    from codecage._inside import libc
    libc.madvise(p, 2 << 20, libc.MADV_HUGEPAGE)
    libc.madvise(p, 2 << 20, libc.MADV_COLLAPSE)
    able = 1
except OSError:
    able = 0
before = anon_huge(d, d + size), anon_huge(s, s + size)
collapsed = zygote.huge_pages()
after = anon_huge(d, d + size), anon_huge(s, s + size)
print(able, before[0], before[1], after[0], after[1], collapsed)
"""


def _probe() -> list[int]:
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(src)},
    ).stdout  # fmt: skip
    return [int(x) for x in out.split()]


def test_dense_memory_is_collapsed_and_sparse_memory_is_left_alone() -> None:
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("this kernel has no transparent huge pages")
    able, dense_before, sparse_before, dense_after, sparse_after, collapsed = _probe()
    if not able:
        pytest.skip("this kernel collapses nothing on request (no MADV_COLLAPSE: Linux < 6.1)")
    assert dense_before < dense_after and dense_after >= 12 << 20, (dense_before, dense_after)
    assert sparse_after == sparse_before == 0  # one page in 512: never filled for a huge one
    assert collapsed >= dense_after
    assert mmap.PAGESIZE == 4096  # the probe's stride
