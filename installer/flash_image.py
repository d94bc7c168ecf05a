"""MicroPython firmware images for ESP chips: which chip an image is for, and where it goes.

A MicroPython ``.bin`` from micropython.org/download is a *merged* image: the second-stage
bootloader, the partition table and the MicroPython application in one file, written at the
chip's bootloader offset.  The file starts with the ESP image header (esptool's
"Firmware Image Format"; multi-byte fields little-endian):

- byte 0: magic ``0xE9``; 1: segment count; 2: SPI flash mode; 3: flash size and frequency;
  4-7: entry point;
- bytes 8-23, the extended header: WP pin (8), SPI pin drive (9-11), **chip id (12-13)**,
  minimum revision (14-16), maximum revision (17-18), reserved (19-22), hash appended (23).

The chip id is the one the ROM bootloader checks (ESP32 0x0000, ESP32-S3 0x0009).  The
partition table sits at flash address 0x8000 and starts with ``0xAA 0x50``; an image without
it there is an application alone (as an ESP-IDF build leaves in ``build/``), which would not
boot if written at the bootloader offset.

Chip names, image chip ids and bootloader offsets come from esptool's own chip definitions
(``esptool.targets.CHIP_DEFS``), so they cannot drift from the flasher that writes the image.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from installer.raw_repl import InstallerError

SUPPORTED_CHIPS = ("esp32", "esp32s3")
"""The chips Palaute terminals use (hardware/boards/*.json), in esptool's spelling."""
IMAGE_MAGIC = 0xE9
HEADER_BYTES = 24
"""The common (8) and extended (16) image headers."""
CHIP_ID_OFFSET = 12
PARTITION_TABLE_ADDRESS = 0x8000
PARTITION_TABLE_MAGIC = b"\xaa\x50"
DOWNLOAD_HINT = "download the firmware .bin for your board from https://micropython.org/download/"


class ImageError(InstallerError):
    """The image file is missing, unreadable, or not a complete ESP firmware image."""


class ChipMismatch(InstallerError):
    """The image, the ``--chip`` option and the chip on the board do not all agree."""


@dataclass(frozen=True)
class Chip:
    """One chip family: esptool's name for it, its display name, image chip id and the
    flash offset a merged image (bootloader first) is written at."""

    key: str
    name: str
    image_chip_id: int
    offset: int


@cache
def chips() -> dict[str, Chip]:
    """The supported chips by key (``esp32``, ``esp32s3``), built from esptool's tables."""
    # Imported here: esptool pulls in click and rich; `palaute` commands that never flash
    # should not pay for that at start-up.
    from esptool.targets import CHIP_DEFS

    return {key: Chip(key=key, name=str(CHIP_DEFS[key].CHIP_NAME),
                      image_chip_id=int(CHIP_DEFS[key].IMAGE_CHIP_ID),
                      offset=int(CHIP_DEFS[key].BOOTLOADER_FLASH_OFFSET))
            for key in SUPPORTED_CHIPS}


def chip_by_name(name: str) -> Chip | None:
    """The supported chip esptool calls ``name`` (``ESP32-S3``), or None."""
    return next((chip for chip in chips().values() if chip.name == name), None)


def chip_name_for_image_id(chip_id: int) -> str:
    """esptool's name for the chip an image with this chip id is for (any chip esptool knows,
    supported or not), or ``chip id 0x...`` if it knows none."""
    from esptool.targets import CHIP_DEFS

    for cls in CHIP_DEFS.values():
        # ESP8266 images have no extended header and its class no IMAGE_CHIP_ID.
        if getattr(cls, "IMAGE_CHIP_ID", None) == chip_id:
            return str(cls.CHIP_NAME)
    return f"chip id {chip_id:#06x}"


@dataclass(frozen=True)
class FirmwareImage:
    """A firmware image file that passed the header checks."""

    path: Path
    data: bytes
    chip_id: int
    chip_name: str
    """esptool's name for the image's chip, e.g. ``ESP32-S3``."""

    @property
    def chip(self) -> Chip | None:
        """The supported chip the image is for, or None (built for another chip)."""
        return chip_by_name(self.chip_name)


def read_image(path: Path | str) -> FirmwareImage:
    """Read and check a MicroPython firmware image; :class:`ImageError` says what is wrong.

    Checks the magic byte and reads the chip id from the extended header; for the supported
    chips it also checks that the partition table is where a merged image has it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ImageError(f"image {path} not found: {DOWNLOAD_HINT}") from None
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if len(data) < HEADER_BYTES or data[0] != IMAGE_MAGIC:
        raise ImageError(f"{path} is not an ESP firmware image (it does not start with the "
                         f"image header, magic byte 0xE9): use the .bin file, not .elf, .uf2, "
                         f".hex or .zip; {DOWNLOAD_HINT}")
    (chip_id,) = struct.unpack_from("<H", data, CHIP_ID_OFFSET)
    image = FirmwareImage(path=path, data=data, chip_id=chip_id,
                          chip_name=chip_name_for_image_id(chip_id))
    chip = image.chip
    if chip is not None:
        table = PARTITION_TABLE_ADDRESS - chip.offset
        if data[table:table + len(PARTITION_TABLE_MAGIC)] != PARTITION_TABLE_MAGIC:
            raise ImageError(f"{path} is an {chip.name} application image without bootloader "
                             f"and partition table (none at {PARTITION_TABLE_ADDRESS:#x}): "
                             f"use the complete firmware .bin; {DOWNLOAD_HINT}")
    return image


def check_image_chip(image: FirmwareImage, chip: Chip, *, where: str) -> None:
    """Raise :class:`ChipMismatch` unless ``image`` is built for ``chip``.

    ``where`` introduces the chip in the message: ``"the board is an"`` or
    ``"--chip asks for an"`` (every supported chip name starts with a vowel sound).
    """
    if image.chip_id != chip.image_chip_id:
        raise ChipMismatch(f"{image.path.name} is built for {image.chip_name}, but {where} "
                           f"{chip.name}: use the MicroPython image for {chip.name}; "
                           f"{DOWNLOAD_HINT}")
