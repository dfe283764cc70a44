"""A tiny 5x7 bitmap font for the labels and slates the bridge draws into video (names on tiles, "waiting for
participants"). Capitals, digits and common punctuation; lower case is drawn as capitals and anything else as
'?'. Glyphs are 7 rows of 5 pixels ('#' set), one blank column between letters.

Hand-drawn here rather than a font library: a handful of glyphs at integer scale is all a phone's picture needs,
and it keeps text drawing to numpy on the luma plane.
"""

from __future__ import annotations

import functools

import numpy as np

GLYPH_W, GLYPH_H = 5, 7
ADVANCE = GLYPH_W + 1  # one blank column between glyphs

_GLYPHS: dict[str, str] = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# ##..# #.#.# #..## #...# #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "@": ".###. #...# #.### #.#.# #.### #.... .####",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "*": "..... #.#.# .###. ##### .###. #.#.# .....",
}


def _bitmap(rows: str) -> np.ndarray:
    bits = np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
    assert bits.shape == (GLYPH_H, GLYPH_W)
    return bits


GLYPHS = {char: _bitmap(rows) for char, rows in _GLYPHS.items()}


@functools.lru_cache(maxsize=256)  # names are drawn on every composite: render each once
def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """The pixels of ``text`` at integer ``scale``: a boolean array of 7*scale rows (shared: do not modify)."""
    chars = text.upper()
    width = max(0, len(chars) * ADVANCE - 1)
    mask = np.zeros((GLYPH_H, width), dtype=bool)
    for i, char in enumerate(chars):
        mask[:, i * ADVANCE : i * ADVANCE + GLYPH_W] = GLYPHS.get(char, GLYPHS["?"])
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * ADVANCE - 1) * scale


def fit_text(text: str, max_width: int, scale: int) -> str:
    """``text`` cut (with a trailing '.') so that it is at most ``max_width`` pixels wide."""
    if text_width(text, scale) <= max_width:
        return text
    keep = max(0, (max_width // scale + 1) // ADVANCE - 1)
    return text[:keep] + "." if keep else ""


def draw_text(plane: np.ndarray, x: int, y: int, text: str, scale: int, value: int) -> None:
    """Set the text's pixels of a plane (e.g. luma) to ``value``, clipped to the plane."""
    mask = text_mask(text, scale)
    height, width = plane.shape
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + mask.shape[1]), min(height, y + mask.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    region = plane[y0:y1, x0:x1]
    region[mask[y0 - y : y1 - y, x0 - x : x1 - x]] = value
