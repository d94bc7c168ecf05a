"""A MicroPython board's REPL, emulated over stdin/stdout (run under the unix port).

The unix port's REPL has no raw REPL, so the installer tests run this script under the real
``micropython`` with stdin/stdout on a pty: the installer opens the pty's other end with
pyserial exactly as it opens ``/dev/ttyUSB0``.  The control bytes and replies follow
MicroPython's ``pyexec.c``:

- friendly REPL: Ctrl-A enters the raw REPL, Ctrl-C prints a fresh prompt, Ctrl-D soft-resets;
- raw REPL: Ctrl-A re-prints the banner, Ctrl-B goes back to the friendly REPL, Ctrl-C drops
  the code collected so far, Ctrl-D runs it (``OK``, stdout, ``\\x04``, traceback, ``\\x04``,
  ``>``) or soft-resets when nothing was collected.

Code runs in a globals dict that lives until the next soft reset, as on a board.  Its output
goes straight to stdout (the pty), in order with the protocol bytes.  Files it writes land in
the working directory, which the fixture makes a temporary "flash".

This file is MicroPython code; it is also valid CPython (mypy and ruff check it as such; the
annotations are parsed and ignored by MicroPython).
"""

import io
import sys

BANNER = (b"MicroPython v1.29 on pty-board; palaute test board\r\n"
          b"Type \"help()\" for more information.\r\n")
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"

_in = sys.stdin.buffer
_out = sys.stdout.buffer


def write(data: bytes) -> None:
    _out.write(data)
    if hasattr(_out, "flush"):
        _out.flush()


def run(code: str, env: dict[str, object]) -> str:
    """Execute ``code`` as the raw REPL does; return the traceback text ('' if none)."""
    try:
        exec(compile(code, "<stdin>", "exec"), env)
    except BaseException as exc:  # the board reports every exception, even SystemExit
        text = io.StringIO()
        sys.print_exception(exc, text)  # type: ignore[attr-defined]  # MicroPython only
        # Drop this script's own frame: a board's traceback starts at the user's code.
        lines = [line for line in text.getvalue().split("\n")
                 if not line.startswith('  File "' + __file__)]
        return "\r\n".join(lines)
    return ""


def new_globals() -> dict[str, object]:
    return {"__name__": "__main__"}


def main() -> None:
    raw = False
    code = bytearray()
    env = new_globals()
    write(BANNER + b">>> ")
    while True:
        byte = _in.read(1)
        if not byte:
            return  # the host closed the pty: the board is "unplugged"
        c = byte[0]
        if c == 0x01:  # Ctrl-A: (re-)enter the raw REPL
            write(RAW_BANNER if raw else b"\r\n" + RAW_BANNER)
            raw = True
            code = bytearray()
        elif c == 0x02:  # Ctrl-B: back to the friendly REPL
            raw = False
            code = bytearray()
            write(b"\r\n" + BANNER + b">>> ")
        elif c == 0x03:  # Ctrl-C: abandon the line being typed
            code = bytearray()
            if not raw:
                write(b"\r\n>>> ")
        elif c == 0x04:
            if raw and code:
                write(b"OK")
                error = run(bytes(code).decode(), env)
                write(b"\x04" + error.encode() + b"\x04>")
                code = bytearray()
            else:  # Ctrl-D with nothing typed: soft reset, back in the same REPL mode
                env = new_globals()
                code = bytearray()
                write(b"soft reboot\r\n")
                write(RAW_BANNER if raw else BANNER + b">>> ")
        elif raw:
            code.append(c)
        else:
            # The friendly REPL only echoes here: the installer never types Python into it.
            write(byte)


main()
