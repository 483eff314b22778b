"""The exceptions of rp2k-dist: one family rooted in :class:`Rp2kError`.

Every error that a user causes and can fix (a config value, a missing file, bad data, a
bucket that refuses a write, a cluster that is too small) is an :class:`Rp2kError`. Its
message says what is wrong and where, its :attr:`~Rp2kError.hint` what to do next, and
:attr:`~Rp2kError.retryable` whether running the same thing again could succeed: a storage
hiccup can, a wrong config value cannot. Ray Train restarts a worker group only for
retryable errors (and for deaths of workers and nodes); the ``rp2k`` command prints an
``Rp2kError`` as one line plus its hint. Any other exception is a bug and keeps its
traceback.

``docs/troubleshooting.md`` has one section per class below, with its causes and fixes.
"""

from __future__ import annotations

TROUBLESHOOTING = "docs/troubleshooting.md"


class Rp2kError(Exception):
    """Root of every error of this project that a user can act on.

    ``hint``: the next step for the user (printed under the message); each class has a
    default. ``retryable``: whether the same operation may succeed if repeated as it is.
    """

    retryable: bool = False
    hint: str = f"see {TROUBLESHOOTING}"

    def __init__(self, message: str = "", *, hint: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        if retryable is not None:
            self.retryable = retryable


def is_retryable(error: BaseException) -> bool:
    """Whether a restart could get past ``error``: False for a non-retryable
    :class:`Rp2kError`, True for anything else (a dead worker, a lost node, a bug that may
    depend on timing)."""
    return not isinstance(error, Rp2kError) or error.retryable


# ----------------------------------------------------------------------------- configuration
class ConfigError(Rp2kError):
    """A config file, key or value is wrong (the message names the key)."""

    hint = f"fix the key named above in the preset or with --set KEY=VALUE; {TROUBLESHOOTING}#configerror"


class PreflightError(ConfigError):
    """Problems seen by the driver before any worker started; ``problems``: one line each."""

    hint = f"each line names a key and its fix; {TROUBLESHOOTING}#preflighterror"

    def __init__(self, problems: list[str] | str, *, hint: str | None = None):
        # a str: the joined message, as unpickling passes it back
        self.problems = problems.splitlines() if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems), hint=hint)


# ----------------------------------------------------------------------------- input data
class DataError(Rp2kError):
    """The dataset, its metadata or its packed shards cannot be used as they are."""

    hint = f"{TROUBLESHOOTING}#dataerror"


class DatasetLayoutError(DataError):
    """The dataset root does not hold an RP2K-like tree (``all/{train,test}/<class>/``)."""

    hint = (f"unzip rp2k_dataset.zip so that ROOT/all/train/<class>/<image> exists (a plain ROOT/train tree works "
            f"too), or make a synthetic one with `rp2k synth`; {TROUBLESHOOTING}#datasetlayouterror")


class MetadataError(DataError):
    """The metadata table is missing, unreadable, or lacks a mapped column."""

    hint = f"map your columns with --metadata-column FACT=COLUMN; {TROUBLESHOOTING}#metadataerror"


class ManifestError(DataError):
    """A shard folder without a readable, complete manifest (``dataset.json``)."""

    hint = f"pack the dataset with `rp2k pack SRC OUT` (a rerun resumes); {TROUBLESHOOTING}#manifesterror"


class MetaCategoryError(DataError):
    """No class of the dataset has the requested meta-category."""

    hint = f"pick one of the values listed above for data.meta_category; {TROUBLESHOOTING}#metacategoryerror"


class CorruptImageError(DataError):
    """A file that should hold an image cannot be decoded (packing skips and lists it)."""


class CorruptDataError(DataError):
    """More training samples failed to decode than ``data.max_corrupt_fraction`` allows."""

    hint = f"run `rp2k verify SHARDS` and repack the shards it names; {TROUBLESHOOTING}#corruptdataerror"


class PackError(DataError):
    """The output of ``rp2k pack`` cannot take this pack (e.g. it holds a different one)."""

    hint = f"pick an empty output or pass --overwrite; {TROUBLESHOOTING}#packerror"


# ----------------------------------------------------------------------------- models and runs
class WeightsNotFoundError(Rp2kError):
    """A weights file is not there: a local file or checkpoint, or torchvision's ImageNet
    file, which is not in the torch.hub cache and could not be downloaded."""

    hint = f"{TROUBLESHOOTING}#weightsnotfounderror"


class WeightsChecksumError(WeightsNotFoundError):
    """A downloaded ImageNet file whose sha256 does not match the hash in its name (not kept)."""

    hint = f"check the server it came from (RP2K_WEIGHTS_MIRROR) and any proxy; {TROUBLESHOOTING}#weightschecksumerror"


class WeightsMismatchError(Rp2kError):
    """A weights file or checkpoint does not fit the model it is loaded into."""

    hint = f"check model.name and the file, or set model.partial_weights=true; {TROUBLESHOOTING}#weightsmismatcherror"


class CheckpointError(Rp2kError):
    """A file or folder that is not a checkpoint (or run folder) of this project."""

    hint = f"give a run folder, a checkpoint folder or checkpoint.pt; {TROUBLESHOOTING}#checkpointerror"


class RunFolderError(Rp2kError):
    """A run folder holds another experiment than the one asked for, or lacks what a step needs."""

    hint = f"{TROUBLESHOOTING}#runfoldererror"


class NonFiniteLossError(Rp2kError):
    """The loss became NaN or infinite: the run stops instead of saving a broken model."""

    hint = f"{TROUBLESHOOTING}#nonfinitelosserror"


class ExportCheckError(Rp2kError):
    """An exported model does not reproduce the PyTorch model's outputs."""

    hint = f"{TROUBLESHOOTING}#exportcheckerror"


class GalleryError(Rp2kError):
    """A gallery folder that is missing, incomplete or not a gallery of this project."""

    hint = f"build it with `rp2k gallery build CKPT SOURCE --out G`; {TROUBLESHOOTING}#galleryerror"


class GalleryModelMismatchError(GalleryError):
    """A gallery used with another model than the one whose embeddings it holds."""

    hint = (f"query the gallery with the checkpoint that built it, or rebuild it with this one; "
            f"{TROUBLESHOOTING}#gallerymodelmismatcherror")


# ----------------------------------------------------------------------------- storage and clusters
class StorageError(Rp2kError):
    """A read or write of a local file or object failed; the message says where and why."""

    retryable = True  # a bucket or network hiccup may pass; a restart resumes from the checkpoint
    hint = f"check the path, the bucket and the credential variables; {TROUBLESHOOTING}#storageerror"


class NotFoundError(StorageError, FileNotFoundError):
    """A file or object that is not there (also a :class:`FileNotFoundError`)."""

    retryable = False
    hint = f"check the path; {TROUBLESHOOTING}#notfounderror"


class SubmitError(Rp2kError):
    """A Ray job could not be submitted or queried."""

    hint = f"{TROUBLESHOOTING}#submiterror"


# ----------------------------------------------------------------------------- serving


class RequestError(Rp2kError):
    """A request ``rp2k serve`` refuses: the HTTP ``status`` and a JSON body with a ``code``."""

    hint = f"docs/serving.md#limits; {TROUBLESHOOTING}#requesterror"

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}
