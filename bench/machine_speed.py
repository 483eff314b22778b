"""The machine's reference speed (rp2k_dist.engine.machine_speed), to quote beside a timing.

    .venv/bin/python bench/machine_speed.py [--repeats 3]

Prints each repeat and the median: images per second of ResNet-34 training steps at 48 px
with this process's torch threads.
"""

from __future__ import annotations

import argparse
import statistics

from rp2k_dist.engine.machine_speed import reference_line, reference_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    speeds = [reference_speed() for _ in range(args.repeats)]
    print("repeats:", " ".join(f"{s:.1f}" for s in speeds), "img/s")
    print(reference_line(statistics.median(speeds)))


if __name__ == "__main__":
    main()
