"""Only the board layer touches hardware modules; everything else runs on CPython too."""

from __future__ import annotations

import ast
from pathlib import Path

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
HARDWARE_MODULES = {"machine", "network", "esp32", "ntptime", "esp", "bluetooth"}
BOARD_LAYER = {"terminal/board_esp32.py", "terminal/ssd1306.py"}


def hardware_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & HARDWARE_MODULES


def test_only_the_board_layer_imports_hardware_modules() -> None:
    offenders = {}
    for path in sorted(FIRMWARE.rglob("*.py")):
        name = path.relative_to(FIRMWARE).as_posix()
        if name not in BOARD_LAYER and hardware_imports(path):
            offenders[name] = sorted(hardware_imports(path))
    assert offenders == {}, f"hardware imports outside the board layer: {offenders}"


def test_the_check_sees_hardware_imports() -> None:
    assert hardware_imports(FIRMWARE / "terminal" / "board_esp32.py") >= {"machine", "network"}
