"""The paper's Fig. 3: a UMAP projection of a trained model's penultimate features,
coloured by meta-category, here in two panels (type and shape) side by side.

Features come from :func:`rp2k_dist.evaluation.embeddings.shard_features` (unnormalised):
the evaluation transform of the shard images, then the model's pooled features, the same
loop as ``rp2k embed``. A subsample (``max_samples``) is drawn deterministically from the
split's keys before any image is decoded, so tens of thousands of test images stay
tractable on a CPU.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd

from .. import storage
from ..data.manifest import Manifest
from ..data.metadata import SHAPES, TYPES
from ..errors import DataError
from ..evaluation.embeddings import shard_features
from ..evaluation.inference import TrainedModel, load_trained
from .figures import GREY, category_colours, legend_outside
from .fonts import readable_fonts

#: Figure size in inches and resolution: every UMAP PNG is 1800 x 750 pixels (two square
#: panels, each with its legend to the right).
FIGSIZE = (18.0, 7.5)
DPI = 100
#: UMAP needs at least this many points (2 neighbours each, a 2-D layout).
MIN_SAMPLES = 3
_UMAP_NEIGHBOURS = 15  # umap-learn's default


def select_samples(
    manifest: Manifest, split: str, classes: list[int] | None = None, max_samples: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """Samples of ``split`` (of ``classes`` only, if given) from the manifest index, sorted
    by key; at most ``max_samples``, drawn without replacement with ``seed``. Columns:
    key, class (global index), class_name, type, shape."""
    index = manifest.index().select(["key", "split", "label", "class_name", "type", "shape"]).to_pandas()
    rows = index[index["split"] == split]
    if classes is not None:
        rows = rows[rows["label"].isin(classes)]
    rows = rows.sort_values("key")
    if max_samples is not None and len(rows) > max_samples:
        rows = rows.iloc[np.sort(np.random.default_rng(seed).choice(len(rows), max_samples, replace=False))]
    return rows.drop(columns="split").rename(columns={"label": "class"}).reset_index(drop=True)


def extract_features(
    trained: TrainedModel, manifest: Manifest, keys: list[str], batch_size: int = 64, workers: int = 2
) -> dict[str, np.ndarray]:
    """Penultimate features [D] of each key's image (evaluation transform), by key: the raw
    pooled features of :func:`rp2k_dist.evaluation.embeddings.shard_features`, the feature
    loop ``rp2k embed`` and the galleries share."""
    return shard_features(trained, manifest, keys, batch_size, workers, normalise=False)


def project(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP of ``features`` [N, D] to [N, 2]. Below 16 points the neighbourhood shrinks to
    N - 1 and the layout starts at random (the spectral start needs more points)."""
    n = len(features)
    if n < MIN_SAMPLES:
        raise DataError(f"UMAP needs at least {MIN_SAMPLES} samples, got {n}")
    import umap

    reducer = umap.UMAP(
        n_components=2, random_state=seed, n_neighbors=min(_UMAP_NEIGHBOURS, n - 1),
        init="spectral" if n > _UMAP_NEIGHBOURS else "random",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value")  # a random_state means one thread
        return reducer.fit_transform(features)


def embed_and_project(
    checkpoint_or_run: str | Path | TrainedModel,
    shards: str | Path | None = None,
    split: str = "test",
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 2,
) -> pd.DataFrame:
    """One row per sample of ``split``: key, class, class_name, type, shape, features (the
    model's penultimate features, a list column), umap_x, umap_y.

    ``shards`` defaults to the checkpoint's ``data.shards``; a specialist embeds only its
    meta-category's samples. ``max_samples`` subsamples deterministically (``seed``)."""
    trained = checkpoint_or_run if isinstance(checkpoint_or_run, TrainedModel) else load_trained(checkpoint_or_run)
    manifest = Manifest.load(shards or trained.checkpoint["config"]["data"]["shards"])
    samples = select_samples(manifest, split, trained.class_subset, max_samples, seed)
    if len(samples) < MIN_SAMPLES:
        raise DataError(f"split {split!r} of {manifest.root} has {len(samples)} samples; UMAP needs {MIN_SAMPLES}")
    features = extract_features(trained, manifest, samples["key"].tolist(), batch_size, workers)
    matrix = np.stack([features[key] for key in samples["key"]])
    xy = project(matrix, seed)
    samples["features"] = list(matrix)
    samples["umap_x"], samples["umap_y"] = xy[:, 0], xy[:, 1]
    return samples


@readable_fonts
def plot_umap(df: pd.DataFrame, path: str | Path, title: str = "UMAP of penultimate features") -> str:
    """Write the two-panel figure (coloured by type | by shape; :data:`FIGSIZE` at
    :data:`DPI`) to ``path`` (PNG; local or a URI) and ``df`` next to it as
    ``<stem>.parquet``; returns the PNG's location.

    Each panel is square whatever the category count; colours and legends follow
    :mod:`rp2k_dist.analysis.figures` (distinct colours for up to 20 categories, the
    largest coloured and the rest grey beyond; legends outside the panels)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    figure.suptitle(f"{title} ({len(df):,} images)", fontsize=14)
    size = float(np.clip(3000 / max(len(df), 1), 1, 30))  # small markers for many points
    for axes, system, order in zip(figure.subplots(1, 2), ("type", "shape"), (TYPES, SHAPES)):
        counts = df[system].value_counts().to_dict()
        colouring = category_colours(counts, order)
        colours = df[system].map(colouring.colour)
        grey = (colours == GREY).to_numpy()
        rank = df[system].map(counts).to_numpy()
        # grey first, then the coloured points with the small categories on top
        drawn = np.lexsort((-rank, ~grey))
        axes.scatter(df["umap_x"].to_numpy()[drawn], df["umap_y"].to_numpy()[drawn], s=size,
                     c=list(colours.iloc[drawn]), alpha=0.7, linewidths=0, rasterized=True)
        handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=c) for _, c in colouring.legend]
        legend_outside(axes, handles, [label for label, _ in colouring.legend], system)
        axes.set_box_aspect(1)
        axes.set_title(f"coloured by {system} ({len(counts)} categories)")
        axes.set_xlabel("UMAP 1")
        axes.set_ylabel("UMAP 2")
    path = str(path)
    png = BytesIO()
    figure.savefig(png, format="png", dpi=DPI)
    table = BytesIO()
    df.to_parquet(table, index=False)
    storage.write_bytes(path, png.getvalue())
    storage.write_bytes(table_location(path), table.getvalue())
    return path


def table_location(png: str | Path) -> str:
    """Where :func:`plot_umap` puts the table of a figure: ``umap.png`` -> ``umap.parquet``."""
    png = str(png)
    folder, name = storage.parent(png), storage.basename(png)
    return storage.join(folder, f"{name.rsplit('.', 1)[0]}.parquet")
