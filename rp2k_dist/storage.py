"""Files on local disk or in object storage (s3://, gs://, any pyarrow.fs URI).

A location is a local path or a URI. URIs may carry pyarrow's filesystem parameters as a
query (``s3://rp2k/shards?endpoint_override=127.0.0.1:8333&scheme=http``); :func:`join`
appends path parts before the query, never into it. Endpoint and credentials otherwise
come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), as pyarrow reads them.

Every write closes its stream explicitly: pyarrow reports a failed upload of a stream
that is garbage-collected only as a logged "Error ignored", so a write that is not closed
by hand can fail silently. Writes are whole-object: local files go through a temp file
and a rename, objects appear only when their upload completes. Failures raise
:class:`StorageError` naming the location (and, for object stores, the bucket and the
credential variables).

Bytes read through :func:`read_range` are counted per process (:func:`bytes_read`), so a
loader can report how much of its shards it actually read.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from .errors import NotFoundError, StorageError  # noqa: F401  (storage.NotFoundError for callers)

#: Environment variables that configure pyarrow's filesystems (endpoints, credentials).
ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_")
CREDENTIALS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (endpoint: AWS_ENDPOINT_URL or ?endpoint_override=)"

_read_lock = threading.Lock()
_bytes_read = 0


def is_uri(path: str | Path) -> bool:
    """``s3://…``, ``gs://…``, ``file://…``: anything pyarrow.fs resolves; not a local path."""
    return "://" in str(path)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...``; a URI's query stays at the end (``s3://b/p?x=1`` + ``f`` -> ``s3://b/p/f?x=1``)."""
    parts = tuple(p.strip("/") for p in parts if p)
    if not is_uri(base):
        return str(Path(base).joinpath(*parts))
    s = urlsplit(str(base))
    path = "/".join([s.path.rstrip("/"), *parts])
    return urlunsplit((s.scheme, s.netloc, path, s.query, ""))


def absolute(location: str | Path) -> str:
    """A location every process can use whatever its working folder: a local path made
    absolute, a URI as it is (Ray workers and job drivers start in other folders)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def parent(location: str | Path) -> str:
    """The folder holding ``location`` (a URI keeps its scheme, bucket and query)."""
    if not is_uri(location):
        return str(Path(location).parent)
    s = urlsplit(str(location))
    return urlunsplit((s.scheme, s.netloc, s.path.rstrip("/").rsplit("/", 1)[0], s.query, ""))


def basename(location: str | Path) -> str:
    """The last part of a location's path (``s3://b/runs/g?x=1`` -> ``g``)."""
    if not is_uri(location):
        return Path(location).name
    return urlsplit(str(location)).path.rstrip("/").rsplit("/", 1)[-1]


def display(location: str | Path) -> str:
    """A location without its query (parameters may hold credentials)."""
    if not is_uri(location):
        return str(location)
    s = urlsplit(str(location))
    return urlunsplit((s.scheme, s.netloc, s.path, "", ""))


def bucket(location: str | Path) -> str | None:
    return (urlsplit(str(location)).netloc or None) if is_uri(location) else None


@lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    # One filesystem per endpoint and parameters, per process (S3 clients are costly to build).
    return pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))[0]


def environment() -> dict[str, str]:
    """This process's filesystem settings (``AWS_*``, ``GOOGLE_*``, ...).

    Worker processes from a forkserver inherit the forkserver's environment, not their
    parent's current one: a loader hands these to its workers (:func:`use_environment`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def use_environment(env: dict[str, str]) -> None:
    """Make ``env`` this process's filesystem settings (variables not in it are removed)."""
    if env == environment():
        return
    for key in environment():
        os.environ.pop(key)
    os.environ.update(env)
    _filesystem.cache_clear()  # filesystems keep the credentials they were built with


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location and the path inside it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    s = urlsplit(str(location))
    fs = _filesystem(s.scheme, s.netloc, s.query)
    if s.scheme == "file":
        return fs, s.path
    return fs, f"{s.netloc}{s.path}".rstrip("/")


def _error(action: str, location: str | Path, err: Exception) -> StorageError:
    hint = ""
    if is_uri(location) and not str(location).startswith("file://"):
        hint = f"; check that bucket {bucket(location)!r} exists and that {CREDENTIALS} are right"
    return StorageError(f"cannot {action} {display(location)}: {err}{hint}")


def open_input(location: str | Path):
    """A readable binary stream."""
    fs, path = resolve(location)
    try:
        return fs.open_input_stream(path)
    except FileNotFoundError as err:
        raise NotFoundError(f"{display(location)} does not exist") from err
    except OSError as err:
        raise _error("read", location, err) from err


def read_bytes(location: str | Path) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def read_range(location: str | Path, offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset`` (fewer at the end of a short file), one ranged read."""
    fs, path = resolve(location)
    try:
        with fs.open_input_file(path) as handle:
            data = handle.read_at(length, offset)
    except FileNotFoundError as err:
        raise NotFoundError(f"{display(location)} does not exist") from err
    except OSError as err:
        raise _error("read", location, err) from err
    global _bytes_read
    with _read_lock:
        _bytes_read += len(data)
    return data


def bytes_read() -> int:
    """Bytes this process has read through :func:`read_range`."""
    return _bytes_read


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file or object; readers never see a partial one."""
    fs, path = resolve(location)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        local = isinstance(fs, pafs.LocalFileSystem)
        target = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if local else path
        stream = fs.open_output_stream(target)
        try:
            stream.write(data)
        finally:
            stream.close()  # raises here if the upload failed
        if local:
            os.replace(target, path)
    except OSError as err:
        raise _error("write", location, err) from err


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def put_file(local: str | Path, location: str | Path) -> None:
    """Move the local file ``local`` to ``location``: a rename on the same disk (a copy to
    a temp file beside the target, then a rename, across disks), an upload to object
    storage; readers never see a partial file either way."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(local, path)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                target = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                shutil.copyfile(local, target)
                os.replace(target, path)
                os.unlink(local)
        except OSError as err:
            raise _error("write", location, err) from err
        return
    try:
        stream = fs.open_output_stream(path)
        try:
            with open(local, "rb") as source:
                shutil.copyfileobj(source, stream, 8 << 20)
        finally:
            stream.close()
    except OSError as err:
        raise _error("write", location, err) from err
    os.unlink(local)


def file_info(location: str | Path) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise _error("look up", location, err) from err


def exists(location: str | Path) -> bool:
    return file_info(location).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return file_info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """A local folder, or a prefix of object storage that holds objects."""
    return file_info(location).type == pafs.FileType.Directory


def mtime(location: str | Path) -> float | None:
    """When a file was last written (unix seconds), None when it does not exist."""
    info = file_info(location)
    if info.type == pafs.FileType.NotFound or info.mtime is None:
        return None
    return info.mtime.timestamp()


def size(location: str | Path) -> int | None:
    """Bytes of a file, None when it does not exist."""
    info = file_info(location)
    return None if info.type == pafs.FileType.NotFound else info.size


def listdir(location: str | Path) -> list[str]:
    """Names directly under ``location`` (empty when it does not exist)."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise _error("list", location, err) from err
    return sorted(info.base_name for info in infos)


def walk(location: str | Path) -> list[str]:
    """Every file under ``location``, recursively, as paths relative to it (``/``-separated),
    sorted; empty when it does not exist."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise _error("list", location, err) from err
    base = path.rstrip("/") + "/"
    return sorted(info.path[len(base):] for info in infos if info.type == pafs.FileType.File)


def delete_file(location: str | Path) -> None:
    """Delete one file or object; nothing when it does not exist."""
    if is_file(location):
        fs, path = resolve(location)
        try:
            fs.delete_file(path)
        except OSError as err:
            raise _error("delete", location, err) from err


def delete_dir(location: str | Path) -> None:
    if exists(location):
        fs, path = resolve(location)
        try:
            fs.delete_dir(path)
        except OSError as err:
            raise _error("delete", location, err) from err


class RunStorage:
    """The folder ``<storage_path>/<name>`` of one run (or any folder: :meth:`at`), local,
    mounted or in object storage; every read and write goes through this module."""

    def __init__(self, storage_path: str | Path, name: str):
        self.uri = join(absolute(storage_path), name)
        self.fs, self.path = resolve(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    @classmethod
    def at(cls, location: str | Path) -> "RunStorage":
        """The folder at ``location`` (a run folder, a report folder, a storage path)."""
        return cls(location, "")

    @property
    def name(self) -> str:
        return basename(self.uri)

    def __repr__(self) -> str:
        return f"RunStorage({display(self.uri)!r})"

    def location(self, relative: str = "") -> str:
        return join(self.uri, relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        write_bytes(self.location(relative), data)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def read_bytes(self, relative: str) -> bytes:
        return read_bytes(self.location(relative))

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def put_file(self, relative: str, local: str | Path) -> None:
        put_file(local, self.location(relative))

    def mtime(self, relative: str = "") -> float | None:
        return mtime(self.location(relative))

    def exists(self, relative: str = "") -> bool:
        return exists(self.location(relative))

    def listdir(self, relative: str = "") -> list[str]:
        return listdir(self.location(relative))

    def delete_dir(self, relative: str) -> None:
        delete_dir(self.location(relative))

    def local_path(self, relative: str = "") -> Path | None:
        return Path(self.location(relative)) if self.is_local else None
