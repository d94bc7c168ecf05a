"""Text layout for the terminal's 1-bit display, shared by the real and simulated boards.

Drawing goes through a ``framebuf.FrameBuffer`` (MicroPython's built-in 8x8 font), so the
simulated board under MicroPython holds exactly the pixels the OLED would show.
"""

CHAR_W = 8  # framebuf's built-in font
CHAR_H = 8
LINE_H = CHAR_H + 2


def wrap(text, columns):
    """Split ``text`` into lines of at most ``columns`` characters, at spaces if possible."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            while len(word) > columns:  # a word longer than the screen: cut it
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:columns])
                word = word[columns:]
            if not line:
                line = word
            elif len(line) + 1 + len(word) <= columns:
                line += " " + word
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def render(fb, width, height, lines):
    """Clear ``fb`` and draw ``lines`` wrapped to the width and centred both ways."""
    rows = []
    for line in lines:
        rows.extend(wrap(line, width // CHAR_W))
    rows = rows[:height // LINE_H]
    fb.fill(0)
    top = (height - len(rows) * LINE_H) // 2
    for n, row in enumerate(rows):
        x = (width - CHAR_W * len(row)) // 2
        fb.text(row, x if x > 0 else 0, top + 1 + n * LINE_H, 1)
    return rows
