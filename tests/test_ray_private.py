"""Every private Ray API of rp2k_dist/launch/ray_private.py still exists where it is used.

A Ray upgrade that moves one of them fails here, by name, instead of in a sweep (the
placement-group cleaner would be back, or the GCS scan would raise mid-run). No cluster is
started: these check the names and shapes the module relies on; the behaviour is tested by
tests/test_tune.py (leaked groups freed) and tests/test_submit.py (upload excludes).
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import ray
from packaging.requirements import Requirement
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from rp2k_dist.launch import ray_private

REPO = Path(__file__).resolve().parents[1]


def test_ray_is_pinned_to_the_tested_minor_versions():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [Requirement(d) for d in deps if re.match(r"ray\b", d)]
    assert ray_dep.specifier.contains(ray.__version__)
    upper = [s for s in ray_dep.specifier if s.operator == "<"]
    assert upper and upper[0].version.count(".") == 1, "pin below the next minor release, e.g. <2.61"


def test_the_placement_group_cleaner_callback_is_found_and_dropped():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    before = trainer._create_default_callbacks()
    assert any(isinstance(c, PlacementGroupCleanerCallback) for c in before)
    ray_private.drop_placement_group_cleaner(trainer)
    after = trainer._create_default_callbacks()
    assert not any(isinstance(c, PlacementGroupCleanerCallback) for c in after)
    assert len(after) == len(before) - 1  # nothing else is left out


def test_the_gcs_placement_group_table_has_the_fields_read():
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    assert callable(state._connect_and_get_accessor)
    fields = set(PlacementGroupTableData.DESCRIPTOR.fields_by_name)
    assert {"placement_group_id", "creator_job_id", "creator_actor_id", "creator_actor_dead", "is_detached",
            "state"} <= fields
    assert PlacementGroupTableData.REMOVED != PlacementGroupTableData.CREATED


def test_the_working_dir_packaging_helpers_exist(tmp_path):
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    assert isinstance(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, str)
    assert callable(ray_constants.get_runtime_env_default_excludes)
    assert callable(packaging._get_excludes) and callable(packaging.get_excludes_from_ignore_files)
    for name in ray_private.PACKAGING_LOGGERS:
        importlib.import_module(name)  # the loggers quietened are those of real modules
    (tmp_path / "keep.py").write_text("")
    (tmp_path / "drop.tar").write_text("")
    matchers = ray_private.working_dir_matchers(tmp_path, ["*.tar"])
    assert any(m(tmp_path / "drop.tar") for m in matchers)
    assert not any(m(tmp_path / "keep.py") for m in matchers)


def test_the_failure_policy_hook_exists():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    assert callable(DefaultFailurePolicy.make_decision) and FailureDecision.RAISE
    assert callable(TorchTrainer._initialize_and_run_controller)
    trainer_cls = ray_private.fail_fast_trainer(TorchTrainer, lambda failures: True)
    assert issubclass(trainer_cls, TorchTrainer) and trainer_cls.__name__ == "TorchTrainer"
    importlib.import_module(ray_private.TOKEN_NOTICE_LOGGER)  # the logger quietened is a real module's


def test_the_preemption_poll_interval_variable_is_the_one_ray_train_reads():
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback

    assert constants.PREEMPTION_POLL_INTERVAL_S_ENV_VAR == ray_private.PREEMPTION_POLL_ENV
    import os

    os.environ[ray_private.PREEMPTION_POLL_ENV] = "0.25"
    try:
        assert PreemptionCallback()._poll_interval_s == 0.25
    finally:
        del os.environ[ray_private.PREEMPTION_POLL_ENV]
