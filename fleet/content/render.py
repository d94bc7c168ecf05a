"""Draw content texts into 1-bit screens: the question (with button labels) and the thanks.

Terminals have no fonts, so the fleet draws every screen here, once per display size, and
ships the pixels.  Text is laid out by Pillow's raqm engine (HarfBuzz shaping + FriBiDi), so
Arabic letters take their joined forms and run right to left; rendering refuses to run
without raqm rather than ship unshaped Arabic.  Pixels are drawn without anti-aliasing
(Pillow's ``fontmode "1"``), so what the PNG preview shows is exactly what the display shows.

Layout: the text is word-wrapped to the screen width (Chinese breaks between characters),
the largest font size within the screen's bounds that fits is chosen, and the block is
centred.  Button labels, when given, sit in a strip along the bottom edge, one column per
button, left to right as the buttons are.  A text that does not fit even at the smallest
size is refused with :class:`RenderError`, naming the language and the text.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, features

from fleet.content.fonts import Font, FontMissing, NoGlyph, font_for, needs_glyph

MARGIN = 2  # pixels kept clear at the screen's left and right edges
LINE_SPACING = 1.15  # line pitch as a multiple of the font size


@dataclass(frozen=True)
class Bounds:
    """Font sizes (pixels) a screen of one display size may use."""

    text_max: int
    text_min: int
    label_max: int
    label_min: int


# 10 px is the smallest size at which Latin, Arabic and Chinese stay legible in 1 bit.
BOUNDS: dict[tuple[int, int], Bounds] = {
    (128, 64): Bounds(text_max=22, text_min=10, label_max=12, label_min=10),
    (296, 128): Bounds(text_max=40, text_min=12, label_max=18, label_min=11),
}


class RenderError(ValueError):
    """A text that cannot be drawn: ``field`` names it (``languages.fi.question``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def require_raqm() -> None:
    """Refuse to render without raqm: basic layout would draw Arabic unjoined, left to right."""
    if not features.check("raqm"):
        raise RuntimeError("Pillow has no raqm layout engine (libraqm/libfribidi missing); "
                           "Arabic would be drawn unshaped. Install libfribidi0 "
                           "(bash scripts/install-system-packages.sh)")


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF
            or 0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x2FA1F)


# CJK punctuation that must not start a line: it stays with the character before it.
_NO_LINE_START = set("\uff0c\u3002\u3001\uff01\uff1f\uff1a\uff1b\uff09\u300d\u300f"
                     "\u300b\u3009\u30fb\u30fc\u2026,.!?:;)")


def _units(paragraph: str) -> list[tuple[str, bool]]:
    """Break opportunities of a paragraph: (unit, a space goes before it when joined)."""
    units: list[tuple[str, bool]] = []
    for n, word in enumerate(paragraph.split()):
        space = n > 0
        piece = ""
        for char in word:
            if _is_cjk(char) and char not in _NO_LINE_START:
                if piece:
                    units.append((piece, space))
                    space = False
                piece = char
            elif piece and _is_cjk(piece[-1]) and not _is_cjk(char):
                units.append((piece, space))
                space = False
                piece = char
            else:
                piece += char
        if piece:
            units.append((piece, space))
    return units


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str] | None:
    """Lines of ``text`` no wider than ``width``; None when a single unit is wider."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for unit, space in _units(paragraph):
            candidate = line + (" " if space and line else "") + unit
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if not line or font.getlength(unit) > width:
                return None
            lines.append(line)
            line = unit
        lines.append(line)
    return lines


@dataclass(frozen=True)
class _Block:
    font: ImageFont.FreeTypeFont
    lines: list[str]
    pitch: int


def _fit(text: str, font: Font, width: int, height: int, largest: int,
         smallest: int, language: str) -> _Block | None:
    """The largest size (largest..smallest) whose wrapped lines fit width x height."""
    draw = ImageDraw.Draw(Image.new("1", (1, 1)))
    for size in range(largest, smallest - 1, -1):
        face = _font(str(font.path), size)
        lines = wrap(text, face, width)
        if lines is None:
            continue
        pitch = round(size * LINE_SPACING)
        if len(lines) * pitch > height:
            continue
        # Ink can reach beyond the nominal line (Arabic marks, tall accents): check it.
        top, bottom = _ink_span(draw, face, lines, pitch, language)
        if bottom - top <= height:
            return _Block(face, lines, pitch)
    return None


def _ink_span(draw: ImageDraw.ImageDraw, face: ImageFont.FreeTypeFont, lines: list[str],
              pitch: int, language: str) -> tuple[int, int]:
    """Top and bottom pixel rows of the lines' ink when the first baseline is at y = 0."""
    boxes = [draw.textbbox((0, n * pitch), line, font=face, anchor="ls", language=language)
             for n, line in enumerate(lines) if line]
    if not boxes:
        return 0, 0
    return int(min(b[1] for b in boxes)), int(max(b[3] for b in boxes))


def _draw_block(draw: ImageDraw.ImageDraw, block: _Block, left: int, top: int, width: int,
                height: int, language: str) -> None:
    """Draw ``block`` centred in the box (left, top, width, height)."""
    ink_top, ink_bottom = _ink_span(draw, block.font, block.lines, block.pitch, language)
    baseline = top + (height - (ink_bottom - ink_top)) // 2 - ink_top
    centre = left + width // 2
    for n, line in enumerate(block.lines):
        if line:
            draw.text((centre, baseline + n * block.pitch), line, fill=255, font=block.font,
                      anchor="ms", language=language)


def _pick_font(text: str, field: str) -> Font:
    if not any(needs_glyph(c) for c in text):
        raise RenderError(field, "has no visible character")
    try:
        return font_for(text)
    except NoGlyph as exc:
        raise RenderError(field, f"{exc}; such text cannot be shown") from None
    except FontMissing as exc:
        raise RuntimeError(str(exc)) from None


def _screen(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    require_raqm()
    if (width, height) not in BOUNDS:
        raise ValueError(f"no layout for a {width}x{height} display")
    image = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: every pixel is on or off
    return image, draw


def render_text_screen(text: str, width: int, height: int, *, language: str,
                       field: str) -> Image.Image:
    """A screen holding ``text`` alone, as large as fits (the thank-you screen)."""
    image, draw = _screen(width, height)
    bounds = BOUNDS[(width, height)]
    block = _fit(text, _pick_font(text, field), width - 2 * MARGIN, height, bounds.text_max,
                 bounds.text_min, language)
    if block is None:
        raise RenderError(field, f"does not fit a {width}x{height} display even at "
                                 f"{bounds.text_min} px; shorten it")
    _draw_block(draw, block, MARGIN, 0, width - 2 * MARGIN, height, language)
    return image


def render_question_screen(question: str, labels: list[str] | None, width: int, height: int,
                           *, language: str, field: str) -> Image.Image:
    """The question, centred above a strip with one label per button (when labels given)."""
    image, draw = _screen(width, height)
    bounds = BOUNDS[(width, height)]
    area = height
    if labels:
        column = width // len(labels)
        sizes: list[_Block] = []
        faces = [_pick_font(label, f"{field.rsplit('.', 1)[0]}.labels.{n}")
                 for n, label in enumerate(labels)]
        # One size for every label (the largest all of them fit), so the row looks even.
        for size in range(bounds.label_max, bounds.label_min - 1, -1):
            sizes = []
            for label, face in zip(labels, faces, strict=True):
                block = _fit(label, face, column, size * 2, size, size, language)
                if block is None or len(block.lines) > 1:
                    break
                sizes.append(block)
            if len(sizes) == len(labels):
                break
        if len(sizes) != len(labels):
            bad = len(sizes)
            raise RenderError(f"{field.rsplit('.', 1)[0]}.labels.{bad}",
                              f"label {labels[bad]!r} does not fit one of {len(labels)} "
                              f"columns of {column} px even at {bounds.label_min} px; shorten "
                              "it")
        # One baseline for the row, below the highest ink of any label; the strip is as tall
        # as the lowest ink reaches, so no descender is cut off.
        spans = [_ink_span(draw, b.font, b.lines, b.pitch, language) for b in sizes]
        ink_top = min(span[0] for span in spans)
        strip = max(span[1] for span in spans) - ink_top + 3
        area = height - strip
        draw.line([(0, area), (width - 1, area)], fill=255)  # separates question and labels
        for n, (label, block) in enumerate(zip(labels, sizes, strict=True)):
            draw.text((n * column + column // 2, area + 2 - ink_top), label, fill=255,
                      font=block.font, anchor="ms", language=language)
    block = _fit(question, _pick_font(question, field), width - 2 * MARGIN, area - 1,
                 bounds.text_max, bounds.text_min, language)
    if block is None:
        raise RenderError(field, f"does not fit a {width}x{height} display"
                                 f"{' above the labels' if labels else ''} even at "
                                 f"{bounds.text_min} px; shorten it")
    _draw_block(draw, block, MARGIN, 0, width - 2 * MARGIN, area - 1, language)
    return image


# --------------------------------------------------------------------- pixel formats

# Reverses the bits of a byte: PIL packs the leftmost pixel in the high bit, MONO_VLSB wants
# the topmost pixel in the low bit.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def to_mono_vlsb(image: Image.Image) -> bytes:
    """The framebuf ``MONO_VLSB`` bytes of a 1-bit image (byte ``page * w + x``, bit ``y % 8``).

    The image is transposed so that each column becomes a packed row whose bytes are 8
    vertical pixels each, then every byte is bit-reversed and the bytes are reordered page by
    page.
    """
    width, height = image.size
    if height % 8:
        raise ValueError(f"display height {height} is not a multiple of 8")
    columns = image.convert("1").transpose(Image.Transpose.TRANSPOSE).tobytes()
    pages = height // 8
    out = bytearray(width * pages)
    for x in range(width):
        for page in range(pages):
            out[page * width + x] = _REVERSED[columns[x * pages + page]]
    return bytes(out)


def from_mono_vlsb(data: bytes, width: int, height: int) -> Image.Image:
    """The 1-bit image of ``MONO_VLSB`` bytes (the inverse of :func:`to_mono_vlsb`)."""
    pages = height // 8
    if len(data) != width * pages:
        raise ValueError(f"{len(data)} bytes is not a {width}x{height} MONO_VLSB screen")
    columns = bytearray(width * pages)
    for x in range(width):
        for page in range(pages):
            columns[x * pages + page] = _REVERSED[data[page * width + x]]
    transposed = Image.frombytes("1", (height, width), bytes(columns))
    return transposed.transpose(Image.Transpose.TRANSPOSE)


def png_bytes(image: Image.Image, scale: int = 1) -> bytes:
    """``image`` as PNG, each pixel drawn as a ``scale`` x ``scale`` square."""
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale),
                             Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
