"""Captions under montage tiles and legends on overlays: text wrapped to a pixel width, never cut."""

from __future__ import annotations

from typing import Sequence


def caption_font(size: int = 11):
    """Pillow's bundled scalable font at ``size`` px (the bitmap default where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def line_height(font) -> int:
    """Pixels from one text line to the next."""
    box = font.getbbox("Hgy|")
    return int(box[3] - min(box[1], 0)) + 2


def wrap(font, text: str, width: int) -> list[str]:
    """``text`` split into lines no wider than ``width`` px: at spaces, or inside a word
    (ids like ``chula-255/460_47``) when one word alone is too wide."""
    lines: list[str] = []
    for word in str(text).split():
        cur = lines[-1] + " " + word if lines else word
        if lines and font.getlength(cur) <= width:
            lines[-1] = cur
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def wrap_all(font, texts: Sequence[str], width: int) -> list[str]:
    """Every text of ``texts`` wrapped, one after the other."""
    return [line for t in texts for line in wrap(font, t, width)]
