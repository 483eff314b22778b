"""Worker processes start from a forkserver that already imported the data path.

(This module imports nothing of the data path itself: a worker that unpickles its task
imports this module, so anything it finds loaded came from the preload.)
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor

from rp2k_dist.data.workers import PRELOAD, worker_context


def _loaded_modules() -> list[str]:
    return [name for name in (*PRELOAD, "torch", "cv2") if name in sys.modules]


def test_workers_start_with_the_data_path_already_imported():
    with ProcessPoolExecutor(1, mp_context=worker_context()) as pool:
        assert pool.submit(_loaded_modules).result() == [*PRELOAD, "torch", "cv2"]


def test_other_start_methods_are_passed_through():
    assert worker_context("spawn").get_start_method() == "spawn"
