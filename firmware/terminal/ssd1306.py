"""Minimal SSD1306 OLED driver over I2C, on top of ``framebuf``.

Draw into ``fb`` (a ``framebuf.FrameBuffer``: ``fill``, ``text``, ``rect`` ...), then call
``show()`` to send the whole frame.  The caller passes an ``machine.I2C``-like object with
``writeto`` and ``writevto``; this module creates no hardware object itself.

The controller is driven in horizontal addressing mode: one frame is ``width * height / 8``
bytes, each byte a column of 8 pixels (LSB on top), pages of 8 rows from top to bottom, which
is exactly framebuf's ``MONO_VLSB`` layout.
"""

import framebuf
from micropython import const

# Commands (SSD1306 datasheet, section 9).
_SET_CONTRAST = const(0x81)
_DISPLAY_RAM = const(0xA4)  # show RAM contents (0xA5 would light every pixel)
_NORMAL = const(0xA6)  # 0xA7 inverts
_DISPLAY_OFF = const(0xAE)
_DISPLAY_ON = const(0xAF)
_SET_OFFSET = const(0xD3)
_SET_CLOCK = const(0xD5)
_SET_PRECHARGE = const(0xD9)
_SET_COM_PINS = const(0xDA)
_SET_VCOM_DESELECT = const(0xDB)
_SET_MUX = const(0xA8)
_SET_START_LINE = const(0x40)
_SET_ADDRESS_MODE = const(0x20)
_SET_COLUMNS = const(0x21)
_SET_PAGES = const(0x22)
_SEGMENT_REMAP = const(0xA1)  # column 127 is SEG0: the usual module orientation
_COM_SCAN_DOWN = const(0xC8)
_CHARGE_PUMP = const(0x8D)

# I2C control bytes: Co=0, D/C#=0 for a command, D/C#=1 for display data.
_CONTROL_COMMAND = const(0x00)
_CONTROL_DATA = const(0x40)


class SSD1306:
    """An SSD1306 panel of ``width`` x ``height`` pixels at ``address`` on ``i2c``."""

    def __init__(self, i2c, width=128, height=64, address=0x3C):
        self.i2c = i2c
        self.address = address
        self.width = width
        self.height = height
        self.pages = height // 8
        self.buffer = bytearray(self.pages * width)
        self.fb = framebuf.FrameBuffer(self.buffer, width, height, framebuf.MONO_VLSB)
        # Narrow panels (64x48, 72x40) sit in the middle of the controller's 128 columns.
        self.col_offset = (128 - width) // 2
        self._cmd = bytearray(2)
        self._cmd[0] = _CONTROL_COMMAND
        prefix = bytearray(1)
        prefix[0] = _CONTROL_DATA
        self._frame = [prefix, self.buffer]  # control byte + frame in one I2C write
        self.init()

    def command(self, *codes):
        """Send command bytes, one I2C transfer each (the controller accepts either)."""
        for code in codes:
            self._cmd[1] = code
            self.i2c.writeto(self.address, self._cmd)

    def init(self):
        """Configure the controller for this panel and switch it on, blank."""
        self.command(
            _DISPLAY_OFF,
            _SET_CLOCK, 0x80,  # default oscillator frequency, divide ratio 1
            _SET_MUX, self.height - 1,
            _SET_OFFSET, 0x00,
            _SET_START_LINE | 0,
            _CHARGE_PUMP, 0x14,  # internal charge pump: the 3.3 V modules have no VCC supply
            _SET_ADDRESS_MODE, 0x00,  # horizontal
            _SEGMENT_REMAP,
            _COM_SCAN_DOWN,
            _SET_COM_PINS, 0x12 if self.height > 32 else 0x02,
            _SET_CONTRAST, 0xCF,
            _SET_PRECHARGE, 0xF1,
            _SET_VCOM_DESELECT, 0x40,
            _DISPLAY_RAM,
            _NORMAL,
        )
        self.fb.fill(0)
        self.show()
        self.power(True)

    def power(self, on):
        """Switch the panel on or off (RAM is kept)."""
        self.command(_DISPLAY_ON if on else _DISPLAY_OFF)

    def contrast(self, value):
        """Set the brightness, 0..255."""
        self.command(_SET_CONTRAST, value & 0xFF)

    def show(self):
        """Send the frame buffer to the panel."""
        self.command(_SET_COLUMNS, self.col_offset, self.col_offset + self.width - 1,
                     _SET_PAGES, 0, self.pages - 1)
        self.i2c.writevto(self.address, self._frame)
