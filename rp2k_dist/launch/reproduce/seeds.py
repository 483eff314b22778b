"""``rp2k reproduce --seeds N``: the whole reproduction once per seed, then the figures of
every run as mean ± std over the seeds.

Seed s is an ordinary reproduction in ``<storage path>/seed-<s>`` with ``run.seed=s`` set on
every run (model initialisation, data order, augmentation; the dataset is the same), with
its own ``reproduce.json`` and report, so an interrupted command resumes as a single
reproduction does: finished seeds are not trained again. The seeds run one after another;
within a seed, runs go side by side as the cluster allows. ``seeds.md`` in the storage path
gives each run's test top-1 / top-5 per seed with mean ± std, then the general ResNet-34's
headline figures over the seeds and the ensemble's gain over them
(:mod:`rp2k_dist.analysis.seed_summary`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from ... import run_folder, storage
from ...analysis.seed_summary import summary_markdown
from ...evaluation.stats import format_mean_std
from .graph import GENERAL

SEEDS_REPORT = "seeds.md"


def seed_folder(storage_path: str, seed: int) -> str:
    """The storage path of seed ``seed``'s reproduction."""
    return storage.join(storage_path, f"seed-{seed}")


def _final(location: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(location, run_folder.EVALUATION)))["final"]
    except (storage.NotFoundError, KeyError, json.JSONDecodeError):
        return {}


def seeds_markdown(storage_path: str, names: Sequence[str], seeds: Sequence[int]) -> str:
    """Markdown: every run's test top-1 and top-5 per seed with mean ± std, then the general
    run's headline figures over the seeds (when it is among ``names``)."""
    header = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"# The paper reproduced over {len(seeds)} seeds", "",
             f"Each seed is a whole reproduction in `seed-<s>/` (its own `{run_folder.REPRODUCE}.md`), "
             "with `run.seed=<s>` on every run; the dataset is the same.", "",
             f"| run | figure | {header} | mean ± std |", "|---|---|" + "---:|" * (len(seeds) + 1)]
    for name in names:
        finals = [_final(storage.join(seed_folder(storage_path, s), name)) for s in seeds]
        for key, label in (("val_top1", "test top-1"), ("val_top5", "test top-5")):
            values = [float(f[key]) if key in f else float("nan") for f in finals]
            cells = " | ".join("–" if v != v else f"{v:.2f}" for v in values)
            lines.append(f"| {name} | {label} | {cells} | {format_mean_std(values)} |")
    if GENERAL in names:
        lines += ["", f"## {GENERAL}: Table 2, Table 3 and the open set over the seeds", "",
                  summary_markdown([storage.join(seed_folder(storage_path, s), GENERAL) for s in seeds], seeds)]
    return "\n".join(lines) + "\n"


def reproduce_seeds(reproduce: Callable[..., int], seeds: Sequence[int], shards: str, storage_path: str,
                    names: Sequence[str], sets: Sequence[str] = (), report_dir: str | None = None,
                    **options) -> int:
    """``reproduce`` (the single reproduction) once per seed, then ``seeds.md``; 0 when every
    run of every seed finished. A failed seed does not stop the next one."""
    codes = []
    for seed in seeds:
        location = seed_folder(storage_path, seed)
        print(f"\n######## seed {seed} ({', '.join(map(str, seeds))}): {storage.display(location)}", flush=True)
        codes.append(reproduce(shards, location, sets=[*sets, f"run.seed={seed}"],
                               report_dir=storage.join(report_dir, f"seed-{seed}") if report_dir else None, **options))
    text = seeds_markdown(storage_path, names, seeds)
    storage.write_text(storage.join(storage_path, SEEDS_REPORT), text)
    if report_dir:
        storage.write_text(storage.join(report_dir, SEEDS_REPORT), text)
    print(f"\n{text}\nwritten to {storage.display(storage.join(storage_path, SEEDS_REPORT))}", flush=True)
    return max(codes, default=0)
