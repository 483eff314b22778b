"""User-facing analysis of trained runs: UMAP of features (Fig. 3), run reports and run
comparisons (Tables 2-4), and model export (ONNX, safetensors).

Modules: :mod:`.umap_plot`, :mod:`.report`, :mod:`.export`. They import
their heavy dependencies (umap, matplotlib, onnx) themselves, so importing this package
stays cheap. The one helper shared by all of them, reading the images of given sample keys
straight from the shards, is :func:`rp2k_dist.data.tar_index.iter_shard_images`.
"""

from __future__ import annotations

from ..data.tar_index import MERGE_GAP, iter_shard_images

__all__ = ["MERGE_GAP", "iter_shard_images"]
