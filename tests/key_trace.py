"""A step observer for tests: which samples each rank trained at each optimiser step.

Passed to a run as ``observers=[KeyTrace(folder)]`` (``train_worker`` in one process, or
``run_training`` / ``build_trainer``, which hand it to every Ray Train worker pickled).
Every training process appends one JSON line per step to its own file in ``folder``:
rank, world size, the global step the process resumed from (``origin``), an id shared
by the ranks of one attempt (rank 0's start time), the epoch, the step and its keys.
``pace`` seconds of sleep after each step let a test's events (a drain, a kill) fall
inside a run. ``hold`` names a file holding a world size: while it exists, the ranks of a
smaller world wait after each step (at most ``hold_limit_s``), so a shrunk run is still
training when the node it can grow onto has joined.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rp2k_dist.engine import distributed as dist_utils


class KeyTrace:
    def __init__(self, folder: str | Path, pace: float = 0.0, hold: str | Path | None = None,
                 hold_limit_s: float = 240.0):
        self.folder = Path(folder)
        self.pace = pace
        self.hold = Path(hold) if hold is not None else None
        self.hold_limit_s = hold_limit_s
        self._path: Path | None = None
        self._head: dict[str, int] = {}

    def __call__(self, epoch: int, global_step: int, keys: Sequence[str]) -> None:
        if self._path is None:  # the first step of this process: every rank is here at once
            attempt = dist_utils.all_gather_objects(time.time_ns())[0]
            rank = dist_utils.rank()
            self._head = {"rank": rank, "world_size": dist_utils.world_size(), "origin": global_step - 1,
                          "attempt": attempt}
            self.folder.mkdir(parents=True, exist_ok=True)
            self._path = self.folder / f"rank{rank}-{os.getpid()}-{time.time_ns()}.jsonl"
        with self._path.open("a") as out:
            out.write(json.dumps({**self._head, "epoch": epoch, "step": global_step, "keys": list(keys)}) + "\n")
        if self.pace:
            time.sleep(self.pace)
        deadline = time.monotonic() + self.hold_limit_s
        while self.hold is not None and time.monotonic() < deadline and self._held():
            time.sleep(0.2)

    def _held(self) -> bool:
        try:
            return self._head["world_size"] < int(self.hold.read_text())
        except (FileNotFoundError, ValueError):
            return False


def read_trace(folder: str | Path) -> list[dict[str, Any]]:
    """Every step line of a trace folder."""
    return [json.loads(line) for path in sorted(Path(folder).glob("*.jsonl")) for line in path.read_text().splitlines()]


def trained_steps(lines: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The steps that count, by global step: a step trained again after a restart replaces
    the lost one (the attempt with the latest resume point at or before it wins; of two
    attempts resumed from the same point, the later)."""

    def attempt(line: dict[str, Any]) -> tuple[int, int]:
        return line["origin"], line.get("attempt", 0)

    best: dict[int, tuple[int, int]] = {}
    for line in lines:
        best[line["step"]] = max(best.get(line["step"], (-1, -1)), attempt(line))
    steps: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        if attempt(line) == best[line["step"]]:
            steps.setdefault(line["step"], []).append(line)
    return steps
