"""What the intervals cost: Table 2 (every row with its bootstrap interval) of a prediction
set of RP2K's test size, 39,457 images over 2,388 classes, against the same table's point
figures alone, in the same run.

    .venv/bin/python bench/bootstrap_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rp2k_dist.data.metadata import SHAPES, TYPES
from rp2k_dist.engine.machine_speed import reference_line
from rp2k_dist.evaluation import metrics
from rp2k_dist.evaluation.predictions import Predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, c = 39_457, 2_388
    classes = [{"index": i, "name": f"c{i}", "type": TYPES[i % 7], "shape": SHAPES[i % 7]} for i in range(c)]
    labels = rng.integers(0, c, n)
    topk = np.stack([np.where(rng.random(n) < 0.9, labels, rng.integers(0, c, n))] +
                    [rng.integers(0, c, n) for _ in range(4)], axis=1)
    predictions = Predictions([f"k{i}" for i in range(n)], labels, topk, np.zeros((n, 5), np.float32))
    with_ci, without = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics.accuracy_table(predictions, classes)
        with_ci.append(time.perf_counter() - start)
        start = time.perf_counter()
        [metrics.top_k_accuracy(labels, topk, k) for k in (1, 5) for _ in range(16)]
        without.append(time.perf_counter() - start)
    print(f"Table 2 with intervals, {n} images, {c} classes, 16 rows: median {statistics.median(with_ci):.2f} s "
          f"(repeats {' '.join(f'{t:.2f}' for t in with_ci)}); the point figures alone {statistics.median(without):.3f} s")
    print(reference_line())


if __name__ == "__main__":
    main()
