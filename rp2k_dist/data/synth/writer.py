"""Writing the tree: chunks of images rendered in worker processes into a temporary folder
that replaces the target in one move, then the metadata and the marker."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import DataError
from ..metadata import FIELDS
from .catalogue import _catalogue, _random_design
from .config import ClassSpec, ImageSpec, MARKER, METADATA_FILE, SynthConfig, SynthSummary, _IMAGE
from .photo import _encode, _photo


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Chunk:
    """Up to ``_CHUNK`` images of one class: the unit of work of a rendering process."""

    root: Path
    seed: int
    image_size: int
    spec: ClassSpec
    images: tuple[ImageSpec, ...]


_CHUNK = 32


def _render_chunk(chunk: _Chunk) -> int:
    """Render and write a chunk's images; returns how many."""
    spec = chunk.spec
    for image in chunk.images:
        rng = np.random.default_rng([chunk.seed, _IMAGE, spec.index, image.index])
        design = spec.design or _random_design(rng)
        photo = _photo(design, chunk.image_size, rng, transparent=image.kind == "rgba")
        path = chunk.root / "all" / image.split / spec.folder / image.name
        path.write_bytes(_encode(photo, image.kind, rng))
    return len(chunk.images)


def _chunks(root: Path, config: SynthConfig, classes: list[ClassSpec]) -> list[_Chunk]:
    """Work units, biggest classes first so processes finish together."""
    out = []
    for spec in sorted(classes, key=lambda c: -len(c.images)):
        for start in range(0, len(spec.images), _CHUNK):
            images = spec.images[start : start + _CHUNK]
            out.append(_Chunk(root, config.seed, config.image_size, spec, images))
    return out


def _write_metadata(path: Path, classes: list[ClassSpec]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("class", *FIELDS))
        writer.writeheader()
        for spec in sorted(classes, key=lambda c: c.folder):
            writer.writerow(spec.row())


def _check_root(root: Path) -> None:
    """Refuse a root that is a file, or a non-empty folder we did not write."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise DataError(f"{root} exists and is not a folder; pick another dataset root")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise DataError(
            f"{root} is not empty and is not an earlier synthetic dataset (no {MARKER}); "
            "refusing to overwrite it: pick an empty or new folder"
        )


def make_synthetic_rp2k(
    root: str | Path, config: SynthConfig = SynthConfig(), progress: bool = False
) -> SynthSummary:
    """Write a synthetic RP2K under ``root`` (layout in the module docstring).

    ``root`` must be missing, empty, or an earlier output of this function (which is
    replaced). The tree is built in a temporary folder next to ``root`` and renamed into
    place at the end, so an interrupted run never leaves a half dataset behind.
    Same config, same bytes, whatever ``config.workers``. ``progress`` shows a tqdm bar
    (on a terminal only).
    """
    root = Path(root).absolute()
    _check_root(root)
    classes, quirks = _catalogue(config)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        for spec in classes:
            splits = {im.split for im in spec.images} or {"train"}
            for split in splits:
                (staging / "all" / split / spec.folder).mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            (staging / "all" / split).mkdir(parents=True, exist_ok=True)
        _render_all(_chunks(staging, config, classes), config.workers, progress)
        _write_metadata(staging / METADATA_FILE, classes)
        settings = {k: v for k, v in asdict(config).items() if k != "workers"}
        marker = {"generator": __package__, "config": settings, "quirks": quirks}
        text = json.dumps(marker, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (staging / MARKER).write_text(text, encoding="utf-8")
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    images = [im for spec in classes for im in spec.images]
    return SynthSummary(
        root=root,
        classes=sum(bool(spec.images) for spec in classes),
        train_images=sum(im.split == "train" for im in images),
        test_images=sum(im.split == "test" for im in images),
        metadata_path=root / METADATA_FILE,
        quirks=quirks,
    )


def _render_all(chunks: list[_Chunk], workers: int, progress: bool) -> None:
    """Render every chunk, in ``workers`` processes (0 = one per CPU)."""
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    total = sum(len(chunk.images) for chunk in chunks)
    disable = None if progress else True  # None: only on a terminal
    with tqdm(total=total, desc="synthesising RP2K", unit="img", disable=disable) as bar:
        if workers <= 1:
            for chunk in chunks:
                bar.update(_render_chunk(chunk))
            return
        with _pool_context().Pool(workers) as pool:
            for done in pool.imap_unordered(_render_chunk, chunks):
                bar.update(done)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where the OS has it: unlike spawn it works from scripts without a
    ``__main__`` guard, and the children only run numpy and PIL code."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _swap_into_place(staging: Path, root: Path) -> None:
    """Rename the finished tree to ``root``, replacing an empty or earlier synthetic one."""
    if not root.exists():
        staging.rename(root)
        return
    old = root.with_name(f"{staging.name}.old")
    root.rename(old)
    staging.rename(root)
    shutil.rmtree(old)
