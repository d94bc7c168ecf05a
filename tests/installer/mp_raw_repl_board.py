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

Power-on and reset, as on a board: when the flash holds ``main.py`` (the provisioned firmware),
the script first runs the terminal from the flash's ``lib/`` through ``terminal.boot.Boot``,
with ``SimBoard`` (source path in ``PALAUTE_SIM_BOARD``) standing in for ``Esp32Board``: real
sockets to the broker in config.json, the console lines on the pty.  Ctrl-C stops it
(``KeyboardInterrupt``) and drops to the friendly REPL.  ``machine.reset()`` run through the
REPL ends the process with exit status ``RESET_EXIT``; the fixture then starts a fresh
interpreter on the same pty, which is the board coming out of reset.  ``PALAUTE_SIM_NETWORKS``
(JSON ``{ssid: password}``) lists the Wi-Fi networks the simulated board can join, and
``PALAUTE_SIM_CONTROL`` (a TCP port on 127.0.0.1) lets a test press, hold and release buttons
and read events.

This file is MicroPython code; it is also valid CPython (mypy and ruff check it as such; the
annotations are parsed and ignored by MicroPython).
"""

import io
import sys

BANNER = (b"MicroPython v1.29 on pty-board; palaute test board\r\n"
          b"Type \"help()\" for more information.\r\n")
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"

RESET_EXIT = 3
"""Exit status meaning "machine.reset() was called": the fixture starts the board again."""

_in = sys.stdin.buffer
_out = sys.stdout.buffer


class _Machine:
    """Stands in for ``machine`` in code the REPL runs: only ``reset`` (the unix port's own
    module has none; ``unique_id`` is missing on purpose, see ``read_unique_id``)."""

    resetting = False

    @staticmethod
    def reset() -> None:
        _Machine.resetting = True
        raise SystemExit(RESET_EXIT)


sys.modules["machine"] = _Machine  # type: ignore[assignment]


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


class _Control:
    """JSON lines to and from a test on 127.0.0.1:PALAUTE_SIM_CONTROL: board events out,
    ``{"op": "press", "button": n}`` in."""

    def __init__(self) -> None:
        import asyncio

        self.outbox: list[bytes] = []
        self.ready = asyncio.Event()
        self.board: object = None
        self.tasks: list[object] = []

    def send(self, name: str, data: object = None) -> None:
        import json

        self.outbox.append(json.dumps({"ev": name, "data": data}).encode() + b"\n")
        self.ready.set()

    async def serve(self, port: int) -> None:
        import asyncio
        import json

        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def pump() -> None:
            while True:
                await self.ready.wait()
                self.ready.clear()
                while self.outbox:
                    writer.write(self.outbox.pop(0))
                    await writer.drain()

        self.tasks.append(asyncio.create_task(pump()))
        while True:
            line = await reader.readline()
            if not line:
                return
            command = json.loads(line)
            op = command.get("op")
            if op in ("press", "hold", "release") and self.board is not None:
                getattr(self.board, op)(command["button"])


async def _until_ctrl_c(control: _Control) -> bool:
    """Wait for Ctrl-C on the console: True; False when the host closed the pty.  While the
    board's REPL is locked (``repl_lock``) Ctrl-C is ignored, as ``kbd_intr(-1)`` does."""
    import asyncio

    reader = asyncio.StreamReader(_in)  # type: ignore[arg-type]
    while True:
        byte = await reader.read(1)
        if not byte:
            return False
        if byte == b"\x03" and not getattr(control.board, "repl_locked", False):
            return True


def run_firmware() -> bool:
    """Run the provisioned terminal, if the flash holds one; False if the pty closed."""
    import asyncio
    import json
    import os

    sim_source = os.getenv("PALAUTE_SIM_BOARD")
    try:
        os.stat("main.py")
    except OSError:
        return True  # empty flash: straight to the REPL
    if not sim_source:
        return True
    sys.path.insert(0, os.getcwd() + "/lib")
    from terminal.app import Terminal
    from terminal.boot import Boot

    sim: dict[str, object] = {"__name__": "board_sim"}
    with open(sim_source) as f:
        exec(f.read(), sim)
    networks_json = os.getenv("PALAUTE_SIM_NETWORKS")
    networks = json.loads(networks_json) if networks_json else None
    control = _Control()

    def make_board(pins: dict[str, object], config: dict[str, object] | None) -> object:
        board_class = sim["SimBoard"]
        if config is None:  # safe mode: display only
            return board_class(".", buttons=len(pins["buttons"]),  # type: ignore
                               on_event=control.send)
        mqtt = config["mqtt"]
        board = board_class(".", broker_host=mqtt["host"],  # type: ignore
                            broker_port=mqtt["port"], buttons=config["buttons"],  # type: ignore
                            on_event=control.send, wifi=config.get("wifi"),
                            networks=networks)
        control.board = board
        return board

    async def power_on() -> bool:
        boot = Boot(make_board, Terminal, config_path="config.json", board_path="board.json")
        port = os.getenv("PALAUTE_SIM_CONTROL")
        if port:
            control.tasks.append(asyncio.create_task(control.serve(int(port))))
        async def main_py() -> None:
            # What the bundle's main.py does with an unexpected error (it then resets the chip
            # after 10 s; this board waits for Ctrl-C instead).
            try:
                await boot.run()
            except Exception as exc:
                from terminal.boot import log_crash

                log_crash(exc, path="crash.log")

        control.tasks.append(asyncio.create_task(main_py()))
        interrupted = await _until_ctrl_c(control)
        if boot.terminal is not None:
            boot.terminal.stop()
        return interrupted

    if not asyncio.run(power_on()):
        return False
    write(b"Traceback (most recent call last):\r\n  File \"main.py\", line 26, in <module>\r\n"
          b"KeyboardInterrupt: \r\n")
    return True


def main() -> None:
    raw = False
    code = bytearray()
    env = new_globals()
    if not run_firmware():
        return
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
                if _Machine.resetting:
                    return  # the chip resets: no reply, the fixture powers it on again
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
if _Machine.resetting:
    sys.exit(RESET_EXIT)
