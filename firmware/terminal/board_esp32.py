"""The real board: an ESP32 or ESP32-S3 terminal, wired as its pin map says.

Same interface as ``board_sim.SimBoard``; the app cannot tell the two apart.  This module (with
the ``ssd1306`` display driver) is the only firmware code that touches hardware, and it creates
no hardware object at import time: everything is set up by ``Esp32Board(pins, config)``.

``pins`` is the parsed pin-map JSON (``hardware/boards/*.json``, validated on the host by
``palaute hardware check`` and installed as ``/board.json``); ``config`` is the validated
``config.json`` (Wi-Fi, broker, buttons, debounce), or None for a display-only board in safe
mode.

Buttons: each button pin has a falling-edge IRQ whose handler only writes (button, ticks_ms)
into a preallocated ring and sets a ``ThreadSafeFlag``; it allocates nothing, so it is safe as
a hard IRQ.  ``next_press`` debounces on the asyncio side by timestamps: an edge closer than
``debounce_ms`` to the previous edge of the same button is contact bounce, and a press counts
only if the button still reads pressed ``debounce_ms`` after its first edge (which also drops
the falling edges of a bouncing release).

Wall clock: MicroPython on the ESP32 counts time from 2000-01-01 (only the unix, windows,
webassembly, alif, mimxrt and rp2 ports use 1970, per the v1.29 ``time`` docs).  Rather than
trusting either, the epoch is read at run time with ``time.gmtime(0)[0]`` and every value
crossing this module's interface is in ms since 1970 (the protocol's ``ts_ms``).
"""

import asyncio
import gc
import time
from array import array

import machine
import micropython
import network
import ntptime

from terminal.board import Board
from terminal.clock import ticks_diff, ticks_ms
from terminal.config import CredentialsRejected
from terminal.screen import render

_RING = 32  # presses buffered between the IRQ and the button task (a burst of bounces fits)
_UNIX_2000_S = 946684800  # 2000-01-01T00:00:00Z in seconds since 1970
_PLAUSIBLE_MS = 1704067200000  # 2024-01-01: an RTC earlier than this was never set
_RESET_CAUSES = (
    (machine.PWRON_RESET, "power_on"),
    (machine.HARD_RESET, "hard_reset"),
    (machine.WDT_RESET, "watchdog"),
    (machine.DEEPSLEEP_RESET, "deep_sleep"),
    (machine.SOFT_RESET, "soft_reset"),
)


def reset_cause_name(cause):
    """``machine.reset_cause()`` as a protocol string.

    MicroPython reports five causes on the ESP32; a brownout is folded into one of them by the
    port (it is not distinguishable from Python), so ``brownout`` never appears here.
    """
    for code, name in _RESET_CAUSES:
        if cause == code:
            return name
    return "unknown"


def hard_reset():
    """Reset the chip (last resort of ``main.py``)."""
    machine.reset()


class Esp32Board(Board):
    """A terminal's hardware: buttons with LEDs, OLED, Wi-Fi, RTC, battery sense, watchdog."""

    debounce_ms = 30
    wifi_timeout_ms = 20000  # one Wi-Fi association attempt
    connect_timeout_ms = 15000  # one TCP connection to the broker
    ntp_host = "pool.ntp.org"
    ntp_timeout_s = 2  # each NTP query blocks the event loop for at most this long
    adc_samples = 16

    def __init__(self, pins, config=None, *, on_event=None, root=""):
        self.pins = pins
        self.config = config or {}
        self.name = pins.get("board", "esp32")
        self.on_event = on_event
        self.root = root
        self.reset_cause = reset_cause_name(machine.reset_cause())
        self._epoch_offset_s = _UNIX_2000_S if time.gmtime(0)[0] == 2000 else 0
        self._synced = self._rtc_ms() >= _PLAUSIBLE_MS  # the RTC survives soft and WDT resets
        wired = pins["buttons"]
        self.buttons = self.config.get("buttons", len(wired))
        if not 1 <= self.buttons <= len(wired):
            raise ValueError("config asks for %d buttons; board %s wires %d"
                             % (self.buttons, self.name, len(wired)))
        if "debounce_ms" in self.config:
            self.debounce_ms = self.config["debounce_ms"]
        self.repl_locked = False
        self._wlan = None
        self._net_up = False
        self._wifi_lock = asyncio.Lock()
        self._wdt = None
        # LEDs first, so nothing is left floating while the rest comes up.
        self._leds = [machine.Pin(b["led"], machine.Pin.OUT, value=0) for b in wired]
        self._status = None
        if pins.get("status_led") is not None:
            self._status = machine.Pin(pins["status_led"], machine.Pin.OUT, value=0)
        self.display = None
        self.display_error = None
        self.display_width = 128  # the size content packages are asked for
        self.display_height = 64
        self._setup_display(pins.get("display"))
        self._adc = None
        self._divider = pins.get("battery_divider", 2.0)
        if pins.get("battery_adc") is not None:
            self._adc = machine.ADC(machine.Pin(pins["battery_adc"]), atten=machine.ADC.ATTN_11DB)
        self._setup_buttons(wired[:self.buttons])

    # -- events --------------------------------------------------------------------------------
    def lock_repl(self):
        """Ignore Ctrl-C on the USB console (the REPL lock); test mode lifts it (``emit``)."""
        micropython.kbd_intr(-1)
        self.repl_locked = True

    def emit(self, name, data=None):
        """Report an observable change: to ``on_event`` if given, else to the console."""
        if name == "test_mode" and data and self.repl_locked:
            micropython.kbd_intr(3)  # someone at the terminal holds the chord: Ctrl-C again
            self.repl_locked = False
        if name == "link" and self._status is not None:
            self._status.value(1 if data else 0)  # status LED: lit while the broker link is up
        if not super().emit(name, data):
            print("palaute:", name, data)

    # -- clock ---------------------------------------------------------------------------------
    def _rtc_ms(self):
        # time.time_ns() reads the RTC with microsecond resolution, from the port's epoch.
        return time.time_ns() // 1000000 + self._epoch_offset_s * 1000

    def time_ms(self):
        """Wall-clock ms since 1970-01-01 UTC, or None while the clock is not set."""
        if not self._synced:
            return None
        return self._rtc_ms()

    def set_time_ms(self, now_ms):
        """Set the RTC (from NTP or the fleet's ``now_ms``)."""
        seconds = now_ms // 1000 - self._epoch_offset_s
        tm = time.gmtime(seconds)
        # RTC.datetime: (year, month, day, weekday, hour, minute, second, microsecond); the
        # ESP32 port derives the weekday from the date itself.
        machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5],
                                (now_ms % 1000) * 1000))
        self._synced = True

    async def sync_time(self, attempts=3):
        """Set the clock from NTP; True on success.  Needs Wi-Fi; retries ``attempts`` times.

        ``ntptime.time()`` returns whole seconds from the port's epoch and blocks for at most
        ``ntp_timeout_s`` (plus DNS); the fleet's ``now_ms`` on each ack refines it later.
        """
        for attempt in range(attempts):
            try:
                await self._ensure_wifi()
                ntptime.host = self.config.get("ntp_host", self.ntp_host)
                ntptime.timeout = self.ntp_timeout_s
                seconds = ntptime.time()
            except (OSError, OverflowError, IndexError):
                await asyncio.sleep(1 + attempt)
                continue
            self.set_time_ms((seconds + self._epoch_offset_s) * 1000)
            self.emit("time", self.time_ms())
            return True
        return False

    # -- network -------------------------------------------------------------------------------
    def _net(self, up):
        if up != self._net_up:
            self._net_up = up
            self.emit("net", up)

    async def _ensure_wifi(self):
        """Associate with the configured access point, within ``wifi_timeout_ms``."""
        wifi = self.config.get("wifi")
        if not wifi:
            raise OSError("wifi not configured")
        async with self._wifi_lock:
            if self._wlan is None:
                self._wlan = network.WLAN(network.STA_IF)
            wlan = self._wlan
            if wlan.isconnected():
                self._net(True)
                return
            self._net(False)
            wlan.active(True)
            if wlan.status() != network.STAT_CONNECTING:
                wlan.connect(wifi["ssid"], wifi["password"])
            start = ticks_ms()
            while not wlan.isconnected():
                if wlan.status() == network.STAT_WRONG_PASSWORD:
                    wlan.disconnect()
                    raise CredentialsRejected("credentials rejected by %r; re-provision with "
                                              "the right Wi-Fi password" % wifi["ssid"])
                if ticks_diff(ticks_ms(), start) > self.wifi_timeout_ms:
                    status = wlan.status()
                    wlan.disconnect()  # stop retrying in the background; the next call restarts
                    raise OSError("wifi: no connection to %r (status %d)"
                                  % (wifi["ssid"], status))
                await asyncio.sleep_ms(200)
            self._net(True)

    async def join_network(self):
        """Associate with the configured Wi-Fi once (boot checks the credentials with it);
        raises CredentialsRejected for a wrong password, OSError for other failures."""
        await self._ensure_wifi()

    async def open_connection(self):
        """Open a TCP stream to the broker; raises OSError while Wi-Fi or the broker is down."""
        await self._ensure_wifi()
        mqtt = self.config["mqtt"]
        try:
            return await asyncio.wait_for_ms(
                asyncio.open_connection(mqtt["host"], mqtt["port"]), self.connect_timeout_ms)
        except asyncio.TimeoutError:
            raise OSError("broker %s:%d: connect timed out"
                          % (mqtt["host"], mqtt["port"])) from None

    def rssi(self):
        """Wi-Fi signal strength in dBm, None while not connected."""
        wlan = self._wlan
        if wlan is None or not wlan.isconnected():
            return None
        try:
            return wlan.status("rssi")
        except OSError:
            return None

    # -- buttons -------------------------------------------------------------------------------
    def _setup_buttons(self, wired):
        # Room for the traceback of an exception raised inside an IRQ (ports that have it).
        reserve = getattr(micropython, "alloc_emergency_exception_buf", None)
        if reserve is not None:
            reserve(100)
        self._ring_button = bytearray(_RING)
        self._ring_ticks = array("i", [0] * _RING)  # ticks_ms() < 2**30 fits an int32
        self._ring_pos = array("i", [0, 0, 0])  # head (IRQ writes), tail (task reads), dropped
        self._flag = asyncio.ThreadSafeFlag()
        self._last_edge = array("i", [0] * len(wired))  # ticks of each button's last edge
        self._seen = bytearray(len(wired))  # whether that button had an edge yet
        self._button_pins = []
        for index, button in enumerate(wired):
            if button.get("pull") == "external":  # a resistor to 3V3 on the board
                pin = machine.Pin(button["pin"], machine.Pin.IN)
            else:
                pin = machine.Pin(button["pin"], machine.Pin.IN, machine.Pin.PULL_UP)
            handler = self._irq_handler(index)
            try:
                pin.irq(handler=handler, trigger=machine.Pin.IRQ_FALLING, hard=True)
            except (TypeError, ValueError):  # a port without hard pin IRQs: scheduled instead
                pin.irq(handler=handler, trigger=machine.Pin.IRQ_FALLING)
            self._button_pins.append(pin)

    def _irq_handler(self, index):
        # Everything the handler touches is bound here, so the handler itself only reads and
        # writes preallocated buffers and small ints: no heap allocation in the IRQ.  It is
        # one tuple because MicroPython heap-allocates the argument array when calling a
        # closure with more than five closed-over variables and arguments in total.
        state = (index, self._ring_button, self._ring_ticks, self._ring_pos, self._flag)

        def handler(pin):
            index, ring_button, ring_ticks, pos, flag = state
            head = pos[0]
            nxt = head + 1 if head + 1 < _RING else 0
            if nxt == pos[1]:
                pos[2] += 1  # ring full: drop this edge
                return
            ring_button[head] = index
            ring_ticks[head] = ticks_ms()  # type: ignore[call-overload]  # a small int
            pos[0] = nxt
            flag.set()

        return handler

    @property
    def dropped_edges(self):
        """Edges lost because the ring was full (the button task fell behind)."""
        return self._ring_pos[2]

    async def next_press(self):
        """Wait for the next debounced press; returns ``(button, ticks_ms)`` (1 = most positive)."""
        pos = self._ring_pos
        while True:
            while pos[1] == pos[0]:
                await self._flag.wait()
            tail = pos[1]
            index = self._ring_button[tail]
            at = self._ring_ticks[tail]
            pos[1] = tail + 1 if tail + 1 < _RING else 0
            since = ticks_diff(at, self._last_edge[index])
            seen = self._seen[index]
            self._last_edge[index] = at
            self._seen[index] = 1
            # ticks wrap (every 2**30 ms): a negative difference means "long ago".
            if seen and 0 <= since < self.debounce_ms:
                continue  # contact bounce of an edge already seen
            wait = self.debounce_ms - ticks_diff(ticks_ms(), at)
            if wait > 0:
                await asyncio.sleep_ms(wait)
            if self._button_pins[index].value() == 0:  # still held: a real press
                return index + 1, at
            # released again within debounce_ms: a glitch or the bounce of a release

    def held(self):
        """The buttons held down now as a bitmask (bit 0 = button 1): raw pin levels."""
        mask = 0
        for index, pin in enumerate(self._button_pins):
            if pin.value() == 0:  # active low, like next_press
                mask |= 1 << index
        return mask

    def set_led(self, button, on):
        """Light or dim a button's LED."""
        self._leds[button - 1].value(1 if on else 0)

    # -- display -------------------------------------------------------------------------------
    def _setup_display(self, spec):
        if not spec:
            return
        self.display_width = spec["width"]
        self.display_height = spec["height"]
        try:
            from terminal.ssd1306 import SSD1306

            i2c = machine.I2C(0, sda=machine.Pin(spec["sda"]), scl=machine.Pin(spec["scl"]),
                              freq=400000)
            self.display = SSD1306(i2c, spec["width"], spec["height"], spec["address"])
        except OSError as exc:  # no display answering: run without one, say so in health/logs
            self.display = None
            self.display_error = "display: %s" % exc
            print("palaute:", self.display_error)

    def show(self, lines):
        """Put text lines on the display, wrapped to its width and centred."""
        display = self.display
        if display is None:
            print("palaute: screen", lines)
            return
        render(display.fb, display.width, display.height, lines)
        try:
            display.show()
        except OSError as exc:  # a loose wire must not stop the terminal
            self.display_error = "display: %s" % exc

    def blit(self, bitmap, label):
        """Show a whole MONO_VLSB screen (a content package's bitmap: the panel's layout)."""
        display = self.display
        if display is None:
            print("palaute: screen", label)
            return
        display.buffer[:] = bitmap
        try:
            display.show()
        except OSError as exc:
            self.display_error = "display: %s" % exc

    def set_display(self, mode, brightness):
        """``on`` at ``brightness`` (0..255), ``dim`` (low contrast) or ``off`` (panel off)."""
        display = self.display
        if display is None:
            return
        try:
            if mode == "off":
                display.power(False)
                return
            display.contrast(brightness if mode == "on" else brightness // 16)
            display.power(True)
        except OSError as exc:
            self.display_error = "display: %s" % exc

    # -- health --------------------------------------------------------------------------------
    def heap_free(self):
        """Free heap bytes."""
        return gc.mem_free()

    def battery_mv(self):
        """Battery voltage in mV through the divider, or None without a battery sense pin."""
        if self._adc is None:
            return None
        total = 0
        for _ in range(self.adc_samples):
            total += self._adc.read_uv()  # calibrated by the ESP-IDF (eFuse Vref)
        return int(total // self.adc_samples * self._divider) // 1000

    # -- watchdog and lifecycle ----------------------------------------------------------------
    def start_watchdog(self, timeout_ms):
        """Start the hardware watchdog; from now on ``feed()`` must come every ``timeout_ms``.

        It cannot be stopped again (not even by ``deinit``): only a reset does.
        """
        if self._wdt is None:
            self._wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        """Feed the watchdog (no-op before ``start_watchdog``)."""
        if self._wdt is not None:
            self._wdt.feed()

    def deinit(self):
        """Release the button IRQs and switch the LEDs off; the board is unusable after."""
        for pin in self._button_pins:
            pin.irq(handler=None)
        self._button_pins = []
        for led in self._leds:
            led.value(0)
        if self._status is not None:
            self._status.value(0)
