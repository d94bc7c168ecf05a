"""Virtual terminals in this process (CPython): the real firmware on simulated boards.

Used by ``palaute demo`` and ``palaute sim``.  Every terminal runs the same ``terminal.app``
code the ESP32 runs, with its own flash directory, against a real MQTT broker.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.firmware_path import ensure_firmware_importable

ensure_firmware_importable()

from terminal.app import Terminal  # noqa: E402 - needs the path set up above
from terminal.board_sim import SimBoard  # noqa: E402
from terminal.config import validate  # noqa: E402

# Share of presses per button on a 4-button terminal, most positive first: real terminals see
# far more happy than unhappy presses.
DEFAULT_MIX = (0.55, 0.25, 0.12, 0.08)


@dataclass
class VirtualTerminal:
    """One terminal: its board, its firmware instance and counters from its events."""

    device_id: str
    board: SimBoard
    terminal: Terminal
    pressed: int = 0
    acked_seq: int = 0
    last_seq: int = 0
    task: asyncio.Task[Any] | None = None
    link_up: bool = False

    def on_event(self, name: str, data: Any) -> None:
        """Track the events the simulated board reports."""
        if name == "vote":
            self.pressed += 1
            self.last_seq = data[0]
        elif name == "acked":
            self.acked_seq = data
        elif name == "link":
            self.link_up = bool(data)


@dataclass
class VirtualFleet:
    """Many virtual terminals plus visitors who press their buttons."""

    root: Path
    broker_host: str
    broker_port: int
    credentials: Callable[[str], tuple[str, str]] = lambda device_id: (device_id, "")
    terminals: list[VirtualTerminal] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, device_id: str, *, buttons: int = 4) -> VirtualTerminal:
        """Create a terminal (not started) with its own flash directory."""
        user, password = self.credentials(device_id)
        config = validate({
            "device_id": device_id, "buttons": buttons,
            "mqtt": {"host": self.broker_host, "port": self.broker_port, "user": user,
                     "password": password},
            **self.settings,
        })
        flash = self.root / device_id
        flash.mkdir(parents=True, exist_ok=True)
        # The firmware may report events while it is being built (content already in flash):
        # those come before the VirtualTerminal exists and carry nothing it counts.
        holder: list[VirtualTerminal] = []

        def on_event(name: str, data: Any) -> None:
            for built in holder:
                built.on_event(name, data)

        board = SimBoard(str(flash), broker_host=self.broker_host,
                         broker_port=self.broker_port, buttons=buttons, on_event=on_event)
        virtual = VirtualTerminal(device_id, board, Terminal(board, config))
        holder.append(virtual)
        self.terminals.append(virtual)
        return virtual

    def start(self) -> None:
        """Start every terminal's firmware tasks in the running event loop."""
        for virtual in self.terminals:
            virtual.task = asyncio.create_task(virtual.terminal.run())

    async def stop(self) -> None:
        """Stop every terminal cleanly."""
        for virtual in self.terminals:
            virtual.terminal.stop()
        await asyncio.gather(*(v.task for v in self.terminals if v.task),
                             return_exceptions=True)

    async def visitors(self, *, presses_per_minute: float, mix: tuple[float, ...] = DEFAULT_MIX,
                       rng: random.Random | None = None) -> None:
        """Press buttons at random like visitors passing by, until cancelled."""
        rng = rng or random.Random()
        rate_per_s = presses_per_minute / 60 * len(self.terminals)
        while True:
            await asyncio.sleep(rng.expovariate(rate_per_s))
            virtual = rng.choice(self.terminals)
            buttons = virtual.board.buttons
            weights = list(mix[:buttons]) + [0.05] * (buttons - len(mix[:buttons]))
            virtual.board.press(rng.choices(range(1, buttons + 1), weights)[0])

    @property
    def pressed(self) -> int:
        """Votes stored in terminal flash and acknowledged to visitors."""
        return sum(v.pressed for v in self.terminals)

    @property
    def pending(self) -> int:
        """Votes still waiting in terminal flash for the fleet's ack."""
        return sum(v.terminal.log.pending for v in self.terminals)

    @property
    def showing_content(self) -> int:
        """Terminals showing content the fleet sent (not their built-in question)."""
        return sum(1 for v in self.terminals if v.terminal.content_version > 0)

    @property
    def online(self) -> int:
        """Terminals whose MQTT link is up."""
        return sum(1 for v in self.terminals if v.link_up)
