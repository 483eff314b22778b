"""Initial weights: torchvision's ImageNet files and weights files of this project.

Two sources:

* :func:`imagenet_state_dict`: torchvision's ImageNet weights, read from torch.hub's cache
  (``$TORCH_HOME/hub/checkpoints/<file>``) exactly where torchvision would have saved them.
  A missing file is downloaded there once per node (the other processes of the node wait on
  a lock beside it, then read it) with the sha256 prefix in its name checked, from
  torchvision's URL or from the same file name under ``$RP2K_WEIGHTS_MIRROR``. Offline, or
  with ``RP2K_OFFLINE=1`` (no attempt), it is an error that says which file to place where.
* :func:`load_weights_file`: any local file holding a torchvision state dict, a state dict of
  this project's models, or a checkpoint of this project (state dict under ``"model"``),
  which may also be in the runs' own object storage (``s3://…/epoch_0030/checkpoint.pt``:
  a specialist of ``rp2k reproduce`` starts from its general model's checkpoint there).
  Keys are matched by their *canonical* name, the key without the wrapper prefixes
  ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``net.`` (:class:`ResNetClassifier`,
  :class:`InceptionClassifier`) and ``backbone.`` (:class:`ApiNet`); so a ResNet-34
  checkpoint loads into API-Net's backbone and fc, and vice versa. A specialist built
  from a general checkpoint of this project gets the general classifier's rows of its
  own classes (matched by global class index), so before any training it predicts its
  classes exactly as the general model restricted to them does.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import urllib.error
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import Inception_V3_Weights, ResNet34_Weights, WeightsEnum

from .. import storage
from ..errors import ConfigError, NotFoundError, WeightsChecksumError, WeightsMismatchError, WeightsNotFoundError

try:
    import fcntl
except ImportError:  # Windows: no node lock (see _lock)
    fcntl = None

IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "inception_v3": Inception_V3_Weights.IMAGENET1K_V1,
}

#: Set to 1 (or true, yes, on) to forbid downloads: a missing ImageNet file is an error at once.
OFFLINE_ENV = "RP2K_OFFLINE"
#: A URL prefix (``http(s)://host/path/`` or ``file:///shared/folder/``) holding torchvision's
#: files under their own names, used instead of download.pytorch.org (air-gapped clusters).
MIRROR_ENV = "RP2K_WEIGHTS_MIRROR"
#: Seconds a download may wait on one socket operation (connect, each read) before it fails.
DOWNLOAD_TIMEOUT_S = 60.0

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "backbone.")


def imagenet_file(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name`` in torch.hub's cache."""
    weights = _imagenet_weights(name)
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def imagenet_url(name: str) -> str:
    """Where the ImageNet weights of ``name`` are downloaded from: torchvision's URL, or
    its file name under ``$RP2K_WEIGHTS_MIRROR`` when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{imagenet_file(name).name}" if mirror else _imagenet_weights(name).url


def downloads_allowed() -> bool:
    """False when ``$RP2K_OFFLINE`` forbids downloading missing ImageNet weights."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict of ``name`` ("resnet34" | "inception_v3"), from the
    torch.hub cache (1000-class heads, torchvision key names).

    A missing file is downloaded into the cache first, once per node: the first process
    takes an exclusive lock on ``<file>.lock`` beside it and downloads, the others wait on
    the lock and then read the file. The download is torchvision's own
    (``WeightsEnum.get_state_dict`` is ``torch.hub.load_state_dict_from_url(url, ...)``, here
    with ``check_hash=True``, https://pytorch.org/vision/stable/models.html): torch.hub
    writes a temporary file beside the target, checks that its sha256 starts with the hex
    digits after the ``-`` of the file name (``<name>-<sha256 prefix>.pth``), and only then
    moves it into place (https://pytorch.org/docs/stable/hub.html#torch.hub.load_state_dict_from_url).

    Raises :class:`WeightsNotFoundError` naming the file, the folder and torchvision's URL
    when the file is missing and cannot be downloaded (``$RP2K_OFFLINE`` set, no network,
    a mirror without it), :class:`WeightsChecksumError` when what arrived does not match
    its name (nothing is kept).
    """
    path = imagenet_file(name)
    if not path.is_file():
        state = _download(name, path)
        if state is not None:
            return state
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_file(
    model: nn.Module,
    path: str | Path,
    classes: Sequence[int] | None = None,
    partial: bool = False,
) -> LoadReport:
    """Load the local file ``path`` into ``model`` in place; returns what happened.

    Accepted contents: a plain torchvision state dict, a state dict of any model of this
    project, or a checkpoint dict with the state dict under ``"model"`` (its ``"classes"``
    table, each entry with a ``"global_index"``, says which dataset class each classifier
    row predicts). Tensors are matched by canonical key (see the module docstring); file
    tensors the model does not have are ignored (counted in the report).

    Classifier tensors (the model's ``classifier_prefixes``: a ResNet's and API-Net's
    ``fc``, InceptionV3's ``fc`` and ``AuxLogits.fc``) are taken row by row by global
    class index when ``classes`` (the global index of each of the model's labels) is given
    and the file is a checkpoint with a class table: a specialist built from a general
    model starts with the general model's rows of its classes ("sliced"). Without such a
    mapping an equal-shape classifier loads as is and one of another shape is left new
    (e.g. a torchvision file's 1000-class ImageNet head).

    Errors (:class:`ValueError`, naming the tensors), unless ``partial``: a backbone tensor
    (outside the model's ``head_prefixes``) that the file lacks or holds with another
    shape, and a class of ``classes`` that the file's class table lacks. With ``partial``
    these tensors are left new and listed in the report. A file from which no tensor loads
    at all is always a :class:`WeightsMismatchError`; a missing file :class:`WeightsNotFoundError`.
    """
    if storage.is_uri(path):
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        except NotFoundError:
            raise WeightsNotFoundError(f"weights file not found: {storage.display(path)}") from None
    else:
        if not Path(path).is_file():
            raise WeightsNotFoundError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    path = storage.display(path)  # as messages and the report name it (a URI without its query)
    source_classes = None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        source_classes = _global_indices(state.get("classes"))
        state = state["model"]
    if not isinstance(state, Mapping):
        raise WeightsMismatchError(f"{path} holds a {type(state).__name__}, not a state dict or a checkpoint dict")
    source = {_canonical(key): value for key, value in state.items() if isinstance(value, Tensor)}
    rows = _class_rows(source_classes, classes, path) if classes is not None and source_classes else None
    head_prefixes = tuple(getattr(model, "head_prefixes", ()))
    classifier_prefixes = tuple(getattr(model, "classifier_prefixes", ()))

    report = LoadReport(str(path), file_tensors=len(source))
    loaded: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, current in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        tensor = source.get(_canonical(key))
        if key.startswith(classifier_prefixes) and tensor is not None and rows is not None:
            if isinstance(rows, str):  # classes missing from the file's class table
                problems.append(f"{key} ({rows})")
                report.new.append(key)
                continue
            picked = tensor[rows]
            if picked.shape != current.shape:
                problems.append(f"{key} (file {tuple(tensor.shape)} -> rows {tuple(picked.shape)}, model {tuple(current.shape)})")
                report.new.append(key)
            elif picked.shape == tensor.shape and torch.equal(rows, torch.arange(len(tensor))):
                loaded[key] = tensor
                report.loaded.append(key)
            else:
                loaded[key] = picked
                report.sliced.append(key)
        elif tensor is not None and tensor.shape == current.shape:
            loaded[key] = tensor
            report.loaded.append(key)
        else:
            report.new.append(key)
            if not key.startswith(head_prefixes):
                problems.append(f"{key} ({'missing' if tensor is None else f'file {tuple(tensor.shape)}, model {tuple(current.shape)}'})")
    if not loaded:
        raise WeightsMismatchError(f"nothing matched: no tensor of {path} fits {type(model).__name__} (by name and shape)")
    if problems and not partial:
        raise WeightsMismatchError(
            f"{path} cannot fill {len(problems)} tensors of {type(model).__name__}: {'; '.join(problems[:5])}"
            + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "; ask for partial loading (model.partial_weights=true) to leave them at their initial values"
        )
    model.load_state_dict(loaded, strict=False)
    return report


@dataclass
class LoadReport:
    """What :func:`load_weights_file` did with each tensor of the model (state-dict keys;
    ``num_batches_tracked`` counters are not listed)."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied as they are
    sliced: list[str] = field(default_factory=list)  # classifier rows picked by global class index
    new: list[str] = field(default_factory=list)  # left at their initial values
    file_tensors: int = 0  # tensors in the file, used or not

    def summary(self) -> str:
        """One log line: counts, then the sliced and the new tensors by name."""
        parts = [f"weights {self.source}: {len(self.loaded)} tensors loaded, {len(self.sliced)} sliced by class"]
        if self.sliced:
            parts[-1] += f" ({', '.join(self.sliced)})"
        parts.append(f"{len(self.new)} left new" + (f" ({', '.join(self.new)})" if self.new else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _global_indices(classes: object) -> list[int] | None:
    """The global class index of each row of a checkpoint's classifier, from its class
    table (``[{"global_index": g, ...}, ...]``); None when the table has none."""
    if not isinstance(classes, Sequence) or not classes:
        return None
    if not all(isinstance(c, Mapping) and isinstance(c.get("global_index"), int) for c in classes):
        return None
    return [int(c["global_index"]) for c in classes]


def _class_rows(source: list[int], target: Sequence[int], path: str) -> Tensor | str:
    """Row of the file's classifier for each of the model's classes (int64 [C]), or a
    message naming the classes the file does not know."""
    position = {g: i for i, g in enumerate(source)}
    unknown = [int(g) for g in target if int(g) not in position]
    if unknown:
        return f"{storage.basename(path)} has no row for global classes {unknown[:10]}" + (" ..." if len(unknown) > 10 else "")
    return torch.tensor([position[int(g)] for g in target], dtype=torch.int64)


def _download(name: str, path: Path) -> dict[str, Tensor] | None:
    """Download the ImageNet file of ``name`` to ``path`` under the node lock; its state dict,
    or None when another process of the node downloaded it while this one waited."""
    if not downloads_allowed():
        why = f"{OFFLINE_ENV}={os.environ[OFFLINE_ENV]} forbids downloading them"
        raise WeightsNotFoundError(_not_cached(name, path, why))
    url = imagenet_url(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise WeightsNotFoundError(_not_cached(name, path, f"the folder cannot take a download ({err})")) from None
    try:
        _lock(lock)
        if path.is_file():
            return None
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), map_location="cpu",
                                                      progress=False, check_hash=True, file_name=path.name,
                                                      weights_only=True)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise WeightsChecksumError(
            f"{path.name} downloaded from {url} does not match the sha256 prefix in its name (torch.hub: {err}); "
            f"nothing was kept in {path.parent}. Check the server ({MIRROR_ENV} when set) and any proxy on the way, "
            f"or place torchvision's file there."
        ) from None
    except (OSError, http.client.HTTPException) as err:
        message = _not_cached(name, path, f"downloading them from {url} failed ({_reason(err)})")
        if not os.environ.get(MIRROR_ENV, "").strip():
            message += f" On a cluster without internet, {MIRROR_ENV} can name a server holding torchvision's files."
        raise WeightsNotFoundError(message) from None
    finally:
        os.close(lock)


def _lock(fd: int) -> None:
    """Wait for the exclusive flock(2) on ``fd``; the kernel releases it when the descriptor
    closes or its process dies. Where there is none (Windows, a file system without locks)
    each process may download, and each file still lands whole."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass


def _not_cached(name: str, path: Path, why: str) -> str:
    return (f"ImageNet weights for {name!r} are not in the torch.hub cache and {why}: place the file {path.name} in "
            f"the folder {path.parent} (fetch it on a machine with network from {_imagenet_weights(name).url}), or "
            f"point TORCH_HOME at a folder whose hub/checkpoints holds it.")


def _reason(err: BaseException) -> str:
    """Why a download failed, in a few words: ``HTTP 404 Not Found``, ``[Errno 111] Connection
    refused``, ``timed out``."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default socket timeout while torch.hub downloads (its ``urlopen`` takes none), unless
    one is set already: an unreachable host or a stalled transfer fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_weights(name: str) -> WeightsEnum:
    try:
        return IMAGENET_WEIGHTS[name]
    except KeyError:
        raise ConfigError(f"no ImageNet weights for {name!r}; known: {sorted(IMAGENET_WEIGHTS)}") from None


def _canonical(key: str) -> str:
    """``key`` without leading wrapper prefixes: ``module._orig_mod.net.conv1.weight`` -> ``conv1.weight``."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key
