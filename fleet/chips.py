"""Pin facts of each supported ESP32 chip variant, as data.

`fleet.pinmaps` checks board pin maps against these facts.  Each chip is one `ChipFacts`
value in `CHIPS`; supporting another variant means adding one more value here (from the
chip's datasheet and the module's datasheet), not new code.

Sources: Espressif's ESP32 and ESP32-S3 datasheets (pin lists, strapping pins, ADC channels,
RTC/IO pull-ups) and the ESP32-WROOM-32 / ESP32-WROVER / ESP32-S3-WROOM-1 module datasheets
(pins wired to the in-package flash and PSRAM).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChipFacts:
    """What a pin map must respect on one chip variant.

    Each ``*_why`` mapping holds the reason shown to the installer for that pin.
    """

    chip: str
    """The ``chip`` value in a board file."""
    label: str
    """The name people use for the chip, in messages."""
    gpios: frozenset[int]
    """Every GPIO number that exists on the chip."""
    flash: dict[int, str]
    """Pins wired to the SPI flash (or PSRAM) inside every module: never usable."""
    psram: dict[int, tuple[frozenset[str], str]]
    """Pins taken by PSRAM on some modules: pin -> (``psram`` values that take it, why)."""
    input_only: frozenset[int]
    """Pins without an output driver: fine for buttons and ADC, never for LEDs or I2C."""
    no_pullup: frozenset[int]
    """Input pins without an internal pull-up (a button needs an external resistor)."""
    strapping: dict[int, str]
    """Pins sampled at reset to select the boot mode: usable, but with care."""
    reserved: dict[int, str]
    """Pins with another job on the board that a terminal needs: never usable."""
    caution: dict[int, str] = field(default_factory=dict)
    """Pins with another job that one can give up: usable, with a warning."""
    adc1: dict[int, int] = field(default_factory=dict)
    """ADC1 pins -> channel.  ADC2 cannot be read while Wi-Fi is on."""
    psram_kinds: frozenset[str] = frozenset({"none", "quad"})
    """Valid values of the board file's optional ``psram`` key."""


_ESP32_FLASH = "is connected to the SPI flash inside ESP32 modules"
_S3_FLASH = "is connected to the SPI flash and PSRAM inside ESP32-S3 modules"

ESP32 = ChipFacts(
    chip="esp32",
    label="ESP32",
    # GPIO 20, 24 and 28-31 do not exist on the ESP32.
    gpios=frozenset(set(range(0, 40)) - {20, 24, 28, 29, 30, 31}),
    flash={pin: _ESP32_FLASH for pin in range(6, 12)},
    psram={
        16: (frozenset({"quad"}), "is PSRAM chip select on ESP32-WROVER modules"),
        17: (frozenset({"quad"}), "is PSRAM clock on ESP32-WROVER modules"),
    },
    input_only=frozenset(range(34, 40)),
    no_pullup=frozenset(range(34, 40)),
    strapping={
        0: "selects download mode when held low at reset (BOOT button)",
        2: "must be low or floating at reset to enter download mode",
        5: "sets SDIO slave timing at reset",
        12: "selects the flash voltage at reset (MTDI); pulled high it stops a 3.3 V "
            "flash module from booting",
        15: "silences the boot log when low at reset (MTDO)",
    },
    reserved={
        1: "is UART0 TX: the serial console used to provision and debug the terminal",
        3: "is UART0 RX: the serial console used to provision and debug the terminal",
    },
    adc1={36: 0, 37: 1, 38: 2, 39: 3, 32: 4, 33: 5, 34: 6, 35: 7},
)

ESP32S3 = ChipFacts(
    chip="esp32s3",
    label="ESP32-S3",
    gpios=frozenset(set(range(0, 22)) | set(range(26, 49))),
    flash={pin: _S3_FLASH for pin in range(26, 33)},
    psram={
        pin: (frozenset({"octal"}),
              "is used by octal PSRAM or octal flash on ESP32-S3 modules such as "
              "ESP32-S3-WROOM-1 N8R8/N16R8")
        for pin in range(33, 38)
    },
    input_only=frozenset(),
    no_pullup=frozenset(),
    strapping={
        0: "selects download mode when held low at reset (BOOT button)",
        3: "selects the JTAG source at reset",
        45: "selects the flash voltage at reset (VDD_SPI)",
        46: "must be low at reset to enter download mode and controls the boot log",
    },
    reserved={},
    caution={
        19: "is USB D- (native USB: the MicroPython console on most ESP32-S3 boards)",
        20: "is USB D+ (native USB: the MicroPython console on most ESP32-S3 boards)",
        43: "is UART0 TX (the USB-UART bridge port on ESP32-S3-DevKitC-1)",
        44: "is UART0 RX (the USB-UART bridge port on ESP32-S3-DevKitC-1)",
    },
    adc1={pin: pin - 1 for pin in range(1, 11)},
    psram_kinds=frozenset({"none", "quad", "octal"}),
)

CHIPS: dict[str, ChipFacts] = {facts.chip: facts for facts in (ESP32, ESP32S3)}
"""Every supported chip, by the ``chip`` value of a board file."""
