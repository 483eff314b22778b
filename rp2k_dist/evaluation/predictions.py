"""Per-sample evaluation results: true label, top-k classes and their probabilities.

One :class:`Predictions` holds a whole evaluation pass (every test image once). It is
made from logits on each DDP rank, gathered and merged with :meth:`Predictions.concat`
(sorted by key, so the result does not depend on the world size or on rank order), and
written by rank 0 to Parquet, where the report generator reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import storage
from ..data.metadata import UNKNOWN

#: Columns of a predictions Parquet file, in order. ``top5_*`` hold K entries per row
#: (K = 5 unless the model has fewer classes).
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("true_class", pa.int64()),
        ("true_name", pa.string()),
        ("type", pa.string()),
        ("shape", pa.string()),
        ("top5_classes", pa.list_(pa.int64())),
        ("top5_scores", pa.list_(pa.float32())),
        ("top5_names", pa.list_(pa.string())),
        ("correct_top1", pa.bool_()),
        ("correct_top5", pa.bool_()),
    ]
)
_K_METADATA = b"rp2k_dist.top_k"  # K survives a round trip of an empty file


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def class_column(classes: list[dict[str, Any]], field: str, default: str = UNKNOWN) -> np.ndarray:
    """``classes[c][field]`` for every class c (manifest class table, index order) as a
    string array [C]; missing or empty values read ``default``."""
    return np.array([str(c.get(field) or default) for c in classes], dtype=object)


@dataclass
class Predictions:
    """Per-sample results of one evaluation pass. N samples, K = top-k width (5)."""

    keys: list[str]  # sample keys from the shards
    labels: np.ndarray  # int64 [N] true class index
    topk: np.ndarray  # int64 [N, K] predicted classes, best first
    scores: np.ndarray  # float32 [N, K] softmax probabilities of those classes
    # float32 [N, G]: the softmax probability summed over each of G groups of classes (the
    # specialists' meta-categories), when asked for (:meth:`from_logits`); not in Parquet
    mass: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.keys = [str(k) for k in self.keys]
        self.labels = _numpy(self.labels).astype(np.int64, copy=False).reshape(-1)
        self.topk = _numpy(self.topk).astype(np.int64, copy=False)
        self.scores = _numpy(self.scores).astype(np.float32, copy=False)
        n = len(self.keys)
        if self.labels.shape != (n,) or self.topk.ndim != 2 or len(self.topk) != n:
            raise ValueError(
                f"inconsistent predictions: {n} keys, labels {self.labels.shape}, topk {self.topk.shape}"
            )
        if self.topk.shape[1] < 1:
            raise ValueError("predictions need at least one top-k column")
        if self.scores.shape != self.topk.shape:
            raise ValueError(f"scores {self.scores.shape} and topk {self.topk.shape} differ in shape")
        if self.mass is not None:
            self.mass = _numpy(self.mass).astype(np.float32, copy=False)
            if self.mass.ndim != 2 or len(self.mass) != n:
                raise ValueError(f"mass {self.mass.shape} is not [N, G] for {n} samples")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def k(self) -> int:
        """Top-k width K."""
        return self.topk.shape[1]

    @classmethod
    def from_logits(
        cls,
        keys: Sequence[str],
        labels: torch.Tensor | np.ndarray | Sequence[int],
        logits: torch.Tensor | np.ndarray,
        k: int = 5,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> "Predictions":
        """From logits [N, C] (any device/dtype; softmax is taken in float32).
        ``k`` is clipped to C. ``groups``: class indices of G groups, whose probability
        mass [N, G] is kept in :attr:`mass`."""
        logits = torch.as_tensor(logits).detach().float()
        k = min(k, logits.shape[-1])
        probabilities = torch.softmax(logits, dim=-1)
        scores, topk = probabilities.topk(k, dim=-1)
        mass = None
        if groups is not None:
            mass = torch.stack([probabilities[:, list(g)].sum(dim=1) for g in groups], dim=1).cpu().numpy() \
                if groups else np.zeros((len(logits), 0), np.float32)
        return cls(list(keys), _numpy(labels), topk.cpu().numpy(), scores.cpu().numpy(), mass)

    @classmethod
    def concat(cls, parts: Sequence["Predictions"]) -> "Predictions":
        """Merge parts (e.g. gathered from DDP ranks), sorted by key.

        Raises ValueError on no parts, different K, or a key seen twice (a sample
        evaluated on two ranks would be counted twice)."""
        if not parts:
            raise ValueError("no predictions to concatenate")
        widths = {p.k for p in parts}
        if len(widths) > 1:
            raise ValueError(f"predictions with different top-k widths {sorted(widths)}")
        if len({p.mass is None for p in parts}) > 1:
            raise ValueError("some predictions have group masses and others not")
        keys = [key for p in parts for key in p.keys]
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        keys = [keys[i] for i in order]
        duplicates = sorted({a for a, b in zip(keys, keys[1:]) if a == b})
        if duplicates:
            raise ValueError(f"{len(duplicates)} duplicate sample keys, e.g. {duplicates[:3]}")
        return cls(
            keys,
            np.concatenate([p.labels for p in parts])[order],
            np.concatenate([p.topk for p in parts])[order],
            np.concatenate([p.scores for p in parts])[order],
            None if parts[0].mass is None else np.concatenate([p.mass for p in parts])[order],
        )

    def subset(self, index: np.ndarray) -> "Predictions":
        """The samples selected by a boolean mask [N] or integer indices, in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return Predictions([self.keys[i] for i in index], self.labels[index], self.topk[index], self.scores[index],
                           None if self.mass is None else self.mass[index])

    def to_parquet(self, path: str | Path, classes: list[dict[str, Any]]) -> None:
        """Write one row per sample (:data:`PARQUET_SCHEMA`) atomically to ``path`` (local or
        a URI); ``classes`` is the manifest class table, for names and the true class's type
        and shape."""
        n, k = self.topk.shape
        names = class_column(classes, "name", default="")
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))

        def lists(values: np.ndarray, kind: pa.DataType) -> pa.Array:
            return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), kind))

        columns = [
            pa.array(self.keys, pa.string()),
            pa.array(self.labels, pa.int64()),
            pa.array(names[self.labels], pa.string()),
            pa.array(class_column(classes, "type")[self.labels], pa.string()),
            pa.array(class_column(classes, "shape")[self.labels], pa.string()),
            lists(self.topk, pa.int64()),
            lists(self.scores, pa.float32()),
            lists(names[self.topk], pa.string()),
            pa.array(self.topk[:, 0] == self.labels, pa.bool_()),
            pa.array((self.topk == self.labels[:, None]).any(axis=1), pa.bool_()),
        ]
        schema = PARQUET_SCHEMA.with_metadata({_K_METADATA: str(k).encode()})
        table = pa.Table.from_arrays(columns, schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(path, sink.getvalue().to_pybytes())

    @classmethod
    def read_parquet(cls, path: str | Path) -> "Predictions":
        """Read a file written by :meth:`to_parquet` (local or a URI)."""
        table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
        n = table.num_rows
        k = int(table.schema.metadata[_K_METADATA])

        def matrix(column: str) -> np.ndarray:
            values = table.column(column).combine_chunks().flatten()
            return values.to_numpy(zero_copy_only=False).reshape(n, k)

        return cls(
            table.column("key").to_pylist(),
            table.column("true_class").to_numpy(),
            matrix("top5_classes"),
            matrix("top5_scores"),
        )
