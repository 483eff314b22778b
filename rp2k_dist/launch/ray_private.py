"""Every private Ray API this project uses, in one place.

Each function below reaches into Ray internals because Ray has no public way to do what it
does; the comment on each names the Ray issue or the missing API it works around. Ray is
pinned to the minor versions these were checked against (``pyproject.toml``), and
``tests/test_ray_private.py`` imports every name used here, so an upgrade that moves one
fails at once and by name, not in the middle of a sweep.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence


def drop_placement_group_cleaner(trainer: Any) -> None:
    """Leave Ray Train's ``PlacementGroupCleaner`` out of this TorchTrainer's run.

    Works around ray-project/ray#54305: Train 2.60 cleans a stopped run's placement group
    from a detached actor that asks the State API (at an address guessed from the
    environment) whether the controller still lives; without a dashboard it never gets an
    answer, and with two Ray clusters on one machine it may ask the wrong one and remove a
    *running* trial's group. The sweep driver frees those groups itself instead
    (:func:`orphaned_placement_groups`). There is no public switch for the callback.
    """
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    defaults = trainer._create_default_callbacks  # an AttributeError here means Ray renamed it
    trainer._create_default_callbacks = lambda: [
        c for c in defaults() if not isinstance(c, PlacementGroupCleanerCallback)]


def orphaned_placement_groups() -> tuple[list[bytes], int]:
    """(ids of this job's live placement groups whose creating actor is dead, number of this
    job's live placement groups created by any actor).

    Works around ray-project/ray#54305 (a stopped trial's group stays reserved until the
    job ends): ``ray.util.placement_group_table()`` does not say whether a group's creator
    is dead, the GCS table (``creator_actor_dead``) does.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    orphans, by_actors = [], 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(raw)
        created_by_actor = group.creator_actor_id.strip(b"\xff") != b""  # nil ids are all 0xff
        if (group.creator_job_id != job or not created_by_actor or group.is_detached
                or group.state == PlacementGroupTableData.REMOVED):
            continue
        by_actors += 1
        if group.creator_actor_dead:
            orphans.append(group.placement_group_id)
    return orphans, by_actors


#: Loggers of Ray's working_dir packaging (quietened while a job's code is uploaded).
PACKAGING_LOGGERS = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")


#: Ray's logger of the notice that a new local cluster turned token authentication on by
#: default (printed on every start; the cluster stays as secure without it).
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def fail_fast_trainer(trainer_cls: type, is_fatal: Callable[[dict[int, BaseException]], bool]) -> type:
    """``trainer_cls`` (TorchTrainer) whose controller raises at once when
    ``is_fatal(worker_failures)`` (a config or data error that every restart would repeat),
    and otherwise follows Ray Train's default failure policy (``FailureConfig.max_failures``).

    Ray Train 2.60 has no public hook for this: the failure policy classes live in
    ``ray.train.v2._internal`` and the trainer builds its policy inside ``fit``.
    """
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class FailFastPolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and is_fatal(training_failed_error.worker_failures):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    class FailFastTrainer(trainer_cls):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = FailFastPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    FailFastTrainer.__name__ = FailFastTrainer.__qualname__ = trainer_cls.__name__
    return FailFastTrainer


def working_dir_matchers(root: Path, excludes: Sequence[str]) -> list[Callable[[Path], bool]]:
    """The matchers Ray's ``working_dir`` upload applies under ``root``: ``excludes``, Ray's
    default excludes and the root's ``.gitignore`` / ``.rayignore``.

    Ray has no public API to ask which files a ``working_dir`` upload leaves out; asking its
    own matchers is the only way to check a preset is uploaded exactly as Ray will do it.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    matchers = [_get_excludes(root, ray_constants.get_runtime_env_default_excludes() + list(excludes))]
    quiet = logging.getLogger(f"{__name__}.ignore_files")
    quiet.setLevel(logging.WARNING)
    matchers += get_excludes_from_ignore_files(root, include_gitignore=include_gitignore, logger=quiet)
    return matchers


#: Ray Train's environment variable for how often its ``PreemptionWatcher`` polls Ray Core
#: for drained nodes (5 s by default). There is no public setting; it is read by the
#: controller from its environment, i.e. that of the raylet that started it. The tests
#: set 0.5 s so a drain is seen within a step or two; 5 s is fine for real spot notices
#: (30 s on GCP, 2 min on AWS).
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
