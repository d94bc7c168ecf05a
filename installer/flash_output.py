"""What ``palaute flash`` shows while esptool works: a progress bar, and esptool's own
narration only in the debug log.

esptool 5 prints through one process-wide logger from esp-pylib (Espressif's shared
logging library) that integrators may replace with their own ``EspLogBase`` subclass
(``EspLog.set_logger``).
:func:`esptool_output` installs :class:`EsptoolOutput` for the duration of one flash and
puts the previous logger back: esptool's chatter ("Connecting....", stub and baud rate
messages) goes to the ``palaute.flash`` logger at debug level (``palaute -v flash ...``
shows it), and its write progress drives :class:`ProgressBar`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from esp_pylib.logger import EspLog, EspLogBase

LOG = logging.getLogger("palaute.flash")
BAR_WIDTH = 30


class ProgressBar:
    """One progress bar on ``stream``.

    On a terminal it redraws a single line in place; elsewhere (a log file, a pipe, the
    tests) it prints a new line at every 10 % so the output stays readable.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_tenth = -1
        self._open_line = False
        self.done = 0

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes."""
        if total <= 0:
            return
        done = max(0, min(done, total))
        self.done = done
        filled = BAR_WIDTH * done // total
        percent = 100 * done // total
        line = (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}%  "
                f"{done // 1024:,}/{total // 1024:,} KiB")
        if self._tty:
            self.stream.write("\r" + line)
            self._open_line = done < total
            if not self._open_line:
                self.stream.write("\n")
        elif percent // 10 > self._last_tenth:
            self._last_tenth = percent // 10
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an unfinished bar's line (the write failed half-way)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class EsptoolOutput(EspLogBase):
    """esptool's logger while ``palaute flash`` runs: narration to the debug log, progress
    to a :class:`ProgressBar` on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: ProgressBar | None = None
        self._partial = ""

    def _debug(self, text: str, end: str = "\n") -> None:
        # esptool prints "Connecting..." and then one dot per failed sync with end="":
        # collect the pieces and log whole lines.
        self._partial += text + end
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                LOG.debug("esptool: %s", line.rstrip())

    def _message(self, kind: str, args: tuple[Any, ...]) -> None:
        # A note or warning arriving in the middle of a dotted line gets a line of its own.
        if self._partial:
            self._debug("")
        self._debug(f"{kind}: " + self._text(args))

    @staticmethod
    def _text(args: tuple[Any, ...], sep: str = " ") -> str:
        return sep.join(str(a) for a in args)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """esptool's plain messages (chip info, 'Connecting...', 'Hash of data verified')."""
        self._debug(self._text(args, kwargs.get("sep", " ")), kwargs.get("end", "\n"))

    def note(self, *args: Any) -> None:
        """esptool's notes (e.g. no USB VID/PID for a pty)."""
        self._message("note", args)

    def hint(self, *args: Any) -> None:
        """esptool's hints; ours are in the error messages."""
        self._message("hint", args)

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        """esptool's warnings; the failures that matter reach us as exceptions."""
        self._message("warning", args)

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        """esptool's error messages; the failure itself is raised as FatalError."""
        self._message("error", args)

    def warning(self, message: str, suggestion: str | None = None) -> None:
        """The older name of :meth:`warn`, still called by parts of esptool."""
        self.warn(message, suggestion=suggestion)

    def error(self, message: str, suggestion: str | None = None) -> None:
        """The older name of :meth:`err`, still called by parts of esptool."""
        self.err(message, suggestion=suggestion)

    def debug(self, *args: Any) -> None:
        """esptool's debug messages."""
        self._debug(self._text(args))

    def set_verbosity(self, mode: int | str) -> None:
        """Verbosity is the ``palaute.flash`` logger's level."""

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "",
                     suffix: str = "", bar_length: int = BAR_WIDTH) -> None:
        """esptool's write progress (bytes sent of the possibly compressed image)."""
        if self.bar is None or cur_iter < self.bar.done:
            # A new bar for each write; esptool restarts a write after a lost connection.
            if self.bar is not None:
                self.bar.close()
            self.bar = ProgressBar(self.stream, "writing")
        self.bar.update(cur_iter, total_iters)

    def close(self) -> None:
        """End any open progress line and flush a partial narration line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._partial.strip():
            self._debug("")


@contextmanager
def esptool_output(stream: TextIO) -> Iterator[EsptoolOutput]:
    """Route esptool's output through an :class:`EsptoolOutput` on ``stream`` inside the
    ``with``; the logger it replaced is back afterwards.

    esptool's logger is process-wide, so one process flashes one board at a time.
    """
    from esptool.reset import ResetStrategy

    output = EsptoolOutput(stream)
    previous = EspLog.instance
    # esptool's reset code bound its one-time "Chip was NOT reset" warning to the logger of
    # the moment it was imported; point it at ours too, or it bypasses the swap.
    reset_warning = ResetStrategy.print_once
    previous_callback = reset_warning.print_callback
    EspLog.set_logger(output)
    reset_warning.print_callback = output.warn
    try:
        yield output
    finally:
        output.close()
        reset_warning.print_callback = previous_callback
        EspLog.instance = previous
