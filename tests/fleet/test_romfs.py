"""ROMFS images (``fleet.romfs``) as the real MicroPython reads them with ``vfs.VfsRom``.

The image is handed to the MicroPython unix port as a buffer and mounted; files are listed,
read back byte for byte, and a ``.mpy`` module compiled by ``mpy-cross`` is imported from it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleet import firmware_bundle as fb
from fleet import romfs
from tests.services.micropython import micropython_command

pytestmark = pytest.mark.micropython

READER = """
import sys, vfs, os
with open(sys.argv[1], 'rb') as f:
    image = f.read()
vfs.mount(vfs.VfsRom(image), '/rom')
sys.path.insert(0, '/rom')
for d in ('/rom', '/rom/pkg', '/rom/pkg/deep'):
    print(sorted(os.listdir(d)))
with open('/rom/pkg/deep/blob.bin', 'rb') as f:
    print(f.read() == bytes(range(256)) * 3)
with open('/rom/empty.txt', 'rb') as f:
    print(f.read() == b'')
from pkg import mod
print(mod.answer(), mod.TEXT)
"""


def test_varint_is_big_endian_seven_bit_groups() -> None:
    assert romfs.varint(0) == b"\x00"
    assert romfs.varint(127) == b"\x7f"
    assert romfs.varint(128) == b"\x81\x00"
    assert romfs.varint(300) == b"\x82\x2c"
    with pytest.raises(ValueError, match="unsigned"):
        romfs.varint(-1)


def test_bad_names_are_refused() -> None:
    for name in ("", "a/b", ".", ".."):
        with pytest.raises(ValueError, match="bad ROMFS entry name"):
            romfs.build_image({name: b"x"})


def test_micropython_mounts_reads_and_imports_from_the_image(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("TEXT = 'from rom'\n\ndef answer():\n    return 6 * 7\n")
    (tmp_path / "__init__.py").write_text("")
    compiled = {}
    for name in ("mod", "__init__"):
        fb.compile_module(fb.find_mpy_cross(), tmp_path / f"{name}.py",
                          tmp_path / f"{name}.mpy", march=fb.MPY_ARCH["esp32"])
        compiled[f"{name}.mpy"] = (tmp_path / f"{name}.mpy").read_bytes()
    tree: romfs.Tree = {"empty.txt": b"", "pkg": {**compiled,
                                      "deep": {"blob.bin": bytes(range(256)) * 3}}}
    image = romfs.build_image(tree)
    assert len(image) % 2 == 0 and image.startswith(romfs.HEADER)
    assert romfs.build_image(tree) == image  # deterministic
    (tmp_path / "rom.img").write_bytes(image)
    (tmp_path / "reader.py").write_text(READER)
    done = subprocess.run([*micropython_command(), str(tmp_path / "reader.py"),
                           str(tmp_path / "rom.img")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['empty.txt', 'pkg']", "['__init__.mpy', 'deep', 'mod.mpy']", "['blob.bin']",
        "True", "True", "42 from rom"]
