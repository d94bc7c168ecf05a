"""Build MicroPython ROMFS images (``vfs.VfsRom``): a read-only file system that a port can
map straight from flash, so that ``.mpy`` bytecode imported from it runs in place instead of
being copied into the GC heap.

The format (MicroPython >= 1.25, ``docs/reference/romfs``) is a tree of records.  Every
number is an unsigned varint, big-endian in 7-bit groups, the high bit set on all but the
last byte.  A record is ``kind, length, payload``; the image is the header record (kind
bytes ``d2 cd 31``) whose payload is the records of the root directory.  A directory record
(kind 4) holds ``name length, name, records``; a file record (kind 5) holds ``name length,
name`` and a data record (kind 2) whose payload is the file's bytes.

Only what the firmware needs is written: directories and verbatim file data.  The image
length is made even (a redundant leading varint byte), as MicroPython's own builder does.
"""

from __future__ import annotations

from collections.abc import Mapping

HEADER = b"\xd2\xcd\x31"
KIND_DATA = 2
KIND_DIR = 4
KIND_FILE = 5

Tree = Mapping[str, "bytes | Tree"]
"""A directory: names mapped to file contents (bytes) or to directories."""


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a ROMFS varint."""
    if value < 0:
        raise ValueError("ROMFS numbers are unsigned")
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def record(kind: int, payload: bytes) -> bytes:
    """One record: kind, payload length, payload."""
    return varint(kind) + varint(len(payload)) + payload


def _name(name: str) -> bytes:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad ROMFS entry name: {name!r}")
    encoded = name.encode()
    return varint(len(encoded)) + encoded


def _entries(tree: Tree) -> bytes:
    out = bytearray()
    for name in sorted(tree):  # sorted: the same tree always gives the same image
        content = tree[name]
        if isinstance(content, bytes | bytearray):
            out += record(KIND_FILE, _name(name) + record(KIND_DATA, bytes(content)))
        else:
            out += record(KIND_DIR, _name(name) + _entries(content))
    return bytes(out)


def build_image(tree: Tree) -> bytes:
    """The ROMFS image of ``tree`` (a root directory), deterministic."""
    body = _entries(tree)
    length = varint(len(body))
    if (len(HEADER) + len(length) + len(body)) % 2:
        length = b"\x80" + length  # same number, one byte longer: the image length is even
    return HEADER + length + body
