"""User-facing analysis of trained runs: UMAP of features (Fig. 3), run reports and run
comparisons (Tables 2-4), and model export (ONNX, safetensors).

Modules: :mod:`.umap_plot`, :mod:`.report`, :mod:`.export`. They import
their heavy dependencies (umap, matplotlib, onnx) themselves, so importing this package
stays cheap. The one helper shared by all of them lives here: reading the images of given
sample keys straight from the shards.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..data.manifest import Manifest
from ..errors import DataError


def iter_shard_images(shards: str | Path | Manifest, keys: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """``(key, jpeg bytes)`` of every sample in ``keys``, read shard by shard (the
    manifest's ``index.parquet`` says which shard holds a key; other members are skipped
    without decoding). Order: shard order, then position in the shard. Raises DataError for
    keys that are not in the index."""
    manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)
    wanted = set(keys)
    index = manifest.index().select(["key", "shard"])
    index = index.filter(pc.is_in(index.column("key"), value_set=pa.array(sorted(wanted), pa.string())))
    missing = wanted - set(index.column("key").to_pylist())
    if missing:
        raise DataError(f"{len(missing)} keys not in {manifest.root / 'index.parquet'}, e.g. {sorted(missing)[:3]}")
    for shard in sorted(set(index.column("shard").to_pylist())):
        with tarfile.open(manifest.root / shard) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if suffix == "jpg" and key in wanted:
                    yield key, tar.extractfile(member).read()

