"""MLflow tracking of a training run (``rp2k train --mlflow-uri``), from the driver.

The driver already reads every new epoch of ``metrics.jsonl`` for the console
(:class:`rp2k_dist.launch.console.EpochPrinter`); :class:`MlflowRun` logs the same rows at
step = epoch, and the resolved config as parameters. The run folder is the MLflow run's
identity (tag ``rp2k.run_folder``): resuming a run continues its MLflow run.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from typing import Any

from ..config import ConfigError, ExperimentConfig

FOLDER_TAG = "rp2k.run_folder"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's parameter value limit
    return out


class MlflowRun:
    """One MLflow run (experiment = ``run.name``) fed by the driver."""

    def __init__(self, uri: str, config: ExperimentConfig, folder: str):
        if find_spec("mlflow") is None:
            raise ConfigError(f"--mlflow-uri {uri} needs the mlflow package, which is not installed "
                              "(pip install mlflow-skinny)")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.run.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.run.name)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{FOLDER_TAG}` = '{folder}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=config.run.name,
                                                 tags={FOLDER_TAG: folder}).info.run_id
            params = [Param(k, v) for k, v in _flatten(config.to_dict()).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, Any]) -> None:
        """One epoch's numeric metrics at step ``metrics["epoch"]``."""
        step = int(metrics["epoch"])
        rows = [self._metric(k, float(v), 0, step) for k, v in sorted(metrics.items())
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=rows)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def __enter__(self) -> "MlflowRun":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Marks the run FINISHED, or FAILED when training raised."""
        self.finish(failed=exc_type is not None)
