"""The synthetic RP2K: RP2K's layout and quirks, long tail, determinism, safe writing."""

from __future__ import annotations

import csv
import hashlib
import statistics
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rp2k_dist.data import synth
from rp2k_dist.data.synth import writer as synth_writer
from rp2k_dist.data.metadata import SHAPES, TYPES, load_metadata
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.synth import SynthConfig, SynthSummary, make_synthetic_rp2k
from rp2k_dist.errors import ConfigError, DataError

SMALL = SynthConfig(classes=12, images_per_class=8, image_size=64, workers=1)
HEADER = ["class", "sku", "name", "brand", "type", "shape", "size", "flavour"]
FULL_WIDTH = set("（）")


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by POSIX relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def class_dirs(root: Path, split: str) -> dict[str, Path]:
    return {p.name: p for p in (root / "all" / split).iterdir() if p.is_dir()}


def class_sizes(root: Path) -> Counter[str]:
    """Images per class folder, both splits together."""
    return Counter(p.parent.name for p in (root / "all").glob("*/*/*") if p.is_file())


def metadata_rows(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return make_synthetic_rp2k(tmp_path_factory.mktemp("synth") / "rp2k", SMALL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    config = SynthConfig(classes=12, images_per_class=8, image_size=64, quirks=False, workers=1)
    return make_synthetic_rp2k(tmp_path_factory.mktemp("clean") / "rp2k", config)


# --------------------------------------------------------------------------- determinism


def test_same_config_gives_identical_bytes_whatever_the_workers(tmp_path: Path, made: SynthSummary):
    two = make_synthetic_rp2k(tmp_path / "two", SynthConfig(**{**SMALL.__dict__, "workers": 2}))
    assert digests(two.root) == digests(made.root)
    assert two.quirks == made.quirks


def test_another_seed_gives_other_images(tmp_path: Path, made: SynthSummary):
    other = make_synthetic_rp2k(tmp_path / "seed1", SynthConfig(**{**SMALL.__dict__, "seed": 1}))
    ours = set(digests(made.root).values())
    theirs = set(digests(other.root).values())
    assert not ours & theirs


# --------------------------------------------------------------------------- layout


def test_layout_and_metadata_table(made: SynthSummary):
    root = made.root
    assert (root / "all" / "train").is_dir() and (root / "all" / "test").is_dir()
    header, rows = metadata_rows(root)
    assert header == HEADER
    assert made.metadata_path == root / "metadata.csv"
    folders = set(class_dirs(root, "train")) | set(class_dirs(root, "test"))
    assert sorted(row["class"] for row in rows) == sorted(folders)  # one row per folder
    assert {row["type"] for row in rows} <= set(TYPES)
    assert {row["shape"] for row in rows} <= set(SHAPES)
    skus = [row["sku"] for row in rows]
    assert all(sku.isdigit() and len(sku) == 7 for sku in skus) and len(set(skus)) == len(skus)
    # the project's own metadata reader takes it as is, leading zeros intact
    table = load_metadata(made.metadata_path)
    assert set(table) == folders and all(info.sku in skus for info in table.values())


def test_class_names_look_like_rp2k(made: SynthSummary):
    sizes = class_sizes(made.root)
    assert sizes.most_common(1)[0][0] == "others"
    names = [name for name in sizes if name != "others"]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in name) for name in names)
    assert any(FULL_WIDTH & set(name) for name in names)
    files = [p for p in (made.root / "all").glob("*/*/*") if p.is_file()]
    assert Counter(p.suffix for p in files).most_common(1)[0][0] == ".jpg"


def test_summary_counts_match_disk(made: SynthSummary):
    root = made.root
    for split, expected in (("train", made.train_images), ("test", made.test_images)):
        assert sum(1 for p in (root / "all" / split).glob("*/*") if p.is_file()) == expected
    assert made.classes == SMALL.classes == len(class_sizes(root))


def test_the_rp2k_reader_reports_the_planted_quirks(made: SynthSummary):
    index = scan_rp2k(made.root, metadata=made.metadata_path)
    empty = Path(made.quirks["empty_class"]).name
    test_only = Path(made.quirks["test_only_class"]).name
    assert index.report.empty_classes == [empty]
    assert test_only in index.report.only_in_test
    assert index.num_classes == made.classes
    assert not index.report.without_metadata


# --------------------------------------------------------------------------- quirks


def test_rgba_png_has_real_transparency(made: SynthSummary):
    with Image.open(made.root / made.quirks["rgba_png"]) as image:
        assert image.format == "PNG" and image.mode == "RGBA"
        alpha = image.getchannel("A")
        assert alpha.getextrema() == (0, 255)  # transparent backdrop, opaque product


def test_palette_png(made: SynthSummary):
    with Image.open(made.root / made.quirks["palette_png"]) as image:
        assert image.format == "PNG" and image.mode == "P"


def test_exactly_one_corrupt_file(made: SynthSummary):
    broken = []
    for path in sorted((made.root / "all").glob("*/*/*")):
        try:
            with Image.open(path) as image:
                image.load()
        except OSError:  # UnidentifiedImageError is one
            broken.append(path.relative_to(made.root).as_posix())
    assert broken == [made.quirks["corrupt"]]
    assert broken[0].endswith(".jpg")


def test_empty_class_folder_and_test_only_class(made: SynthSummary):
    empty = made.root / made.quirks["empty_class"]
    assert empty.is_dir() and not any(empty.iterdir())
    assert not (made.root / "all" / "test" / empty.name).exists()
    test_only = made.root / made.quirks["test_only_class"]
    assert test_only.parent.name == "test" and any(test_only.iterdir())
    assert test_only.name not in class_dirs(made.root, "train")


def test_odd_names(made: SynthSummary):
    spaced = made.quirks["space_class"]
    assert " " in spaced and FULL_WIDTH & set(spaced)
    assert spaced in set(class_dirs(made.root, "train")) | set(class_dirs(made.root, "test"))
    copy = made.root / made.quirks["copy_name"]
    stem, suffix = copy.name.split(" - 副本 (2)")
    assert copy.read_bytes() == copy.with_name(stem + suffix).read_bytes()  # a real copy
    screenshot = made.root / made.quirks["screenshot"]
    assert screenshot.name == "截屏2019-12-10下午5.15.14.png" and screenshot.is_file()


def test_a_basename_repeats_across_classes(made: SynthSummary):
    first, second = (made.root / rel for rel in made.quirks["duplicate_basename"])
    assert first.name == second.name and first.parent != second.parent
    assert first.is_file() and second.is_file()
    basenames = Counter(p.name for p in (made.root / "all").glob("*/*/*"))
    assert [name for name, n in basenames.items() if n > 1] == [first.name]


def test_without_quirks_the_tree_is_imagefolder_clean(clean: SynthSummary):
    root = clean.root
    assert clean.quirks == {}
    train, test = class_dirs(root, "train"), class_dirs(root, "test")
    assert set(train) == set(test) and len(train) == clean.classes
    for folder in [*train.values(), *test.values()]:
        assert any(folder.iterdir()), folder
    files = [p for p in (root / "all").glob("*/*/*")]
    assert len({p.name for p in files}) == len(files)  # no shared basenames
    assert not any(" " in p.relative_to(root).as_posix() for p in files)
    for path in files:
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB", path
    _, rows = metadata_rows(root)
    assert {row["class"] for row in rows} == set(train)


# --------------------------------------------------------------------------- class sizes


def test_class_sizes_are_long_tailed_and_every_meta_category_occurs(tmp_path: Path):
    config = SynthConfig(classes=48, images_per_class=40, image_size=64, workers=2)
    made = make_synthetic_rp2k(tmp_path / "tail", config)
    sizes = class_sizes(made.root)
    counts = list(sizes.values())
    mean = statistics.mean(counts)
    assert len(counts) == 48
    assert max(counts) == sizes["others"] >= 4 * mean
    assert min(counts) <= 2
    assert statistics.median(counts) < mean
    assert abs(sum(counts) - 48 * 40) <= 0.25 * 48 * 40
    _, rows = metadata_rows(made.root)
    assert {row["type"] for row in rows} == set(TYPES)
    assert {row["shape"] for row in rows} == set(SHAPES)
    # about 10 % of each class in test; every class of >= 2 images has a test image,
    # and only the test-only class lacks train images
    test = class_dirs(made.root, "test")
    train = class_dirs(made.root, "train")
    assert abs(made.test_images / (made.train_images + made.test_images) - 0.1) < 0.03
    for name, n in sizes.items():
        n_test = sum(1 for _ in test[name].iterdir()) if name in test else 0
        if n >= 2:
            assert n_test >= 1, name
        if f"all/test/{name}" != made.quirks["test_only_class"]:
            assert name in train and any(train[name].iterdir()), name


# --------------------------------------------------------------------------- config, safety


@pytest.mark.parametrize(
    "bad",
    [
        {"classes": 2},
        {"image_size": 8},
        {"test_fraction": 1.5},
        {"test_fraction": 0.0},
        {"images_per_class": 1},
        {"seed": -1},
        {"workers": -1},
    ],
)
def test_invalid_config_is_refused(bad: dict):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=field):
        SynthConfig(**bad)


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path: Path):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        make_synthetic_rp2k(root, SMALL)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_rewrites_an_earlier_synthetic_output_in_place(tmp_path: Path):
    root = tmp_path / "rp2k"
    first = make_synthetic_rp2k(root, SMALL)
    before = digests(root)
    second = make_synthetic_rp2k(root, SynthConfig(**{**SMALL.__dict__, "seed": 7}))
    assert second.root == first.root
    assert digests(root) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rp2k"]  # no temp folders left


def test_a_crash_leaves_no_dataset_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = 0

    def crash_on_second_chunk(chunk):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("disk full")
        return render(chunk)

    render = synth_writer._render_chunk
    monkeypatch.setattr(synth_writer, "_render_chunk", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic_rp2k(tmp_path / "rp2k", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_is_silent_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture):
    make_synthetic_rp2k(tmp_path / "rp2k", SMALL, progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("cue, differs", [("accent", {"accent"}), ("mark", {"mark", "aspect"})])
def test_a_fine_grained_family_differs_in_one_cue_only(cue, differs):
    """fine_grained: the liquor classes are one family whose designs differ only in the
    cue's fields; every other field (palette, pattern, print) is shared; no other class is
    liquor; and the default catalogue is the same as without the option."""
    config = SynthConfig(classes=16, images_per_class=8, image_size=64, quirks=False, fine_grained=cue,
                         fine_classes=7)
    classes, _ = synth._catalogue(config)
    family = [c for c in classes if c.type == "liquor"]
    assert len(family) == 7 and len({c.folder for c in classes}) == len(classes)
    fields = {name for name in synth.Design.__dataclass_fields__}
    for name in fields:
        values = {getattr(c.design, name) for c in family}
        assert (len(values) > 1) == (name in differs), name
    assert len({tuple(getattr(c.design, n) for n in sorted(differs)) for c in family}) == 7  # each SKU its own look
    plain = SynthConfig(classes=16, images_per_class=8, image_size=64, quirks=False)
    assert synth._catalogue(plain) == synth._catalogue(SynthConfig(**{**plain.__dict__, "fine_classes": 3}))


@pytest.mark.parametrize("bad", [dict(fine_grained="colour"), dict(fine_grained="accent", fine_classes=11),
                                 dict(fine_grained="mark", fine_classes=14, classes=16)])
def test_bad_fine_grained_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="fine_"):
        SynthConfig(**{"classes": 16, **bad})
