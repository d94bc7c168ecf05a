"""What a visitor sees: the simulated display's pixels under the real MicroPython.

The reference image is drawn by MicroPython's own ``framebuf`` with the firmware's layout
(``terminal.screen.render``) in a separate interpreter, so the test checks that the terminal
shows the right screen at the right moment, pixel for pixel.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.harness import FIRMWARE, Harness, TerminalProcess
from tests.services.common import free_port
from tests.services.micropython import micropython_command

pytestmark = pytest.mark.micropython

REFERENCE = """
import framebuf, sys
from binascii import hexlify
from terminal.screen import render
buf = bytearray(128 * 64 // 8)
render(framebuf.FrameBuffer(buf, 128, 64, framebuf.MONO_VLSB), 128, 64, sys.argv[1:])
print(hexlify(buf).decode())
"""


def reference(lines: list[str], tmp_path: Path) -> bytes:
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE)
    env = dict(os.environ, MICROPYPATH=f"{FIRMWARE}{os.pathsep}.frozen")
    out = subprocess.run([*micropython_command(), str(script), *lines], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return bytes.fromhex(out.strip())


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[TerminalProcess]:
    harness = Harness(tmp_path / "terminals", micropython_command())
    harness.workdir.mkdir()
    device = "pt-d15b1a000001"
    # No broker listens on this port: the display must work with the network down.
    term = harness.add(device, {
        "device_id": device, "buttons": 4, "min_gap_ms": 0,
        "mqtt": {"host": "127.0.0.1", "port": free_port(), "user": device, "password": "x"}})
    term.start()
    yield term
    harness.close()


def lit(fb: bytes) -> int:
    return sum(bin(byte).count("1") for byte in fb)


def test_question_then_thank_you_pixel_for_pixel(terminal: TerminalProcess,
                                                 tmp_path: Path) -> None:
    idle = terminal.display()
    assert idle["lines"] == ["How was your visit?"]
    assert idle["fb"] == reference(idle["lines"], tmp_path)
    assert lit(idle["fb"]) > 100  # really drawn, not blank
    terminal.press(2)
    shown = terminal.display()
    assert shown["lines"] == ["Kiitos!", "Thank you!"]
    assert shown["fb"] == reference(["Kiitos!", "Thank you!"], tmp_path)
    assert shown["fb"] != idle["fb"]
    assert shown["leds"] == [False, True, False, False]
