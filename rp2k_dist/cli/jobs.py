"""``rp2k submit`` and ``rp2k jobs``: their handlers and their parsers."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..config import RUN_FLAGS


def _stop_hint(address: str | None, job_id: str) -> str:
    from ..launch.submit import resolve_address

    return f"rp2k jobs stop --address {shlex.quote(resolve_address(address))} {shlex.quote(job_id)}"


def cmd_submit(args: argparse.Namespace) -> int:
    """``rp2k submit``: 0 when the job SUCCEEDED (or was submitted with --no-wait), 1 otherwise."""
    from ..launch.submit import submit

    flags = {key: getattr(args, key, None) for key in RUN_FLAGS}
    job_id = submit(args.config, address=args.address, overrides=args.set or [], flags=flags, pip=args.pip,
                    submission_id=args.submission_id, auth_token_file=args.auth_token_file, command=args.command)
    return _follow_job(job_id, args)


def _follow_job(job_id: str, args: argparse.Namespace) -> int:
    """After a submission: print how to follow the job, or follow it to its end."""
    from ..launch.submit import connect, follow, jobs_status, resolve_address

    address = resolve_address(args.address)
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        print(f"follow it:  rp2k jobs logs --follow --address {shlex.quote(address)} {shlex.quote(job_id)}\n"
              f"stop it:    {_stop_hint(args.address, job_id)}")
        return 0
    try:
        client = connect(args.address, args.auth_token_file)
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Stop it with: {_stop_hint(args.address, job_id)}",
              file=sys.stderr)
        return 130
    info = jobs_status(job_id, client=client)
    message = f": {info.message}" if info.message else ""
    print(f"job {job_id} {status}{message}")
    return 0 if str(status) == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """``rp2k jobs status|logs|stop|list``."""
    from ..launch.submit import jobs_list, jobs_logs, jobs_status, jobs_stop

    kwargs = {"address": args.address, "auth_token_file": args.auth_token_file}
    if args.jobs_command == "list":
        for job in jobs_list(**kwargs):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
            run = (job.metadata or {}).get("rp2k_run", "")
            print(f"{job.submission_id or job.job_id}\t{job.status}\t{started}\t{run}\t{job.entrypoint}")
        return 0
    if args.jobs_command == "status":
        info = jobs_status(args.job_id, **kwargs)
        print(f"{args.job_id}: {info.status}" + (f": {info.message}" if info.message else ""))
        return 1 if str(info.status) in ("FAILED", "STOPPED") else 0
    if args.jobs_command == "logs":
        logs = jobs_logs(args.job_id, follow_logs=args.follow, **kwargs)
        if logs is not None:
            sys.stdout.write(logs)
        return 0
    if args.jobs_command == "stop":
        stopped = jobs_stop(args.job_id, **kwargs)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "already ended"))
        return 0
    raise ValueError(f"unknown jobs command {args.jobs_command!r}")


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard / Jobs API address, e.g. http://127.0.0.1:8265 "
                   "(default: $RAY_ADDRESS)")
    p.add_argument("--auth-token-file", help="send this file's Ray auth token (default: Ray's own lookup, "
                   "active with RAY_AUTH_MODE=token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def add_submit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``rp2k submit`` to the ``rp2k`` subcommands."""
    from ..launch.submit import COMMANDS

    p = sub.add_parser("submit", help="run `rp2k train` as a job on a Ray cluster (Job Submission API)",
                       description="Upload the repository (minus .venv, shards, runs, data, ...) and run "
                       "`python -m rp2k_dist.cli train PRESET ...` as a Ray job; follows its logs "
                       "unless --no-wait. Exit status 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.")
    p.add_argument("config", help="YAML preset inside the repository: a path or a preset name (see jobs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.05")
    _add_connection_options(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (run.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; implies run.use_gpu=true")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="run storage on the cluster: s3://, gs:// or a shared path (run.storage_path)")
    p.add_argument("--shards", help="packed dataset as the cluster sees it (data.shards)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    p.add_argument("--pip", action="store_true", help="install pyproject's dependencies (except ray) in the job's "
                   "runtime env; default: use what the cluster image has")
    p.add_argument("--submission-id", help="job id to use (default: rp2k-<run name>-<UTC time>-<hex>)")
    p.add_argument("--command", choices=COMMANDS, help="what the job runs: rp2k train or rp2k tune "
                   "(default: tune for a sweep preset, one with search_space:, else train)")
    p.set_defaults(func=cmd_submit)
    return p


def add_jobs_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``rp2k jobs status|logs|stop|list`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("jobs", help="status, logs, stop and list of Ray jobs")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("status", "a job's status and message (exit 1 if FAILED/STOPPED)"),
                       ("logs", "a job's logs"), ("stop", "stop a job"), ("list", "every job of the cluster")):
        q = jobs.add_parser(name, help=text)
        _add_connection_options(q)
        if name != "list":
            q.add_argument("job_id", help="submission id printed by rp2k submit")
        if name == "logs":
            q.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    p.set_defaults(func=cmd_jobs)
    return p


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k submit`` and ``rp2k jobs`` to the ``rp2k`` subcommands."""
    add_submit_parser(sub)
    add_jobs_parser(sub)
