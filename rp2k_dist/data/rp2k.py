"""Read RP2K as it is really released.

Layout (the unzipped ``rp2k_dataset.zip``)::

    <root>/all/train/<class folder>/<image>
    <root>/all/test/<class folder>/<image>

(the archive of the dataset page, https://www.pinlandata.com/rp2k_dataset; dataset paper:
Peng et al., "RP2K: A Large-Scale Retail Product Dataset for Fine-Grained Image
Classification", arXiv:2006.12634). A plain ``<root>/{train,test}/<class folder>/`` tree
is accepted too. The reader copes with the quirks of the released archive: ``.jpg`` and ``.png`` files, CJK / full-width / space characters
in names, basenames repeated across classes (samples are keyed by their relative path, never
the basename), empty class folders, classes present in only one split, and files that are not
images. The class index is the sorted union of the non-empty class folders of both splits.
Nothing here decodes images: decode failures surface where the pixels are read (packing),
through :func:`rp2k_dist.data.images.load_rgb`, and are counted there.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_SUFFIXES
from .metadata import MetadataColumns, ProductInfo, load_metadata
from ..errors import DatasetLayoutError

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image file on disk."""

    split: str
    label: int
    class_name: str
    relpath: str  # POSIX path relative to the dataset root: the sample's identity
    size: int  # bytes on disk


@dataclass(frozen=True)
class ClassInfo:
    """One class (SKU): its index, folder name, metadata and image counts."""

    index: int
    name: str
    product: ProductInfo
    counts: dict[str, int]

    @property
    def type(self) -> str:
        return self.product.type

    @property
    def shape(self) -> str:
        return self.product.shape


@dataclass
class ScanReport:
    """What the scan found odd; each list names classes or relative paths."""

    empty_classes: list[str] = field(default_factory=list)
    only_in_train: list[str] = field(default_factory=list)
    only_in_test: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    non_image_files: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # files directly under a split
    without_metadata: list[str] = field(default_factory=list)
    metadata_without_folder: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary lines, one per non-empty finding."""
        labels = {
            "empty_classes": "empty class folders (left out of the class index)",
            "only_in_train": "classes only in train",
            "only_in_test": "classes only in test (never trained on)",
            "empty_files": "zero-byte files (skipped)",
            "non_image_files": "non-image files (skipped)",
            "stray_files": "files outside any class folder (skipped)",
            "without_metadata": "classes without a metadata row (meta-category 'unknown')",
            "metadata_without_folder": "metadata rows without a class folder (ignored)",
        }
        out = []
        for key, label in labels.items():
            items = getattr(self, key)
            if items:
                shown = ", ".join(items[:5]) + (f", ... (+{len(items) - 5})" if len(items) > 5 else "")
                out.append(f"{len(items)} {label}: {shown}")
        return out

    def as_dict(self) -> dict[str, list[str]]:
        return {key: list(value) for key, value in self.__dict__.items()}


@dataclass
class RP2KIndex:
    """The scanned dataset: class table, image records per split, and the scan report."""

    root: Path
    layout: str  # "rp2k" (<root>/all/<split>) or "plain" (<root>/<split>)
    classes: list[ClassInfo]
    records: dict[str, list[ImageRecord]]
    report: ScanReport

    def path(self, record: ImageRecord) -> Path:
        return self.root / record.relpath

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_dirs(root: Path) -> tuple[str, dict[str, Path]]:
    """Find the split folders; the RP2K layout wins over the plain one."""
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset root {root} does not exist. Unzip rp2k_dataset.zip there (so that "
            f"{root}/all/train/<class>/<image> exists), or make the synthetic stand-in with "
            f"`rp2k synth {root}`"
        )
    for layout, base in (("rp2k", root / "all"), ("plain", root)):
        found = {split: base / split for split in SPLITS if (base / split).is_dir()}
        if found:
            return layout, found
    raise DatasetLayoutError(
        f"{root} holds neither {root}/all/{{train,test}}/<class>/<image> (RP2K as released) "
        f"nor {root}/{{train,test}}/<class>/<image>"
    )


def _nfc(text: str) -> str:
    # Archives made on macOS store decomposed (NFD) CJK/accented names.
    return unicodedata.normalize("NFC", text)


def _walk_class(folder: Path, root: Path, report: ScanReport) -> list[tuple[str, int]]:
    """(relative path, bytes) of every image file under a class folder, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                report.non_image_files.append(rel)
                continue
            size = path.stat().st_size
            if size == 0:
                report.empty_files.append(rel)
                continue
            found.append((rel, size))
    return found


def scan_rp2k(
    root: str | Path,
    metadata: str | Path | None = None,
    columns: MetadataColumns = MetadataColumns(),
) -> RP2KIndex:
    """Scan an RP2K tree (and optionally its metadata table) into an :class:`RP2KIndex`.

    Deterministic: classes and files are sorted by name, so the same tree always gives
    the same class indices and record order.
    """
    root = Path(root)
    layout, dirs = split_dirs(root)
    report = ScanReport()
    files: dict[str, dict[str, list[tuple[str, int]]]] = {split: {} for split in SPLITS}
    all_folders: set[str] = set()
    for split, split_dir in dirs.items():
        for entry in sorted(split_dir.iterdir()):
            if entry.is_dir():
                name = entry.name
                all_folders.add(name)
                images = _walk_class(entry, root, report)
                if images:
                    files[split][name] = images
            elif not entry.name.startswith("."):
                report.stray_files.append(entry.relative_to(root).as_posix())

    in_train, in_test = set(files["train"]), set(files["test"])
    class_names = sorted(in_train | in_test)
    report.empty_classes = sorted(all_folders - in_train - in_test)
    report.only_in_train = sorted(in_train - in_test)
    report.only_in_test = sorted(in_test - in_train)

    products: dict[str, ProductInfo] = {}
    if metadata is not None:
        table = {_nfc(k): v for k, v in load_metadata(metadata, columns).items()}
        for name in class_names:
            if _nfc(name) in table:
                products[name] = table[_nfc(name)]
            else:
                report.without_metadata.append(name)
        known = {_nfc(name) for name in all_folders}
        report.metadata_without_folder = sorted(k for k in table if k not in known)

    classes = []
    records: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    for index, name in enumerate(class_names):
        counts = {split: len(files[split].get(name, ())) for split in SPLITS}
        classes.append(ClassInfo(index, name, products.get(name, ProductInfo()), counts))
        for split in SPLITS:
            for rel, size in files[split].get(name, ()):
                records[split].append(ImageRecord(split, index, name, rel, size))
    return RP2KIndex(root, layout, classes, records, report)
