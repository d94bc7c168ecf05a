"""Simulated board: the hardware of a terminal, driven by tests and the simulator.

Runs under MicroPython (unix port) and CPython.  Buttons are tapped with ``press()`` or held
down with ``hold()`` until ``release()``; ``held()`` tells which are down.  LEDs and the screen
are recorded; the network can be cut and restored; the wall clock can be skewed or
left unsynced.  Every observable change is reported through ``on_event(name, data)`` so a
harness can await it instead of sleeping.
"""

import asyncio
import time

from terminal.board import Board
from terminal.clock import ticks_ms
from terminal.config import CredentialsRejected
from terminal.screen import render


class SimBoard(Board):
    """The board interface the terminal app uses, without hardware."""

    name = "sim"

    display_width = 128  # an SSD1306-class OLED, as on the reference boards
    display_height = 64

    def __init__(self, root, *, broker_host="127.0.0.1", broker_port=1883, buttons=4,
                 skew_ms=0, synced=True, on_event=None, wifi=None, networks=None):
        self.root = root
        # ``wifi`` is the config's {"ssid", "password"}; ``networks`` maps the SSIDs in range
        # to the passwords their access points accept (None: any network joins).
        self.wifi = wifi
        self.networks = networks
        self.repl_locked = False
        self.broker = (broker_host, broker_port)
        self.buttons = buttons
        self.skew_ms = skew_ms
        self.synced = synced
        self.on_event = on_event
        self.net_up = True
        self.leds = [False] * buttons
        self.screen = []
        # Under MicroPython the screen is also drawn into a real 1-bit framebuffer with the
        # same layout code as the ESP32 board, so tests can read the pixels a visitor sees.
        # CPython has no framebuf: there only the text lines are kept.
        self.framebuffer = None
        self._fb = None
        try:
            import framebuf

            self.framebuffer = bytearray(self.display_width * self.display_height // 8)
            self._fb = framebuf.FrameBuffer(self.framebuffer, self.display_width,
                                            self.display_height, framebuf.MONO_VLSB)
        except ImportError:
            pass
        # Display state set by content settings and opening hours: "on", "dim" or "off", and
        # the brightness (0..255) used while on.
        self.display_mode = "on"
        self.brightness = 255
        self.reset_cause = "power_on"
        self._presses = []
        self._held = 0  # bit n-1 set while button n is held down
        self._pressed = asyncio.Event()
        self._writers = []

    def lock_repl(self):
        """The REPL lock: whoever runs the console (the test board) ignores Ctrl-C while
        ``repl_locked``; test mode lifts it, as on the ESP32 board."""
        self.repl_locked = True

    def emit(self, name, data=None):
        """Report an observable change to whoever drives the board."""
        if name == "test_mode" and data:
            self.repl_locked = False
        return super().emit(name, data)

    # -- clock ---------------------------------------------------------------------------
    def time_ms(self):
        """Wall-clock ms since the Unix epoch, or None while the clock is not set."""
        if not self.synced:
            return None
        return time.time_ns() // 1000000 + self.skew_ms

    def set_time_ms(self, now_ms):
        """Set the wall clock (from NTP or the fleet's ``now_ms``)."""
        self.skew_ms = now_ms - time.time_ns() // 1000000
        self.synced = True

    # -- network -------------------------------------------------------------------------
    async def join_network(self):
        """Join the configured Wi-Fi as the ESP32 board does: CredentialsRejected when the
        access point refuses the password, OSError when the SSID is not in range."""
        if self.networks is None or self.wifi is None:
            return
        ssid = self.wifi["ssid"]
        if ssid not in self.networks:
            raise OSError("wifi: no network %r in range" % ssid)
        if self.networks[ssid] != self.wifi["password"]:
            raise CredentialsRejected("credentials rejected by %r; re-provision with the "
                                      "right Wi-Fi password" % ssid)

    def deinit(self):
        """Release the hardware (nothing to release on a simulated board)."""

    async def open_connection(self):
        """Open a TCP stream to the broker, or raise OSError while the network is cut."""
        if not self.net_up:
            raise OSError("network down")
        reader, writer = await asyncio.open_connection(self.broker[0], self.broker[1])
        if not self.net_up:  # cut while connecting
            writer.close()
            raise OSError("network down")
        self._writers.append(writer)
        return reader, writer

    def cut_network(self):
        """Drop every open connection and refuse new ones (Wi-Fi lost)."""
        self.net_up = False
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.close()
                # MicroPython's Stream.close() is a no-op (wait_closed() closes the socket):
                # close the socket itself, so that a pending read fails as on a lost link.
                sock = getattr(writer, "s", None)
                if sock is not None:
                    sock.close()
            except OSError:
                pass  # already closed by the other side
        self.emit("net", False)

    def restore_network(self):
        """Allow connections again."""
        self.net_up = True
        self.emit("net", True)

    # -- buttons, LEDs, screen -----------------------------------------------------------
    def _check(self, button):
        if not 1 <= button <= self.buttons:
            raise ValueError("button must be 1..%d" % self.buttons)

    def press(self, button):
        """A visitor taps ``button`` (1 = most positive): pressed and released at once."""
        self._check(button)
        self._presses.append((button, ticks_ms()))
        self._pressed.set()

    def hold(self, button):
        """Press ``button`` and keep it down until ``release``; a no-op if already held."""
        self._check(button)
        bit = 1 << (button - 1)
        if self._held & bit:
            return
        self._held |= bit
        self._presses.append((button, ticks_ms()))  # holding starts with a press
        self._pressed.set()
        self.emit("held", self._held)

    def release(self, button):
        """Let go of a held ``button``; a no-op if it is not held."""
        self._check(button)
        bit = 1 << (button - 1)
        if self._held & bit:
            self._held &= ~bit
            self.emit("held", self._held)

    def held(self):
        """The buttons held down now as a bitmask: bit 0 = button 1."""
        return self._held

    async def next_press(self):
        """Wait for the next press; returns ``(button, ticks_ms)``."""
        while not self._presses:
            self._pressed.clear()
            await self._pressed.wait()
        return self._presses.pop(0)

    def set_led(self, button, on):
        """Light or dim a button's LED."""
        self.leds[button - 1] = on
        self.emit("led", [button, on])

    def show(self, lines):
        """Put text lines on the display (and into the framebuffer where there is one)."""
        self.screen = list(lines)
        if self._fb is not None:
            render(self._fb, self.display_width, self.display_height, self.screen)
        else:
            self.framebuffer = None  # CPython draws no text: never leave a stale bitmap
        self.emit("screen", self.screen)

    def blit(self, bitmap, label):
        """Show a whole MONO_VLSB screen (a content package's bitmap); ``label`` names it."""
        if self.framebuffer is None:
            self.framebuffer = bytearray(len(bitmap))  # CPython: keep the bytes anyway
        self.framebuffer[:] = bitmap
        self.screen = [label]
        self.emit("screen", self.screen)

    def set_display(self, mode, brightness):
        """Switch the display ``on``, ``dim`` or ``off``; ``brightness`` 0..255 when on."""
        if (mode, brightness) != (self.display_mode, self.brightness):
            self.display_mode = mode
            self.brightness = brightness
            self.emit("display_state", [mode, brightness])

    def heap_free(self):
        """Free heap bytes, where the interpreter can tell."""
        try:
            import gc

            return gc.mem_free()  # MicroPython only
        except AttributeError:
            return None

    def battery_mv(self):
        """Battery voltage in mV; None on mains power (the simulated default)."""
        return None

    def rssi(self):
        """Wi-Fi signal strength; the simulated network is perfect."""
        return -40 if self.net_up else None
