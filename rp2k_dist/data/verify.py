"""Re-check every shard of a packed dataset against its manifest."""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import storage
from ..errors import StorageError
from .manifest import Manifest, ShardInfo


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one shard."""

    shard: str
    what: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.what}"


def _sha256(location: str) -> str:
    digest = hashlib.sha256()
    with storage.open_input(location) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _diagnose(location: str, shard: ShardInfo, expected: dict[str, str]) -> list[str]:
    """Say which samples of a shard whose checksum failed are damaged."""
    found: dict[str, str] = {}
    problems = []
    try:
        with storage.open_input(location) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                key = member.name[: -len(".jpg")]
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                found[key] = hashlib.sha256(data).hexdigest()
    except (tarfile.TarError, OSError, EOFError, StorageError) as err:
        problems.append(f"unreadable past {len(found)} of {shard.samples} samples ({err}): truncated or corrupt")
    for key, digest in expected.items():
        if key not in found:
            if not problems:
                problems.append(f"sample {key} missing")
        elif found[key] != digest:
            problems.append(f"sample {key}: image bytes differ from the manifest (sha256)")
    if not problems:
        problems.append("file checksum differs from the manifest (tar headers or metadata changed)")
    return problems


def verify_shards(root: str | Path, progress: bool = False) -> list[Problem]:
    """Check each listed shard exists with the recorded size and sha256; on a mismatch,
    name the damaged samples. ``root`` is a local folder or a URI (s3://...). Returns the
    problems (empty list = all good)."""
    manifest = Manifest.load(root)
    index = manifest.index().select(["key", "shard", "sha256"]).to_pylist()
    by_shard: dict[str, dict[str, str]] = {}
    for row in index:
        by_shard.setdefault(row["shard"], {})[row["key"]] = row["sha256"]
    problems: list[Problem] = []
    shards = [s for split in manifest.data["splits"] for s in manifest.shards(split)]
    for shard in tqdm(shards, desc="verify", unit="shard", disable=not progress or None):
        location = manifest.location(shard.name)
        size = storage.size(location)
        if size is None:
            problems.append(Problem(shard.name, "missing (listed in dataset.json, not in the dataset folder)"))
            continue
        if size == shard.bytes and _sha256(location) == shard.sha256:
            continue
        if size != shard.bytes:
            problems.append(Problem(shard.name, f"size {size} bytes, manifest says {shard.bytes}"))
        problems.extend(Problem(shard.name, what) for what in _diagnose(location, shard, by_shard.get(shard.name, {})))
    listed = {s.name for s in shards}
    for extra in storage.listdir(manifest.location_root):
        if extra.endswith(".tar") and extra not in listed:
            problems.append(Problem(extra, "tar file not listed in dataset.json (ignored by loaders)"))
    return problems
