"""Figures stay readable from 3 to 300 categories: legends inside the canvas, no
overlapping labels, grey 'other' beyond 20 colours, confused pairs named; Chinese names
drawn with a CJK font, or replaced by ids with one warning where none is installed."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from rp2k_dist.analysis import fonts
from rp2k_dist.analysis.figures import GREY, MAX_COLOURS, category_colours, short
from rp2k_dist.analysis.plots import plot_categories
from rp2k_dist.analysis.umap_plot import plot_umap
from rp2k_dist.evaluation.metrics import AccuracyRow, AccuracyTable


def _names(n: int) -> list[str]:
    return [f"category {i:03d}" + (" with a long catalogue name" if i % 7 == 0 else "") for i in range(n)]


def _umap_frame(n: int, rng) -> pd.DataFrame:
    names = _names(n)
    sizes = np.maximum(1, (400 / (1 + np.arange(n)) ** 0.7).astype(int))  # long-tailed
    values = np.repeat(names, sizes)
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(values))], "type": values,
                         "shape": rng.permutation(values), "umap_x": rng.normal(size=len(values)),
                         "umap_y": rng.normal(size=len(values))})




def _no_overlap(boxes) -> bool:
    return not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def _check_inside(figure: Figure) -> None:
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    canvas = figure.bbox
    legends = [legend for axes in figure.axes if (legend := axes.get_legend())]
    assert legends
    for legend in legends:
        box = legend.get_tightbbox(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 + 0.5 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1 + 0.5
        assert _no_overlap([t.get_window_extent(renderer) for t in legend.get_texts()])
    for axes in figure.axes:
        box = axes.get_tightbbox(renderer)
        assert canvas.x0 - 0.5 <= box.x0 and box.x1 <= canvas.x1 + 0.5, "an axes runs off the canvas"
        for ticks in (axes.get_xticklabels(), axes.get_yticklabels()):
            assert _no_overlap([t.get_window_extent(renderer) for t in ticks if t.get_text()])


@pytest.fixture()
def keep_figures(monkeypatch):
    """Every Figure the plotting code saves, kept for inspection after savefig."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.parametrize("n", [3, 43, 300])
def test_umap_legends_fit_and_panels_stay_square(n, tmp_path, keep_figures):
    df = _umap_frame(n, np.random.default_rng(n))
    plot_umap(df, tmp_path / f"umap{n}.png", f"{n} categories")
    figure = keep_figures[-1]
    _check_inside(figure)
    renderer = FigureCanvasAgg(figure).get_renderer()
    for axes in figure.axes:
        box = axes.get_window_extent(renderer)
        assert box.width == pytest.approx(box.height, rel=0.02)  # square, whatever n
        assert box.height > 0.6 * figure.bbox.height
        labels = [t.get_text() for t in axes.get_legend().get_texts()]
        assert len(labels) == min(n, MAX_COLOURS)
        if n > MAX_COLOURS:
            assert labels[-1].startswith(f"other ({n - MAX_COLOURS + 1} categories")


def test_colours_distinct_up_to_twenty_then_grey_for_the_rest():
    few = category_colours({c: 10 + i for i, c in enumerate(_names(20))})
    assert len(set(map(tuple, few.colour.values()))) == 20 and GREY not in few.colour.values()
    counts = {c: 1000 - i for i, c in enumerate(_names(43))} | {"unknown": 5}
    many = category_colours(counts)
    coloured = [c for c, colour in many.colour.items() if colour != GREY]
    assert coloured == _names(19)  # the largest
    assert len(set(map(tuple, (many.colour[c] for c in coloured)))) == 19
    assert many.legend[-1] == (f"other + unknown (24 categories, {sum(1000 - i for i in range(19, 43)) + 5:,})", GREY)


def _table(n: int) -> AccuracyTable:
    rows = [AccuracyRow(name, 10 + i, float((37 * i) % 100), float(min(100, (37 * i) % 100 + 20)))
            for i, name in enumerate(_names(n))]
    return AccuracyTable(rows, rows[: min(n, 7)], AccuracyRow("all", 1, 50.0, 70.0), AccuracyRow("macro", 1, 50.0, 70.0))


@pytest.mark.parametrize("n", [3, 43, 300])
def test_category_bars_fit_and_turn_horizontal_and_sorted(n, tmp_path, keep_figures):
    plot_categories(_table(n), tmp_path / f"bars{n}.png")
    figure = keep_figures[-1]
    _check_inside(figure)
    types = figure.axes[0]
    if n <= 8:
        labels = [t.get_text().split("\n") for t in types.get_xticklabels()]
        assert [name.startswith(lines[0]) for lines, name in zip(labels, _names(n))] == [True] * n
    else:
        labels = [t.get_text() for t in types.get_yticklabels()]
        top1 = {f"{short(name, 24)} (n={10 + i})": float((37 * i) % 100) for i, name in enumerate(_names(n))}
        shown = [top1[label] for label in labels]
        assert shown == sorted(shown, reverse=True)  # best at the top
        assert len(labels) == min(n, 60)


# --------------------------------------------------------------------------- CJK names

#: Chinese meta-category names as a user's RP2K metadata may have them.
CHINESE = ["饮料", "乳制品", "调味品（酱）", "啤酒", "化妆品"]


def _chinese_names(n: int) -> list[str]:
    return (CHINESE + [f"商品类别{i:03d}" for i in range(n)])[:n]


def _chinese_frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(n)
    values = np.repeat(_chinese_names(n), np.maximum(1, (400 / (1 + np.arange(n)) ** 0.7).astype(int)))
    return pd.DataFrame({"type": values, "shape": rng.permutation(values),
                         "umap_x": rng.normal(size=len(values)), "umap_y": rng.normal(size=len(values))})


def _chinese_table(n: int) -> AccuracyTable:
    rows = [AccuracyRow(name, 10 + i, float((37 * i) % 100), float(min(100, (37 * i) % 100 + 20)))
            for i, name in enumerate(_chinese_names(n))]
    return AccuracyTable(rows, rows[:3], AccuracyRow("all", 1, 50.0, 70.0), AccuracyRow("macro", 1, 50.0, 70.0))


def _texts(figure: Figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]


def _has_cjk(text: str) -> bool:
    return any("\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef" for c in text)


def _redraw_without_glyph_warnings(figure: Figure) -> None:
    """Draw ``figure`` again outside the plotting code: a character without a glyph in the
    fonts its texts were made with raises matplotlib's "Glyph ... missing" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FigureCanvasAgg(figure).draw()


def _box_font(path, family: str) -> None:
    """A TrueType font named ``family`` that draws every CJK ideograph and full-width form
    as one box: a CJK font for machines that have none."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    pen = TTGlyphPen(None)
    for point in [(100, -50), (100, 750), (900, 750), (900, -50)]:
        (pen.lineTo if pen.points else pen.moveTo)(point)
    pen.closePath()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "box"])
    codepoints = [*range(0x3000, 0x3040), *range(0x4E00, 0xA000), *range(0xFF00, 0xFFF0)]
    builder.setupCharacterMap({c: "box" for c in codepoints})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "box": pen.glyph()})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "box": (1000, 100)})
    builder.setupHorizontalHeader(ascent=880, descent=-120)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    builder.setupPost()
    builder.save(str(path))


@pytest.fixture()
def font_list(monkeypatch):
    """matplotlib's font list, restored after the test; the font lookup forgotten around it."""
    from matplotlib import font_manager

    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
    fonts.reset_fonts()
    yield font_manager.fontManager
    monkeypatch.undo()
    fonts.reset_fonts()


@pytest.fixture()
def no_cjk_font(monkeypatch, font_list):
    """A machine with matplotlib's own DejaVu Sans only."""
    monkeypatch.setattr(fonts, "installed_fonts", lambda: [fonts.Font(e.name, e.fname) for e in font_list.ttflist
                                                            if e.name == fonts.BASE_FAMILY])
    assert fonts.cjk_font() is None


@pytest.fixture()
def box_cjk_font(monkeypatch, font_list, tmp_path):
    """A CJK font (:func:`_box_font`) found by the lookup, whatever the machine has."""
    _box_font(tmp_path / "BoxCJK.ttf", "Rp2k Box CJK")
    font_list.addfont(str(tmp_path / "BoxCJK.ttf"))
    monkeypatch.setattr(fonts, "CJK_FAMILIES", ("Rp2k Box CJK",))
    assert fonts.cjk_font() == fonts.Font("Rp2k Box CJK", str(tmp_path / "BoxCJK.ttf"))


def test_the_cjk_font_is_the_first_preferred_family_installed():
    dejavu, wqy, noto_jp, noto_sc = (fonts.Font(family, f"/fonts/{i}.ttf") for i, family in enumerate(
        ["DejaVu Sans", "WenQuanYi Zen Hei", "Noto Sans CJK JP", "Noto Sans CJK SC"]))
    assert fonts.choose_cjk_font([dejavu, wqy, noto_jp, noto_sc]) == noto_sc
    assert fonts.choose_cjk_font([dejavu, wqy, noto_jp]) == noto_jp
    assert fonts.choose_cjk_font([wqy, dejavu]) == wqy
    assert fonts.choose_cjk_font([dejavu]) is None and fonts.choose_cjk_font([]) is None


def test_a_cjk_font_installed_after_matplotlib_cached_its_list_is_found(font_list, monkeypatch, tmp_path):
    from matplotlib import font_manager

    font_list.ttflist[:] = [e for e in font_list.ttflist if e.name == fonts.BASE_FAMILY]
    path = tmp_path / "NotoSansCJK-Regular.ttf"  # the cached list lacks it; the file is on disk
    _box_font(path, "Noto Sans CJK SC")
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [str(path), "/fonts/Other.ttf"])
    assert fonts.cjk_font() == fonts.Font("Noto Sans CJK SC", str(path))
    assert fonts.font_family() == ["DejaVu Sans", "Noto Sans CJK SC"]


def test_without_a_cjk_font_names_become_ids_with_one_warning(no_cjk_font, tmp_path, keep_figures, recwarn):
    assert fonts.font_family() == ["DejaVu Sans"]
    assert fonts.drawable("soft drinks (n=1,234) …") and not fonts.drawable("饮料")
    for n in (3, 300, 3):  # six figures: still one warning
        plot_umap(_chinese_frame(n), tmp_path / f"umap{n}.png", f"{n} categories")
        plot_categories(_chinese_table(n), tmp_path / f"bars{n}.png")
    assert len(keep_figures) == 6
    for figure in keep_figures:
        _check_inside(figure)
        assert not any(_has_cjk(text) for text in _texts(figure))
        _redraw_without_glyph_warnings(figure)
    legend = [t.get_text() for t in keep_figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["category 1 (400)", "category 2 (246)", "category 3 (185)"]  # largest first
    bars = [t.get_text() for t in keep_figures[1].axes[0].get_xticklabels()]
    assert [label.split("\n")[0] for label in bars] == ["type 1", "type 2", "type 3"]  # rows of Table 2
    ours = [w for w in recwarn if issubclass(w.category, fonts.MissingGlyphsWarning)]
    assert len(ours) == 1 and "sudo apt-get install fonts-noto-cjk" in str(ours[0].message)
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


def test_without_a_cjk_font_confused_classes_are_named_by_index_and_sku(no_cjk_font):
    from rp2k_dist.analysis.plots import pair_caption

    pair = {"true": 6, "true_name": "牛栏山珍品（绵柔）42度475ml", "true_product_name": "珍品", "true_sku": "0624266",
            "predicted": 0, "predicted_name": "others", "predicted_product_name": "others", "predicted_sku": ""}
    with pytest.warns(fonts.MissingGlyphsWarning, match="fonts-noto-cjk"):
        assert pair_caption(pair, "true", 32) == "#6 SKU 0624266"
    assert pair_caption(pair, "predicted", 32) == "#0 others"
    assert pair_caption({**pair, "true_sku": ""}, "true", 32) == "#6"  # an older evaluation.json


@pytest.mark.parametrize("n", [3, 300])
def test_with_a_cjk_font_figures_carry_the_chinese_names(n, box_cjk_font, tmp_path, keep_figures, recwarn):
    assert fonts.font_family() == ["DejaVu Sans", "Rp2k Box CJK"] and fonts.drawable("调味品（酱）250ml")
    plot_umap(_chinese_frame(n), tmp_path / "umap.png", "UMAP")
    plot_categories(_chinese_table(n), tmp_path / "bars.png")
    umap, bars = keep_figures
    for figure in (umap, bars):
        _check_inside(figure)
        _redraw_without_glyph_warnings(figure)
    legend = [t.get_text() for t in umap.axes[0].get_legend().get_texts()]
    assert [label.rsplit(" (", 1)[0] for label in legend[:3]] == _chinese_names(n)[:3]
    if n <= 8:
        assert [t.get_text().split("\n")[0] for t in bars.axes[0].get_xticklabels()] == _chinese_names(n)
    else:
        shown = {t.get_text().rsplit(" (n=", 1)[0] for t in bars.axes[0].get_yticklabels()}
        assert len(shown) == 60 and shown <= {short(name, 24) for name in _chinese_names(n)}
    assert not [w for w in recwarn if issubclass(w.category, fonts.MissingGlyphsWarning) or "Glyph" in str(w.message)]


def test_with_the_installed_cjk_font_chinese_names_are_drawn(font_list, tmp_path, keep_figures, recwarn):
    font = fonts.cjk_font()
    if font is None:
        pytest.skip("no CJK font installed (Debian/Ubuntu: apt-get install fonts-noto-cjk); "
                    "test_with_a_cjk_font_figures_carry_the_chinese_names covers the logic with a generated font")
    plot_umap(_chinese_frame(5), tmp_path / "umap.png", "UMAP")
    figure = keep_figures[-1]
    _redraw_without_glyph_warnings(figure)
    assert {t.get_fontfamily()[-1] for t in figure.findobj(Text) if _has_cjk(t.get_text())} == {font.family}
    assert sum(_has_cjk(text) for text in _texts(figure)) == 10  # five names in each legend
    assert not [w for w in recwarn if issubclass(w.category, fonts.MissingGlyphsWarning) or "Glyph" in str(w.message)]
