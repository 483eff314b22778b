"""Per-SKU metadata: the optional table that maps a class folder to its product facts.

RP2K's per-SKU metadata file has no confirmed public format, so the table is optional,
may be CSV or Parquet, and its column names are mapped by configuration
(:class:`MetadataColumns`). Without a table every class has meta-category ``"unknown"``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import MetadataError

#: The paper's two meta-category systems, seven values each (PAPER.md, Table 1).
TYPES: tuple[str, ...] = (
    "dairy",
    "liquor",
    "beer",
    "cosmetics",
    "soft drinks",
    "seasonings",
    "tobacco",
)
SHAPES: tuple[str, ...] = (
    "bottle",
    "can",
    "box",
    "bag",
    "jar",
    "handled bottle",
    "package",
)
UNKNOWN = "unknown"

#: Product facts kept per class (besides the class folder name itself).
FIELDS: tuple[str, ...] = ("sku", "name", "brand", "type", "shape", "size", "flavour")


@dataclass(frozen=True)
class MetadataColumns:
    """Column names of the metadata table, one per product fact.

    Only ``class_folder`` is required; a fact whose column is ``None`` or absent from the
    table is left empty (``type``/``shape`` then read ``"unknown"``).
    """

    class_folder: str = "class"
    sku: str | None = "sku"
    name: str | None = "name"
    brand: str | None = "brand"
    type: str | None = "type"
    shape: str | None = "shape"
    size: str | None = "size"
    flavour: str | None = "flavour"

    @classmethod
    def from_mapping(cls, mapping: dict[str, str | None] | None) -> "MetadataColumns":
        """Build from ``{"type": "category", ...}``; unknown keys are a config error."""
        mapping = dict(mapping or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise MetadataError(f"unknown metadata column keys {unknown}; known: {sorted(known)}")
        return cls(**mapping)


@dataclass(frozen=True)
class ProductInfo:
    """What the metadata says about one class (SKU)."""

    sku: str = ""
    name: str = ""
    brand: str = ""
    type: str = UNKNOWN
    shape: str = UNKNOWN
    size: str = ""
    flavour: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # the table's unmapped columns, as text

    def as_dict(self) -> dict[str, object]:
        """The facts; ``extra`` only when the table had unmapped columns (so packs made
        from tables without them keep their class table and fingerprint)."""
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out


@dataclass(frozen=True)
class MetadataMapping:
    """How a table's columns were mapped onto the product facts."""

    path: Path
    columns: list[str]  # the table's columns, in file order
    mapped: dict[str, str]  # fact -> column (class_folder included)
    empty: list[str]  # facts no column filled (not mapped, absent, or every cell blank)
    unmapped: list[str]  # columns no fact reads (kept per class as ``extra``)

    def lines(self) -> list[str]:
        """What ``rp2k pack`` prints: the columns, the mapping, and warnings with the fix."""
        out = [f"metadata columns: {', '.join(self.columns)}",
               "mapped: " + ", ".join(f"{fact} <- {column}" for fact, column in self.mapped.items())]
        if self.unmapped:
            out.append(f"unmapped columns (kept per class as extra): {', '.join(self.unmapped)}")
        for fact in self.empty:
            guess = next((c for c in self.unmapped if fact in c.lower()), None)
            fix = f"--metadata-column {fact}={guess}" if guess else f"--metadata-column {fact}=<column>"
            out.append(f"warning: {fact} is left empty (no column filled it); map it with {fix}")
        return out


def describe_mapping(path: str | Path, columns: MetadataColumns = MetadataColumns()) -> MetadataMapping:
    """Which of the table's columns feed which fact, and which facts stay empty."""
    path = Path(path)
    names, rows = _read_rows(path)
    mapped = {fact: column for fact in ("class_folder", *FIELDS)
              if (column := getattr(columns, fact)) and column in names}
    empty = [fact for fact in FIELDS if fact not in mapped or not any(_text(r.get(mapped[fact])) for r in rows)]
    unmapped = [c for c in names if c not in mapped.values()]
    return MetadataMapping(path, list(names), mapped, empty, unmapped)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """Column names and rows of a CSV (UTF-8, BOM allowed, all text) or Parquet file."""
    if not path.exists():
        raise MetadataError(
            f"metadata table {path} does not exist; pass the CSV/Parquet file that maps "
            "class folders to sku/name/brand/type/shape, or leave it out"
        )
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            table = pq.read_table(path)
            return table.column_names, table.to_pylist()
        # csv, not pyarrow: every cell stays text (SKU ids like 00123 keep their zeros)
        # and the BOM that spreadsheet exports put in front of CJK files is dropped.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error) as err:
        raise MetadataError(f"cannot read metadata table {path}: {err}") from err


def load_metadata(
    path: str | Path, columns: MetadataColumns = MetadataColumns()
) -> dict[str, ProductInfo]:
    """Read the table into ``{class folder name: ProductInfo}``.

    Raises :class:`MetadataError` when the file is unreadable, the class-folder column is
    missing, or a class folder appears twice. Empty type/shape cells become ``"unknown"``;
    columns no fact reads are kept in ``extra``.
    """
    path = Path(path)
    column_names, rows = _read_rows(path)
    names = set(column_names)
    if columns.class_folder not in names:
        raise MetadataError(
            f"metadata table {path} has no class-folder column {columns.class_folder!r}; "
            f"its columns are {sorted(names)} (map yours with metadata_columns)"
        )
    used = {getattr(columns, f) for f in ("class_folder", *FIELDS)}
    unmapped = [c for c in column_names if c not in used]
    out: dict[str, ProductInfo] = {}
    for line, row in enumerate(rows, start=2):
        folder = _text(row.get(columns.class_folder))
        if not folder:
            raise MetadataError(f"{path}: row {line} has an empty {columns.class_folder!r}")
        if folder in out:
            raise MetadataError(f"{path}: class folder {folder!r} appears twice (row {line})")
        facts: dict[str, object] = {"extra": {c: _text(row.get(c)) for c in unmapped if _text(row.get(c))}}
        for fact in FIELDS:
            column = getattr(columns, fact)
            value = _text(row.get(column)) if column and column in names else ""
            if fact in ("type", "shape"):
                value = value.lower() or UNKNOWN
            facts[fact] = value
        out[folder] = ProductInfo(**facts)
    return out


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()
