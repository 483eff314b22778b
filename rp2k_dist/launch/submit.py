"""Submit training runs to a running Ray cluster through Ray's Job Submission API.

Kept in one module because it is one client of one API: the upload (root, excludes, runtime
env), the entrypoint, the connection (address, token, the translation of its errors) and the
job verbs (submit, wait, follow, status, logs, stop, list) all go through :func:`connect` and
share its constants; no part of it is used without the others.

``rp2k submit PRESET --address http://HEAD:8265 [--set k=v ...]`` uploads the repository
(the folder holding ``pyproject.toml``) as the job's ``working_dir`` and runs
``python -m rp2k_dist.cli train PRESET --set ...`` as the job's driver on the cluster; that
driver's ``ray.init()`` attaches to the job's own cluster (Ray sets ``RAY_ADDRESS`` for
jobs). ``rp2k jobs status|logs|stop|list`` are thin wrappers around the same client.

Choices (each documented where it is made):

- **Entrypoint** ``python -m rp2k_dist.cli train`` rather than the ``rp2k`` script: it
  runs the uploaded code whether rp2k-dist is installed on the cluster or not (the working
  dir is first on the job's ``PYTHONPATH``), also with ``--pip`` where only the
  dependencies are installed. The preset is passed relative to the repository root,
  overrides and flags are forwarded verbatim, every word shell-quoted.
- **Upload**: the repository minus :data:`EXCLUDES` (virtualenvs, shards, runs, data, VCS,
  benchmark output, caches, tar files). The patterns are gitignore-style, matched by Ray
  against paths relative to the working dir; the top-level ones are anchored with ``/``
  because a bare ``data`` (or ``data/``) also drops the package folder ``rp2k_dist/data/``.
- **Dependencies**: none by default, the cluster image provides them (see cluster/README.md);
  ``--pip`` installs the ``[project] dependencies`` of ``pyproject.toml`` per job, minus
  ``ray`` itself (the cluster's Ray must stay the one running the job).
- **Job id**: ``rp2k-<run name>-<UTC time>-<4 hex>`` unless ``--submission-id`` is given.
  It is never the run name alone: the Jobs API refuses a submission id it has seen before,
  while submitting the same run name again is exactly how a run resumes. The run name and
  preset are in the job's metadata (shown by ``rp2k jobs list``).
- **Authentication**: the client sends a token when ``RAY_AUTH_MODE=token`` is set (Ray reads
  it from ``RAY_AUTH_TOKEN``, else ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``), or
  the token of ``--auth-token-file`` as an explicit ``Authorization`` header (Ray's client
  keeps a header given by the caller). The token itself is never put into the runtime env
  (which anyone with dashboard access can read); ``RAY_AUTH_MODE`` is passed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, TextIO

from ..config import RUN_FLAGS, flag_overrides, is_sweep_preset, load_config, resolve_preset
from .ray_private import PACKAGING_LOGGERS, working_dir_matchers
from ..errors import ConfigError, SubmitError

if TYPE_CHECKING:  # ray is imported lazily: `rp2k --help` stays fast
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

#: What the job's working_dir upload leaves out (gitignore syntax, relative to the repo root).
EXCLUDES: list[str] = [
    "/.git", "/.venv", "/venv", "/shards", "/runs", "/data", "/bench/out", "/build", "/dist",
    "__pycache__", ".pytest_cache", "*.egg-info", "*.tar", "*.pyc",
]

#: How the job's driver starts the training (see the module docstring).
DEFAULT_LAUNCHER: tuple[str, ...] = ("python", "-m", "rp2k_dist.cli")

#: ``rp2k train`` flags forwarded by ``rp2k submit`` (argparse dest -> command-line flag).
FORWARDED_FLAGS: dict[str, str] = {dest: "--" + dest.replace("_", "-") for dest in RUN_FLAGS}

#: What a job can run: ``rp2k train`` or ``rp2k tune`` (a sweep preset, one with ``search_space:``).
COMMANDS = ("train", "tune")

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

AUTH_HELP = (
    "This cluster uses Ray token authentication. Run with RAY_AUTH_MODE=token and the cluster's token "
    "in ~/.ray/auth_token or RAY_AUTH_TOKEN (or point --auth-token-file at it), see cluster/README.md "
    "'Authentication':\n"
    "  launcher clusters: export RAY_AUTH_MODE=token   (the token is ~/.ray/auth_token, made by "
    "`ray get-auth-token --generate` before `ray up`; `ray get-auth-token` prints it)\n"
    "  KubeRay:           export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl get secret rp2k "
    "-o jsonpath='{.data.auth_token}' | base64 -d)"
)


# --------------------------------------------------------------------------- building a job


def find_root(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the current directory) that holds
    ``pyproject.toml`` and the ``rp2k_dist`` package (so another project is never uploaded);
    None if there is none."""
    path = Path(start if start is not None else Path.cwd()).resolve()
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "rp2k_dist").is_dir():
            return folder
    return None


def is_excluded(root: str | Path, path: str | Path, excludes: Sequence[str] = EXCLUDES) -> bool:
    """Whether Ray's working_dir packaging drops ``path`` (or a folder above it) under ``excludes``.

    Uses Ray's own matchers (:func:`.ray_private.working_dir_matchers`): ``excludes``, Ray's
    default excludes, and the ``.gitignore`` / ``.rayignore`` at the root (Ray also reads those
    of sub-folders; not checked here). Ray walks the tree top-down and skips an excluded folder with
    everything below it, so every folder on the way is checked.
    """
    root = Path(os.path.abspath(root))
    path = Path(os.path.abspath(path if Path(path).is_absolute() else root / path))  # no symlink resolving
    matchers = working_dir_matchers(root, excludes)
    relative = path.relative_to(root)
    steps = [root.joinpath(*relative.parts[: n + 1]) for n in range(len(relative.parts))]
    return any(match(step) for step in steps for match in matchers)


def build_entrypoint(preset: str | Path, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None,
                     launcher: Sequence[str] = DEFAULT_LAUNCHER, command: str = "train") -> str:
    """The job's shell command: ``python -m rp2k_dist.cli train PRESET --set K=V ... --FLAG VALUE``.

    ``preset`` is used as given (pass it relative to the working dir, the job's cwd); every
    word is quoted with :func:`shlex.quote`, so values with spaces, quotes or CJK characters
    arrive unchanged. ``flags`` maps argparse names (``workers``, ``gpus_per_worker``, ``name``,
    ``storage_path``, ``shards``) to values; None values are left out.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown rp2k command {command!r}; known: {', '.join(COMMANDS)}")
    words = [*launcher, command, preset if isinstance(preset, str) else Path(preset).as_posix()]
    for override in overrides:
        words += ["--set", override]
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in FORWARDED_FLAGS:
            raise ValueError(f"unknown rp2k train flag {key!r}; known: {sorted(FORWARDED_FLAGS)}")
        words += [FORWARDED_FLAGS[key], str(value)]
    return " ".join(shlex.quote(word) for word in words)


def project_dependencies(root: str | Path) -> list[str]:
    """``[project] dependencies`` of ``root/pyproject.toml``, without ``ray`` itself."""
    path = Path(root) / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SubmitError(f"--pip reads the dependencies from {path}, which does not exist",
                          hint="run rp2k submit from the repository") from None
    deps = data.get("project", {}).get("dependencies", [])
    name = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
    return [d for d in deps if (m := name.match(d)) is None or m.group(1).lower().replace("_", "-") != "ray"]


def build_runtime_env(root: str | Path, pip: bool = False) -> dict[str, Any]:
    """The job's runtime_env: ``working_dir`` = ``root`` minus :data:`EXCLUDES`; with ``pip`` the
    project's dependencies (default: none, the cluster image has them); ``env_vars`` with
    ``PYTHONUNBUFFERED=1`` (log lines arrive while they are written) and ``RAY_AUTH_MODE`` when it
    is set here. Never the token: the runtime env is visible to anyone with dashboard access."""
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("RAY_AUTH_MODE"):
        env_vars["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    runtime_env: dict[str, Any] = {
        "working_dir": str(Path(root).resolve()),
        "excludes": list(EXCLUDES),
        "env_vars": env_vars,
    }
    if pip:
        runtime_env["pip"] = project_dependencies(root)
    return runtime_env


def default_submission_id(run_name: str) -> str:
    """``rp2k-<run name>-<UTC yyyymmdd-hhmmss>-<4 hex>``: readable, and new on every submission."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("_") or "run"
    return f"rp2k-{safe[:48]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------- the client


def resolve_address(address: str | None = None) -> str:
    """``address`` if given, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` (as ``ray job submit``
    does); ``http://`` is added when no scheme is given. This is the dashboard (Jobs API)
    address, port 8265 by default, not the GCS port 6379."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                          "(the dashboard / Jobs API address; open a tunnel first, see cluster/README.md)")
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def read_token(path: str | Path) -> str:
    token_path = Path(path).expanduser()
    try:
        token = token_path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SubmitError(f"--auth-token-file {token_path} does not exist") from None
    if not token:
        raise SubmitError(f"--auth-token-file {token_path} is empty")
    return token


@contextlib.contextmanager
def _env_without(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _is_auth_error(err: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return True
    status = getattr(err, "status", None)  # aiohttp's WSServerHandshakeError / ClientResponseError
    if status in (401, 403):
        return True
    text = str(err).lower()
    return "authentication" in text or "unauthorized" in text or "missing authentication token" in text


@contextlib.contextmanager
def friendly_errors(address: str) -> Iterator[None]:
    """Turn Ray's client errors into :class:`SubmitError` with what to do next."""
    try:
        yield
    except SubmitError:
        raise
    except ConnectionError as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({err}). Is the tunnel open "
                          "(`ray dashboard cluster/aws-gpu.yaml`, `kubectl port-forward svc/rp2k-head-svc 8265:8265`)? "
                          "The address is the dashboard's (port 8265), not the GCS port 6379.") from None
    except Exception as err:  # noqa: BLE001 - classified below, re-raised otherwise
        import requests

        if isinstance(err, requests.exceptions.ConnectionError):  # the tunnel went away mid-way
            raise SubmitError(f"lost the connection to the Ray Jobs API at {address} ({err}); "
                              "is the tunnel still open?") from None
        if _is_auth_error(err):
            invalid = "invalid" in str(err).lower() or getattr(err, "status", None) == 403
            what = ("the cluster refused the token that was sent (wrong or stale token)" if invalid
                    else "the cluster requires an authentication token and none was sent")
            raise SubmitError(f"{address}: {what}.\n{AUTH_HELP}\nRay said: {err}") from None
        raise


def connect(address: str | None = None, auth_token_file: str | Path | None = None) -> JobSubmissionClient:
    """A :class:`ray.job_submission.JobSubmissionClient` for ``address`` (see :func:`resolve_address`).

    The given address wins over ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` (Ray's client
    otherwise lets those variables override its argument). ``auth_token_file``: send that token.
    """
    url = resolve_address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:
        raise SubmitError(f"job submission needs the dashboard client of ray[default] ({err}); "
                          "install the project's dependencies (pip install -e .)") from None
    headers = {"Authorization": f"Bearer {read_token(auth_token_file)}"} if auth_token_file else None
    with friendly_errors(url), _env_without("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        return JobSubmissionClient(url, headers=headers)


def _client_address(client: Any) -> str:
    return getattr(client, "_address", "the cluster")


# --------------------------------------------------------------------------- submit and follow


def submit(
    preset: str | Path,
    *,
    address: str | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    pip: bool = False,
    submission_id: str | None = None,
    auth_token_file: str | Path | None = None,
    client: JobSubmissionClient | None = None,
    out: TextIO | None = None,
    command: str | None = None,
) -> str:
    """Submit ``rp2k train PRESET`` (with ``overrides`` and ``flags``) as a Ray job; returns its id.

    The preset must exist and lie inside the repository (the folder with ``pyproject.toml``
    above the preset, else above the current directory), outside the excluded folders; the
    config is resolved locally first, so a wrong key fails here and not on the cluster.
    """
    out = out or sys.stdout
    if client is None:
        resolve_address(address)  # no address: fail before any work
    path = resolve_preset(preset)
    if not path.is_file():
        raise ConfigError(f"preset {preset} not found (presets live in jobs/)")
    path = path.resolve()
    root = find_root(path) or find_root()
    if root is None:
        raise SubmitError(f"no rp2k-dist repository (pyproject.toml + rp2k_dist/) above {path} or the "
                          "current directory: run rp2k submit from the repository")
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(f"preset {path} lies outside the uploaded working dir {root}: "
                          f"copy it into {root / 'jobs'} and submit that copy") from None
    if is_excluded(root, path):
        raise SubmitError(f"preset {relative} is in a folder that is not uploaded ({', '.join(EXCLUDES)}): "
                          "move it, e.g. into jobs/")
    flags = {k: v for k, v in (flags or {}).items() if v is not None}

    unknown = sorted(set(flags) - set(RUN_FLAGS))
    if unknown:
        raise ValueError(f"unknown rp2k train flag(s) {', '.join(unknown)}; known: {sorted(RUN_FLAGS)}")
    command = command or ("tune" if is_sweep_preset(path) else "train")
    # the exact precedence `rp2k train` applies: preset < --set < flags
    resolved = list(overrides) + flag_overrides(flags)
    if command == "tune":
        from .tuner import load_sweep

        config = load_sweep(path, resolved).config  # the space is checked on the cluster
    else:
        config = load_config(path, resolved)
    for key, value in (("run.storage_path", config.run.storage_path), ("data.shards", config.data.shards)):
        if "://" not in value and not Path(value).is_absolute():
            print(f"warning: {key}={value} is relative: on the cluster it resolves inside the job's "
                  "temporary working dir (shards are not uploaded, runs are lost); use shared storage "
                  "(s3://, gs://, /mnt/shared/...)", file=out)

    return submit_entrypoint(
        build_entrypoint(relative, overrides, flags, command=command), root, name=config.run.name,
        metadata={"rp2k_preset": relative, "rp2k_command": command}, address=address, pip=pip,
        submission_id=submission_id, auth_token_file=auth_token_file, client=client, out=out)


def submit_entrypoint(
    entrypoint: str,
    root: Path,
    *,
    name: str,
    metadata: Mapping[str, str] | None = None,
    address: str | None = None,
    pip: bool = False,
    submission_id: str | None = None,
    auth_token_file: str | Path | None = None,
    client: JobSubmissionClient | None = None,
    out: TextIO | None = None,
) -> str:
    """Upload ``root`` as the working dir and run ``entrypoint`` there as a Ray job named
    after ``name``; returns the job id."""
    out = out or sys.stdout
    runtime_env = build_runtime_env(root, pip=pip)
    submission_id = submission_id or default_submission_id(name)
    if client is None:
        client = connect(address, auth_token_file)
    print(f"uploading {root} as the job's working_dir (without {', '.join(EXCLUDES)} and .gitignored files)",
          file=out, flush=True)
    with friendly_errors(_client_address(client)), _quiet_packaging_logs():
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                 metadata={"rp2k_run": name, **(metadata or {})})


@contextlib.contextmanager
def _quiet_packaging_logs() -> Iterator[None]:
    """Ray logs every ignore file it reads (per folder, twice) and warns that .git/.venv are now
    excluded by default (we exclude them anyway): keep its warnings about large files only."""
    packaging, working_dir = (logging.getLogger(name) for name in PACKAGING_LOGGERS)
    loggers = {logger.name: logger for logger in (packaging, working_dir)}
    levels = {name: logger.level for name, logger in loggers.items()}
    packaging.setLevel(logging.WARNING)
    working_dir.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def wait(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> JobStatus:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout_s`` passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with friendly_errors(_client_address(client)):
        while True:
            status = client.get_job_status(job_id)
            if str(status) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll_s)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> JobStatus:
    """Stream the job's logs to ``out`` (default stdout) until it ends; returns its final status.

    Uses ``client.tail_job_logs`` (an async generator, run with asyncio). If the stream breaks
    (or an event loop is already running here) it waits for the end by polling instead.
    """
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.get_running_loop()
        running_loop = True
    except RuntimeError:
        running_loop = False
    if running_loop:
        print("(an event loop is running here: waiting for the job without streaming its logs)", file=out)
    else:
        try:
            with friendly_errors(_client_address(client)), warnings.catch_warnings():
                # ray's tail_job_logs passes ssl=None to aiohttp, which warns about it
                warnings.filterwarnings("ignore", message="ssl=None is deprecated", category=DeprecationWarning)
                asyncio.run(tail())
        except SubmitError:
            raise
        except Exception as err:  # noqa: BLE001 - the job goes on; fall back to polling
            print(f"(log stream interrupted: {err}; waiting for the job to end)", file=out)
    return wait(client, job_id)


# --------------------------------------------------------------------------- rp2k jobs ...


def jobs_status(job_id: str, address: str | None = None, *, auth_token_file: str | Path | None = None,
                client: JobSubmissionClient | None = None) -> JobDetails:
    """Status, message, entrypoint and metadata of one job (``rp2k jobs status``)."""
    client = client or connect(address, auth_token_file)
    with friendly_errors(_client_address(client)):
        return client.get_job_info(job_id)


def jobs_logs(job_id: str, address: str | None = None, *, follow_logs: bool = False, out: TextIO | None = None,
              auth_token_file: str | Path | None = None, client: JobSubmissionClient | None = None) -> str | None:
    """The job's logs so far (returned), or with ``follow_logs`` streamed to ``out`` until it ends."""
    client = client or connect(address, auth_token_file)
    if follow_logs:
        follow(client, job_id, out)
        return None
    with friendly_errors(_client_address(client)):
        return client.get_job_logs(job_id)


def jobs_stop(job_id: str, address: str | None = None, *, auth_token_file: str | Path | None = None,
              client: JobSubmissionClient | None = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); False if it had ended."""
    client = client or connect(address, auth_token_file)
    with friendly_errors(_client_address(client)):
        return client.stop_job(job_id)


def jobs_list(address: str | None = None, *, auth_token_file: str | Path | None = None,
              client: JobSubmissionClient | None = None) -> list[JobDetails]:
    """Every job the cluster knows, oldest first."""
    client = client or connect(address, auth_token_file)
    with friendly_errors(_client_address(client)):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda job: job.start_time or 0)
