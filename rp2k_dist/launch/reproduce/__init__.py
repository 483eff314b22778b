"""``rp2k reproduce``: every experiment of the paper as one graph of ordinary training runs
on a Ray cluster, then one report.

- :mod:`.graph`: the runs (:data:`~.graph.PAPER`), what each needs, and the scheduler that
  trains them, then evaluates the ensemble and UMAP as one Ray task;
- :mod:`.plan`: ``--plan``, each run's GPU-hours and the wall time of the schedule;
- :mod:`.report`: ``reproduce.md`` and the self-contained ``reproduce.html``;
- :mod:`.seeds`: ``--seeds N``, the reproduction once per seed and ``seeds.md``.

Everything is read and written through :mod:`rp2k_dist.storage`, so the storage path may be
a local or mounted folder, s3:// or gs://.
"""

from __future__ import annotations

from collections.abc import Sequence

from ... import storage
from .graph import (
    GENERAL,
    PAPER,
    PARTS,
    SPECIALISTS,
    TABLE4,
    Experiment,
    Reproduction,
    RunRecord,
    build_configs,
    check_inputs,
    error_line,
    evaluate,
    evaluation_is_current,
    is_finished,
    run_graph,
    select,
    split_sets,
)
from .report import copy_report, write_report
from .seeds import reproduce_seeds

__all__ = ["GENERAL", "PAPER", "PARTS", "SPECIALISTS", "TABLE4", "Experiment", "Reproduction", "RunRecord",
           "build_configs", "check_inputs", "error_line", "evaluate", "evaluation_is_current", "is_finished",
           "reproduce", "run_graph", "select", "split_sets"]


def reproduce(shards: str, storage_path: str, only: Sequence[str] | None = None, sets: Sequence[str] = (),
              address: str | None = None, verbose: bool = False, umap_samples: int = 20_000,
              report_dir: str | None = None, seeds: int = 1) -> int:
    """The whole reproduction on the Ray cluster at ``address``: the runs, the ensemble and
    UMAP step, and the report in the storage path (copied to ``report_dir`` too when
    given); 0 when every run finished. ``seeds`` > 1: once per seed in
    ``<storage_path>/seed-<s>``, then ``seeds.md`` (:mod:`.seeds`)."""
    import ray

    from ..console import ray_init_options
    from ..trainer import cluster_line, ray_address

    shards, storage_path = storage.absolute(shards), storage.absolute(storage_path)
    experiments = select(only)
    if seeds > 1:
        return reproduce_seeds(reproduce, range(seeds), shards, storage_path, [e.name for e in experiments], sets,
                               report_dir, only=only, address=address, verbose=verbose, umap_samples=umap_samples)
    configs = build_configs(experiments, shards, storage_path, sets)
    if not ray.is_initialized():
        ray.init(address=ray_address(address), **ray_init_options(verbose))
    print(cluster_line(ray_address(address) == "local"), flush=True)
    check_inputs(experiments, configs, ray.cluster_resources())
    print(f"{len(experiments)} runs under {storage.display(storage_path)}: {', '.join(e.name for e in experiments)}",
          flush=True)
    state = Reproduction(storage_path, driver={"node": ray.get_runtime_context().get_node_id()})
    run_graph(experiments, configs, state, say=lambda line: print(line, flush=True))
    evaluate(state, shards, umap_samples, say=lambda line: print(line, flush=True))
    markdown, page = write_report(storage_path, state.records, configs)
    print(f"report: {storage.display(markdown)}\n        {storage.display(page)} (self-contained)", flush=True)
    if report_dir:
        copy_report(storage_path, report_dir)
        print(f"        copied to {report_dir}", flush=True)
    failed = {n: r for n, r in state.records.items() if r.state != "finished"}
    for name, record in failed.items():
        print(f"{name}: {record.state}: {record.error}", flush=True)
    return 1 if failed else 0
