"""The initramfs archive (vmimage.newc): the "newc" cpio layout the kernel unpacks, read
back field by field; and the static-executable check the build makes of busybox."""

from __future__ import annotations

import sys
from pathlib import Path

from codecage._jail import vmimage


def _read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    out, at = [], 0
    while True:
        assert data[at : at + 6] == b"070701", at
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = at + 110
        name = data[name_at : name_at + namesize - 1].decode()
        assert data[name_at + namesize - 1] == 0
        body = name_at + namesize + (-(name_at + namesize) % 4)
        contents = data[body : body + size]
        at = body + size + (-(body + size) % 4)
        if name == "TRAILER!!!":
            assert at == len(data)
            return out
        out.append((name, mode, contents))


def test_an_initramfs_archive_reads_back_as_written() -> None:
    files = [("bin", 0o40755, b""), ("init", 0o100755, b"#!/bin/sh\n"), ("a/odd", 0o100644, b"xyz")]
    assert _read_newc(vmimage.newc(files)) == files


def test_only_an_executable_without_an_interpreter_is_static(tmp_path: Path) -> None:
    assert not vmimage._static(Path(sys.executable).resolve())  # dynamically linked
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not vmimage._static(tmp_path / "text")
    assert not vmimage._static(tmp_path / "missing")
    # positive control: an ELF64 with one program header, a PT_LOAD and no PT_INTERP
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    header[32:40] = (64).to_bytes(8, "little")  # e_phoff
    header[54:56] = (56).to_bytes(2, "little")  # e_phentsize
    header[56:58] = (1).to_bytes(2, "little")  # e_phnum
    load = (1).to_bytes(4, "little") + bytes(52)
    (tmp_path / "static").write_bytes(bytes(header) + load)
    assert vmimage._static(tmp_path / "static")
    interp = (3).to_bytes(4, "little") + bytes(52)
    (tmp_path / "dynamic").write_bytes(bytes(header) + interp)
    assert not vmimage._static(tmp_path / "dynamic")
