"""The terminal's console lines, as ``terminal/boot.py`` prints them after a reset.

Every line the firmware means for people starts with ``palaute: `` (docs/installer.md lists
them).  The installer reads the serial console while it waits for the device to come online,
so a terminal stuck in safe mode (a Wi-Fi password the access point rejects, a config error)
fails the run at once with the firmware's own reason instead of a silent timeout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "palaute: "
_SAFE_MODE = re.compile(r"^palaute: safe mode: (?P<reason>.*?)(?: \(retrying in \d+s\))?$")
_FATAL = "palaute: fatal: "
_RUNNING = "palaute: running "


@dataclass(frozen=True)
class ConsoleLine:
    """One parsed line: ``kind`` is ``safe_mode``, ``fatal``, ``running``, ``info`` (another
    ``palaute:`` line) or ``other``; ``text`` is what to show an installer."""

    kind: str
    text: str

    @property
    def stops_the_terminal(self) -> bool:
        """True for lines after which the device cannot come online by itself."""
        return self.kind in ("safe_mode", "fatal")


def parse_line(line: str) -> ConsoleLine:
    """Classify one console line (without its line ending)."""
    match = _SAFE_MODE.match(line)
    if match:
        return ConsoleLine("safe_mode", match["reason"])
    if line.startswith(_FATAL):
        return ConsoleLine("fatal", line[len(_FATAL):].strip())
    if line.startswith(_RUNNING):
        return ConsoleLine("running", line[len(PREFIX):].strip())
    if line.startswith(PREFIX):
        return ConsoleLine("info", line[len(PREFIX):].strip())
    return ConsoleLine("other", line)


class ConsoleReader:
    """Splits console bytes into lines across reads (a line may arrive in pieces)."""

    def __init__(self) -> None:
        self._partial = b""
        self.lines: list[str] = []
        """Every complete line so far, for the error message when the device stays away."""

    def feed(self, data: bytes) -> list[ConsoleLine]:
        """Add bytes read from the port; return the lines they completed, parsed."""
        text = self._partial + data
        *complete, self._partial = text.split(b"\n")
        parsed = []
        for raw in complete:
            line = raw.decode(errors="replace").strip("\r")
            if line.strip():
                self.lines.append(line)
                parsed.append(parse_line(line))
        return parsed
