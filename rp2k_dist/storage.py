"""Run storage on a local folder or object storage (s3://, gs://) through pyarrow.fs.

On a multi-node cluster every worker must see the same run folder (checkpoints,
metrics, predictions): use object storage or a shared mount as ``run.storage_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    """``s3://…``, ``gs://…``, ``hdfs://…``: anything pyarrow.fs resolves; not a local path."""
    return "://" in str(path)


def open_input(path: str | Path):
    """A readable binary stream for a local path or an object-store URI (pyarrow.fs)."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(str(path))
        return fs.open_input_stream(inner)
    return open(path, "rb")


def read_bytes(path: str | Path) -> bytes:
    with open_input(path) as stream:
        return stream.read()


class RunStorage:
    """The folder ``<storage_path>/<name>`` of one run."""

    def __init__(self, storage_path: str, name: str):
        if "://" in storage_path:
            self.fs, base = pafs.FileSystem.from_uri(storage_path)
            self.uri = storage_path.rstrip("/") + "/" + name
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(storage_path).resolve())
            self.uri = str(Path(base) / name)
        self.path = base.rstrip("/") + "/" + name
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def _full(self, relative: str) -> str:
        return f"{self.path}/{relative}" if relative else self.path

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a file atomically on local disk (object stores are atomic per object)."""
        full = self._full(relative)
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        target = full + (f".tmp-{os.getpid()}" if self.is_local else "")
        with self.fs.open_output_stream(target) as stream:
            stream.write(data)
        if self.is_local:
            self.fs.move(target, full)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self._full(relative)) as stream:
            return stream.read()

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self._full(relative)).type != pafs.FileType.NotFound

    def listdir(self, relative: str = "") -> list[str]:
        """Names directly under ``relative`` (empty when it does not exist)."""
        if not self.exists(relative):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._full(relative)))
        return sorted(info.base_name for info in infos)

    def delete_dir(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.delete_dir(self._full(relative))

    def local_path(self, relative: str = "") -> Path | None:
        return Path(self._full(relative)) if self.is_local else None
