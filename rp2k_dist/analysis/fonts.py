"""Fonts for figure text: RP2K's class names are Chinese (``伊利纯牛奶250ml``).

matplotlib ships one family, DejaVu Sans, which has no CJK glyphs. Figures are drawn with
``font.family = [DejaVu Sans, <an installed CJK family>]``: since matplotlib 3.6 a list of
families is a per-glyph fallback chain (matplotlib's "Fonts demo (fallback)"), so Latin text
keeps DejaVu Sans and Chinese characters come from the CJK font. The CJK font is looked up
once per process (:func:`cjk_font`) among the families in :data:`CJK_FAMILIES`.

Without such a font, a name whose characters the fonts cannot draw is never drawn as boxes:
:func:`figure_text` replaces it by an id the caller gives (a class's index or SKU, a
category's position), and one :class:`MissingGlyphsWarning` per process says which package
to install (:data:`INSTALL_HINT`). matplotlib's own "Glyph ... missing from font(s)"
warnings inside a plot are folded into that one warning (:func:`readable_fonts`).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

#: matplotlib's default family, shipped with it (Latin, Greek, Cyrillic; no CJK).
BASE_FAMILY = "DejaVu Sans"
#: Families with CJK glyphs, in order of preference (Simplified Chinese first): Noto CJK
#: and its twin Source Han, then the fonts Linux distributions, Android, Windows and
#: macOS install.
CJK_FAMILIES: tuple[str, ...] = (
    "Noto Sans CJK SC", "Source Han Sans SC", "Source Han Sans CN", "Noto Sans SC",
    "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK HK", "Noto Sans CJK KR",
    "Source Han Sans", "Source Han Sans TC", "Source Han Sans JP",
    "Noto Serif CJK SC", "Source Han Serif SC", "Source Han Serif CN", "Noto Serif SC",
    "Noto Serif CJK JP", "Noto Serif CJK TC", "Noto Serif CJK KR",
    "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN",
    "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS",
)
#: Lower-case parts of those fonts' file names, to find one installed after matplotlib
#: cached its font list (it scans the system's fonts once and reuses that list).
CJK_FILE_PARTS: tuple[str, ...] = (
    "notosanscjk", "notoserifcjk", "sourcehansans", "sourcehanserif", "notosanssc", "notoserifsc",
    "wqy-microhei", "wqy-zenhei", "droidsansfallback", "uming", "ukai", "msyh", "simhei", "pingfang",
)
#: How to install a CJK font, per operating system.
INSTALL_HINT = ("Debian/Ubuntu: sudo apt-get install fonts-noto-cjk; Fedora: sudo dnf install "
                "google-noto-sans-cjk-fonts; Arch: sudo pacman -S noto-fonts-cjk; Alpine: apk add font-noto-cjk")
#: matplotlib's warning for a character no font of the family draws.
GLYPH_WARNING = re.compile(r"Glyph \d+\b.*missing from")


class MissingGlyphsWarning(UserWarning):
    """Figure text had characters no font of :func:`font_family` draws; it was replaced."""


@dataclass(frozen=True)
class Font:
    """One installed font: its family name and file."""

    family: str
    path: str


def choose_cjk_font(fonts: Iterable[Font]) -> Font | None:
    """The font of the first of :data:`CJK_FAMILIES` among ``fonts``; None if none is."""
    by_family: dict[str, Font] = {}
    for font in fonts:
        by_family.setdefault(font.family, font)
    return next((by_family[name] for name in CJK_FAMILIES if name in by_family), None)


def installed_fonts() -> list[Font]:
    """matplotlib's font list, plus the CJK font files on the system that it lacks (a
    font installed after matplotlib cached its list is added to it)."""
    from matplotlib import font_manager

    def listed() -> list[Font]:
        return [Font(entry.name, entry.fname) for entry in font_manager.fontManager.ttflist]

    fonts = listed()
    if choose_cjk_font(fonts) is None:
        known = {font.path for font in fonts}
        added = [path for path in font_manager.findSystemFonts()
                 if path not in known and any(part in Path(path).name.lower() for part in CJK_FILE_PARTS)]
        for path in added:
            font_manager.fontManager.addfont(path)
        if added:
            fonts = listed()
    return fonts


@functools.cache
def cjk_font() -> Font | None:
    """The installed CJK font figures fall back to (looked up once per process)."""
    return choose_cjk_font(installed_fonts())


def font_family() -> list[str]:
    """``font.family`` for figures: :data:`BASE_FAMILY`, then the CJK font if any."""
    font = cjk_font()
    return [BASE_FAMILY] + ([font.family] if font else [])


@functools.cache
def drawable_codepoints() -> frozenset[int]:
    """Unicode code points that some font of :func:`font_family` has a glyph for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    paths = [font_manager.findfont(font_manager.FontProperties(family=BASE_FAMILY))]
    if (font := cjk_font()) is not None:
        paths.append(font.path)
    return frozenset(chain.from_iterable(FT2Font(path).get_charmap() for path in paths))


def drawable(text: str) -> bool:
    """Whether every visible character of ``text`` has a glyph in :func:`font_family`."""
    codepoints = drawable_codepoints()
    return all(ord(c) in codepoints for c in text if c.isprintable() and not c.isspace())


_warned = False


def warn_missing_glyphs(example: str = "") -> None:
    """One :class:`MissingGlyphsWarning` per process (later calls do nothing)."""
    global _warned
    if _warned:
        return
    _warned = True
    font = cjk_font()
    shown = f" (e.g. {example!r})" if example else ""
    if font is None:
        message = (f"no CJK font is installed, so figures show class and category names with Chinese (or other "
                   f"non-Latin) characters{shown} by index or SKU instead. Install one to see the names: "
                   f"{INSTALL_HINT}")
    else:
        message = (f"some figure text has characters that neither {BASE_FAMILY} nor {font.family} draws{shown}; "
                   "such names are shown by index or SKU instead")
    warnings.warn(message, MissingGlyphsWarning, stacklevel=3)


def figure_text(text: str, fallback: str) -> str:
    """``text`` where the fonts draw all of it, else ``fallback`` (an index or SKU)."""
    if drawable(text):
        return text
    warn_missing_glyphs(text)
    return fallback


def reset_fonts() -> None:
    """Look the fonts up again (after installing one in a running interpreter) and allow the
    warning once more."""
    global _warned
    cjk_font.cache_clear()
    drawable_codepoints.cache_clear()
    _warned = False


def readable_fonts(plot: Callable[P, R]) -> Callable[P, R]:
    """Draw ``plot``'s text with :func:`font_family` (fonts are fixed when text is made);
    matplotlib's missing-glyph warnings become the one :class:`MissingGlyphsWarning`."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context({"font.family": font_family()}), warnings.catch_warnings(record=True) as caught:
            # recorded, whatever the filters say (even "error"), and reported once below
            warnings.filterwarnings("always", message=GLYPH_WARNING.pattern, category=UserWarning)
            result = plot(*args, **kwargs)
        missing = False
        for warning in caught:
            if GLYPH_WARNING.search(str(warning.message)):
                missing = True
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                       source=warning.source)
        if missing:
            warn_missing_glyphs()
        return result

    return wrapper
