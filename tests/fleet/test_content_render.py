"""Rendering content texts into 1-bit screens (fleet/content/render.py) with real fonts.

Golden PNGs: tests/fleet/golden/content/<lang>-<display>-<screen>.png, made by this project's
own renderer and compared pixel for pixel.  After an intended change of the rendering, look
at the new images and regenerate them with

    PALAUTE_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/fleet/test_content_render.py

(never automatic: without the variable a difference fails the test).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont, features

from fleet.content import render
from fleet.content.fonts import FONTS, NoGlyph, font_for

GOLDEN = Path(__file__).parent / "golden" / "content"
REGENERATE = os.environ.get("PALAUTE_REGEN_GOLDEN") == "1"

TEXTS: dict[str, tuple[str, str, list[str] | None]] = {
    "fi": ("Miten onnistuimme tänään?", "Kiitos palautteestasi!", ["Huono", "Ok", "Hyvä",
                                                                    "Upea"]),
    "sv": ("Hur nöjd är du med besöket?", "Tack för din feedback!", None),
    "en": ("How was your visit today?", "Thank you!", ["Bad", "OK", "Good"]),
    "ar": ("كيف كانت زيارتك اليوم؟", "شكرا لك!", ["سيء", "جيد", "ممتاز"]),
    "zh": ("您对今天的服务满意吗？", "谢谢您的反馈！", None),
}


def _screen(language: str, size: tuple[int, int], screen: str) -> Image.Image:
    question, thanks, labels = TEXTS[language]
    field = f"languages.{language}.{screen}"
    if screen == "question":
        return render.render_question_screen(question, labels, *size, language=language,
                                             field=field)
    return render.render_text_screen(thanks, *size, language=language, field=field)


def test_layout_engine_shapes_text() -> None:
    assert features.check("raqm"), "Pillow lacks raqm: install libfribidi0"
    render.require_raqm()


@pytest.mark.parametrize("screen", ["question", "thanks"])
@pytest.mark.parametrize("size", [(128, 64), (296, 128)], ids=["128x64", "296x128"])
@pytest.mark.parametrize("language", list(TEXTS))
def test_screen_matches_golden_png(language: str, size: tuple[int, int], screen: str) -> None:
    image = _screen(language, size, screen)
    assert image.mode == "1" and image.size == size
    path = GOLDEN / f"{language}-{size[0]}x{size[1]}-{screen}.png"
    if REGENERATE:
        path.write_bytes(render.png_bytes(image))
    assert path.exists(), f"{path} missing: regenerate with PALAUTE_REGEN_GOLDEN=1"
    golden = Image.open(path)
    assert golden.size == size
    difference = ImageChops.logical_xor(golden.convert("1"), image).getbbox()
    assert difference is None, f"{path.name} differs from the rendering in {difference}"
    # Crisp 1-bit pixels: a real amount of ink and nothing but black and white.
    histogram = image.histogram()
    assert sum(histogram) == histogram[0] + histogram[255]
    assert 0.01 * size[0] * size[1] < histogram[255] < 0.5 * size[0] * size[1]


def test_goldens_are_all_used() -> None:
    expected = {f"{lang}-{w}x{h}-{screen}.png" for lang in TEXTS
                for w, h in ((128, 64), (296, 128)) for screen in ("question", "thanks")}
    assert {p.name for p in GOLDEN.glob("*.png")} == expected


def _draw(text: str, layout: ImageFont.Layout = ImageFont.Layout.RAQM) -> Image.Image:
    face = ImageFont.truetype(str(font_for(text).path), 32, layout_engine=layout)
    image = Image.new("1", (220, 60), 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"
    draw.text((110, 45), text, fill=255, font=face, anchor="ms")
    return image


def _ink(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return image.crop(box).histogram()[255]


def test_arabic_is_joined_and_right_to_left() -> None:
    word = "سلام"
    # Zero-width non-joiners keep the same letters in the same order but forbid joining:
    # shaping draws joined letter forms only for the plain word.
    unjoined = "\u200c".join(word)
    assert ImageChops.logical_xor(_draw(word), _draw(unjoined)).getbbox() is not None
    # Pillow's basic layout neither shapes nor reorders: the renderer's output must differ.
    assert ImageChops.logical_xor(
        _draw(word), _draw(word, ImageFont.Layout.BASIC)).getbbox() is not None
    # Right to left: of two words, the first one read (a thin alef) sits at the right, the
    # second (a round meem) at the left; basic layout puts them the other way round.
    pair = "ا م"
    left, right = (0, 0, 110, 60), (110, 0, 220, 60)
    shaped = _draw(pair)
    assert _ink(shaped, right) < _ink(shaped, left)
    unshaped = _draw(pair, ImageFont.Layout.BASIC)
    assert _ink(unshaped, left) < _ink(unshaped, right)


def test_wrap_breaks_chinese_between_characters_and_keeps_punctuation() -> None:
    face = render._font(str(FONTS[2].path), 16)
    lines = render.wrap("您对今天的服务满意吗？", face, 60)
    assert lines is not None and len(lines) > 1
    assert "".join(lines) == "您对今天的服务满意吗？"
    assert not any(line.startswith("？") for line in lines)


def test_missing_glyphs_and_mixed_scripts_are_refused() -> None:
    with pytest.raises(NoGlyph, match=r"U\+1200"):
        font_for("ሀሁ")  # Ethiopic: no configured font has it
    with pytest.raises(NoGlyph, match="mixes scripts"):
        font_for("Hello مرحبا")
    with pytest.raises(render.RenderError, match=r"languages\.am\.question: no font"):
        render.render_question_screen("ሀሁ", None, 128, 64, language="am",
                                      field="languages.am.question")


def test_text_that_cannot_fit_is_refused_naming_it() -> None:
    long = " ".join(["Palaute"] * 60)
    with pytest.raises(render.RenderError, match=r"languages\.fi\.thanks: does not fit a "
                                                 r"128x64 display even at 10 px"):
        render.render_text_screen(long, 128, 64, language="fi", field="languages.fi.thanks")
    with pytest.raises(render.RenderError, match=r"languages\.fi\.labels\.2: label"):
        render.render_question_screen("?", ["a", "b", "Erinomainen", "d"], 128, 64,
                                      language="fi", field="languages.fi.question")


def test_mono_vlsb_bit_order_and_round_trip() -> None:
    image = Image.new("1", (128, 64), 0)
    image.putpixel((3, 10), 1)
    image.putpixel((127, 63), 1)
    data = render.to_mono_vlsb(image)
    assert len(data) == 1024
    assert data[1 * 128 + 3] == 1 << 2  # page 1, column 3, bit 10 % 8
    assert data[7 * 128 + 127] == 1 << 7
    assert sum(1 for b in data if b) == 2
    screen = _screen("ar", (296, 128), "question")
    assert render.from_mono_vlsb(render.to_mono_vlsb(screen), 296, 128).tobytes() == \
        screen.tobytes()


def test_png_scale_draws_square_pixels() -> None:
    image = Image.new("1", (128, 64), 0)
    image.putpixel((1, 1), 1)
    scaled = Image.open(io.BytesIO(render.png_bytes(image, scale=3)))
    assert scaled.size == (384, 192)
    assert scaled.convert("1").getbbox() == (3, 3, 6, 6)
