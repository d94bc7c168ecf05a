"""The content package format (docs/content.md), parsed and checked as a terminal needs.

``PLC1``, u16 version, u16 reserved, u32 header length, a JSON header and the bitmap area
(MONO_VLSB screens).  ``load`` checks everything the terminal relies on, so a package that
passes can be shown without further checks; problems raise ``PackageError`` whose
``reason`` is a ``reported`` reason (``bad_package``, ``wrong_display``).

Imported through ``terminal.content.load`` only while a package is checked (at boot and once
per update) and forgotten afterwards: its code need not stay on the heap.
"""

import json

from terminal.content import Content, PackageError

MAGIC = b"PLC1"
PREFIX_BYTES = 12  # magic, u16 version, u16 reserved, u32 header length
HEADER_MAX = 4096  # bytes of JSON header a terminal is willing to parse
IDLE_MODES = ("on", "dim", "off")
OUTSIDE_MODES = ("dim", "off")
# settings a package may carry: (min, max) per key, the terminal's own ranges.
SETTING_RANGES = {"min_gap_ms": (0, 3600000), "burst_count": (0, 64),
                  "burst_window_ms": (0, 3600000), "burst_quiet_ms": (0, 3600000),
                  "brightness": (0, 255)}



def _int(value, low, high):
    return (isinstance(value, int) and not isinstance(value, bool)
            and low <= value <= high)


def _bad(detail):
    raise PackageError("bad_package", detail)


def parse_prefix(prefix):
    """``(version, header_length)`` from the first 12 bytes; PackageError if malformed."""
    if len(prefix) < PREFIX_BYTES or bytes(prefix[:4]) != MAGIC:
        _bad("no PLC1 magic")
    version = prefix[4] | prefix[5] << 8
    if prefix[6] or prefix[7]:
        _bad("reserved field is not 0")
    length = int.from_bytes(prefix[8:12], "little")
    if not 2 <= length <= HEADER_MAX:
        _bad("header length %d out of range" % length)
    return version, length


def _check_hours(hours):
    if not isinstance(hours, dict):
        _bad("hours is not an object")
    week = hours.get("week")
    if not isinstance(week, list):
        _bad("hours.week is not a list")
    for item in week:
        if (not isinstance(item, list) or len(item) != 3 or not _int(item[0], 0, 6)
                or not _int(item[1], 0, 1440) or not _int(item[2], 0, 1440)
                or item[1] > item[2]):
            _bad("hours.week entry %r is not [weekday 0-6, start, end minute]" % (item,))
    tz = hours.get("tz")
    if not isinstance(tz, list) or not tz:
        _bad("hours.tz is not a non-empty list")
    last = None
    for item in tz:
        if (not isinstance(item, list) or len(item) != 2 or not _int(item[0], 0, 1 << 53)
                or not _int(item[1], -1440, 1440) or (last is not None and item[0] <= last)):
            _bad("hours.tz entry %r is not an ascending [from_utc_ms, offset_min]" % (item,))
        last = item[0]
    if hours.get("outside") not in OUTSIDE_MODES:
        _bad("hours.outside must be dim or off")


def check_header(header, version, bitmap_bytes, width, height):
    """Validate a parsed header against the prefix version, the bitmap area size and this
    terminal's display; raise PackageError (``wrong_display`` for another display size)."""
    if not isinstance(header, dict):
        _bad("header is not a JSON object")
    if header.get("version") != version:
        _bad("header version differs from the prefix")
    display = header.get("display")
    if not isinstance(display, dict):
        _bad("display missing")
    if display.get("w") != width or display.get("h") != height:
        raise PackageError("wrong_display", "package is for %sx%s, this display is %dx%d"
                           % (display.get("w"), display.get("h"), width, height))
    languages = header.get("languages")
    if (not isinstance(languages, list) or not languages
            or not all(isinstance(lang, str) for lang in languages)):
        _bad("languages must be a non-empty list of codes")
    show = header.get("show")
    if show != "rotate" and show not in languages:
        _bad("show must be rotate or one of the languages")
    if not _int(header.get("rotate_s", 8), 1, 3600):
        _bad("rotate_s must be 1..3600")
    size = width * height // 8
    screens = header.get("screens")
    if not isinstance(screens, dict):
        _bad("screens missing")
    for kind in ("question", "thanks"):
        table = screens.get(kind)
        if not isinstance(table, dict):
            _bad("screens.%s missing" % kind)
        for lang in languages:
            offset = table.get(lang)
            if not _int(offset, 0, bitmap_bytes - size):
                _bad("screens.%s.%s is not a screen inside the bitmap area" % (kind, lang))
    settings = header.get("settings", {})
    if not isinstance(settings, dict):
        _bad("settings is not an object")
    for key in settings:
        value = settings[key]
        if key == "idle":
            if value not in IDLE_MODES:
                _bad("settings.idle must be on, dim or off")
        elif key not in SETTING_RANGES or not _int(value, *SETTING_RANGES[key]):
            _bad("settings.%s is unknown or out of range" % key)
    if "hours" in header:
        _check_hours(header["hours"])


def load(path, width, height):
    """Parse and bounds-check the package at ``path``; return a ``Content``.

    Raises PackageError for a malformed package and OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        prefix = f.read(PREFIX_BYTES)
        version, length = parse_prefix(prefix)
        raw = f.read(length)
        total = f.seek(0, 2)
    if len(raw) != length:
        _bad("header truncated")
    try:
        header = json.loads(raw)
    except ValueError:
        _bad("header is not JSON")
    bitmap_at = PREFIX_BYTES + length
    check_header(header, version, total - bitmap_at, width, height)
    return Content(path, version, header, bitmap_at)
