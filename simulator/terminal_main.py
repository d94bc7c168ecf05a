"""Run one simulated terminal; works under MicroPython (unix port) and CPython.

    micropython simulator/terminal_main.py CONFIG_JSON STORAGE_DIR CONTROL_PORT

MICROPYPATH must contain the ``firmware`` directory.  The terminal connects to a harness on
127.0.0.1:CONTROL_PORT, announces itself, reports board events as JSON lines and obeys
commands (press, hold or release a button, cut or restore the network, skew the clock, stop).
"""

import asyncio
import json
import sys
from binascii import hexlify

from terminal.app import Terminal
from terminal.board_sim import SimBoard
from terminal.config import load


class Control:
    """JSON-lines control channel between this process and the harness."""

    def __init__(self):
        self.outbox = []
        self.ready = asyncio.Event()
        self.writer = None

    def send(self, name, data=None):
        self.outbox.append(json.dumps({"ev": name, "data": data}) + "\n")
        self.ready.set()

    async def pump(self):
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.outbox:
                self.writer.write(self.outbox.pop(0).encode())
            await self.writer.drain()


def obey(command, board, terminal):
    """Apply one harness command to the board; returns False to stop."""
    op = command.get("op")
    if op == "press":
        board.press(command["button"])
    elif op == "hold":
        board.hold(command["button"])
    elif op == "release":
        board.release(command["button"])
    elif op == "net":
        if command["up"]:
            board.restore_network()
        else:
            board.cut_network()
    elif op == "skew":
        board.skew_ms += command["ms"]
    elif op == "health":
        board.emit("health", terminal.health())
    elif op == "display":
        fb = board.framebuffer
        board.emit("display", {"lines": board.screen, "leds": board.leds,
                               "fb": None if fb is None else hexlify(fb).decode(),
                               "mode": board.display_mode, "brightness": board.brightness,
                               "content_version": terminal.content_version})
    elif op == "stop":
        return False
    return True


async def main(config_path, storage, port):
    control = Control()
    reader, control.writer = await asyncio.open_connection("127.0.0.1", port)
    config = load(config_path)
    mqtt = config["mqtt"]
    board = SimBoard(storage, broker_host=mqtt["host"], broker_port=mqtt["port"],
                     buttons=config["buttons"], on_event=control.send)
    control.send("hello", config["device_id"])
    pump = asyncio.create_task(control.pump())
    terminal = Terminal(board, config)
    runner = asyncio.create_task(terminal.run())
    while True:
        line = await reader.readline()
        if not line:
            break  # harness went away
        if not obey(json.loads(line), board, terminal):
            break
    terminal.stop()
    control.send("stopped", None)
    await asyncio.sleep(0)
    pump.cancel()
    runner.cancel()


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
