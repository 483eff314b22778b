"""What an operator sees while a run trains: one line per epoch, a progress bar on a
terminal, and Ray's own chatter off unless asked for.

The driver is blocked in ``TorchTrainer.fit`` while the workers train, so
:class:`EpochPrinter` watches the run folder from a thread: every new row of
``metrics.jsonl`` becomes one summary line, and ``progress.json`` (rank 0 writes it about
once a second, only when a bar is shown) drives a tqdm bar over the epoch's steps.

Ray is quieted through its own settings: ``ray.init(log_to_driver=False)`` keeps worker
output off the driver's console (Ray still writes it to its session logs, and every rank
keeps a copy in ``<run>/logs/``), ``logging_level`` drops its INFO lines, and the level of the one
logger that announces token authentication on every start is raised. ``--verbose``
restores Ray's defaults.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TextIO

from .. import run_folder
from ..errors import StorageError
from ..run_folder import read_preemptions
from ..storage import RunStorage
from .ray_private import TOKEN_NOTICE_LOGGER

PROGRESS_FILE = run_folder.PROGRESS
LOG_DIR = run_folder.LOGS


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` for a driver that prints its own summary;
    ``verbose`` keeps all of Ray's console output."""
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if verbose:
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def format_epoch(metrics: dict[str, Any], epochs: int, elapsed: float, eta: float | None) -> str:
    """``epoch 3/30  loss 1.234  train top-1 45.6 %  val top-1 40.1 %  top-5 70.2 %  812 img/s
    elapsed 0:04:10  ETA 0:37:30`` (validation shows ``-`` on epochs without evaluation)."""
    val1, val5 = metrics.get("val_top1"), metrics.get("val_top5")
    val = f"val top-1 {val1:5.1f} %  top-5 {val5:5.1f} %" if val1 is not None else "val top-1     -    top-5     -  "
    if "holdout_top1" in metrics:  # run.select_epoch=holdout
        val += f"  holdout top-1 {metrics['holdout_top1']:5.1f} % (best: epoch {metrics['selected_epoch']})"
    width = len(str(epochs))
    return (f"epoch {metrics['epoch']:>{width}}/{epochs}  loss {metrics['train_loss']:.3f}  "
            f"train top-1 {metrics['train_top1']:5.1f} %  {val}  {metrics['images_per_second']:.0f} img/s  "
            f"elapsed {_clock(elapsed)}  ETA {_clock(eta) if eta is not None else '-'}")


def format_preemption(event: dict[str, Any]) -> str:
    """``preemption: node 1e23ac81 (ranks [2]) drained, 86 s before its deadline; saved
    epoch_0000_step_0000002 (96 samples of epoch 1) before it`` (one ``preemptions.jsonl`` row)."""
    nodes = ", ".join(n[:8] for n in event["node_ids"]) or "?"
    left = "no deadline given" if event["seconds_left"] is None else f"{event['seconds_left']:.0f} s before its deadline"
    if event["saved"] != "mid-epoch checkpoint":
        saved = f"{event['checkpoint']} follows at the end of epoch {event['epoch']}"
    else:
        before = {True: " before it", False: " AFTER it", None: ""}[event["saved_before_deadline"]]
        saved = f"saved {event['checkpoint']} ({event['consumed']} samples of epoch {event['epoch']}){before}"
    return f"preemption: node {nodes} (ranks {event['ranks']}) drained, {left}; {saved}"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class EpochPrinter:
    """Prints each new epoch of a run while it trains (a daemon thread polling the run
    folder); a tqdm bar over the steps when ``bar`` (an interactive terminal). Each new
    row also goes to every ``on_epoch`` callable (MLflow); ``quiet`` prints nothing."""

    def __init__(self, storage: RunStorage, epochs: int, out: TextIO | None = None, bar: bool = False,
                 interval: float = 0.5, quiet: bool = False, on_epoch: list[Callable[[dict], None]] | None = None):
        self.storage, self.epochs, self.interval = storage, epochs, interval
        self.out = out or sys.stdout
        self.bar, self.quiet = bar and not quiet, quiet
        self.on_epoch = on_epoch or []
        self.printed = len(self._history())  # a resumed run: its earlier epochs are not news
        self.preemptions = len(self._preemption_events())  # drain notices printed (or from before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()
        self._epoch_times: list[float] = []
        self._tqdm = None

    def __enter__(self) -> "EpochPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last epoch, written just before fit returned
        self._close_bar()

    def _history(self) -> list[dict[str, Any]]:
        try:
            text = self.storage.read_bytes(run_folder.METRICS).decode()
        except StorageError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written: read it next time
                break
        return rows

    def _preemption_events(self) -> list[dict[str, Any]]:
        try:
            return read_preemptions(self.storage)
        except (StorageError, json.JSONDecodeError):  # being written: read it next time
            return []

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Print the epochs that appeared since the last poll; update the bar."""
        history = self._history()
        for metrics in history[self.printed:]:
            now = time.monotonic()
            self._epoch_times.append(now)
            self._close_bar()
            if not self.quiet:
                print(format_epoch(metrics, self.epochs, now - self._start, self._eta(metrics, now)),
                      file=self.out, flush=True)
            for callback in self.on_epoch:
                callback(metrics)
        self.printed = max(self.printed, len(history))
        events = self._preemption_events()
        for event in events[self.preemptions:]:
            self._close_bar()
            if not self.quiet:
                print(format_preemption(event), file=self.out, flush=True)
        self.preemptions = max(self.preemptions, len(events))
        if self.bar:
            self._update_bar()

    def _eta(self, metrics: dict[str, Any], now: float) -> float:
        """Remaining epochs times the epoch time seen: between summaries once two are in,
        before that the first epoch's own time (Ray's start-up does not count)."""
        remaining = self.epochs - metrics["epoch"]
        if len(self._epoch_times) >= 2:
            per_epoch = (self._epoch_times[-1] - self._epoch_times[0]) / (len(self._epoch_times) - 1)
        else:
            per_epoch = metrics.get("epoch_seconds", now - self._start)
        return remaining * per_epoch

    def _update_bar(self) -> None:
        try:
            progress = json.loads(self.storage.read_bytes(PROGRESS_FILE))
        except (StorageError, json.JSONDecodeError):
            return
        if progress["epoch"] <= self.printed:  # an epoch already summarised
            return
        from tqdm import tqdm

        if self._tqdm is None or self._tqdm.desc != f"epoch {progress['epoch']}":
            self._close_bar()
            self._tqdm = tqdm(total=progress["steps"], desc=f"epoch {progress['epoch']}", unit="step",
                              leave=False, file=sys.stderr)
        self._tqdm.n = progress["step"]
        self._tqdm.refresh()

    def _close_bar(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


class StepProgress:
    """Rank 0's steps of the current epoch in ``progress.json``, at most once per
    ``interval`` seconds (the driver's progress bar reads it)."""

    def __init__(self, storage: RunStorage, interval: float = 1.0):
        self.storage, self.interval = storage, interval
        self._last = 0.0

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval or step == steps:
            self._last = now
            self.storage.write_text(PROGRESS_FILE, json.dumps({"epoch": epoch, "step": step, "steps": steps}))


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def worker_log(storage: RunStorage, rank: int) -> Iterator[None]:
    """Copy this worker's stdout and stderr (where Ray Train's own handlers print), the
    records of Python's root logger and a final traceback to ``<run>/logs/rank-<rank>.log``. Appended as it goes on a local
    run folder (it survives a killed worker); uploaded at the end on object storage."""
    path = storage.local_path(f"{LOG_DIR}/rank-{rank}.log")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink: TextIO = open(path, "a", encoding="utf-8", buffering=1)
    else:
        sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    sink.write(f"--- rank {rank} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, sink)), contextlib.redirect_stderr(_Tee(sys.stderr, sink)):
            yield
    except BaseException:
        sink.write(traceback.format_exc())
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        if path is None:
            previous = storage.read_bytes(f"{LOG_DIR}/rank-{rank}.log").decode() if storage.exists(
                f"{LOG_DIR}/rank-{rank}.log") else ""
            storage.write_text(f"{LOG_DIR}/rank-{rank}.log", previous + sink.getvalue())
        sink.close()


def artefact_lines(storage: RunStorage) -> list[str]:
    """Where a finished run's files are, one per line, for the end-of-run summary."""
    base = storage.uri
    entries = [("metrics", run_folder.METRICS), ("Table 2", run_folder.TABLE2), ("evaluation", run_folder.EVALUATION),
               ("predictions", run_folder.PREDICTIONS), ("TensorBoard", run_folder.TENSORBOARD),
               ("worker logs", LOG_DIR), ("config", run_folder.CONFIG)]
    lines = [f"  {label + ':':<13}{base}/{name}" for label, name in entries if storage.exists(name)]
    checkpoints = [n for n in storage.listdir() if n.startswith("epoch_") or n.startswith("checkpoint")]
    if checkpoints:
        lines.append(f"  {'checkpoint:':<13}{base}/{checkpoints[-1]} (the latest)")
    return lines
