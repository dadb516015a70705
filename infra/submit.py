"""Submit the suite's jobs to a Ray cluster through the Ray Jobs SDK, and follow them.

Run from anywhere with the project's interpreter::

    python -m infra.submit submit --job train --config jobs/configs/method4.yaml -- \\
        --shards s3://my-anomaly-bucket/shards/car-256 --output s3://my-anomaly-bucket/runs/m4
    python -m infra.submit submit --job build_shards -- --source ... --output ...
    python -m infra.submit status ID | logs ID [--follow] | stop ID | list

``submit`` uploads the repository as the job's working directory, runs
``<python> -m jobs.<job> [--config CONFIG] ARGS`` on the head node, prints the
submission ID, streams the logs until the job ends and exits with 0 only if the
job SUCCEEDED.

The cluster is reached at ``--address``, else ``RAY_ADDRESS``, else
http://127.0.0.1:8265: a local head, or a remote head's dashboard forwarded to this
port by ``ray dashboard infra/aws/cluster.yaml``.

The job's interpreter defaults to ``python``, which the head resolves against the
PATH that ``ray start`` ran with. On the AWS and KubeRay clusters that is the
image's Python, where the project's requirements are installed. A local head must
be started with the project's virtualenv first on PATH, or be given
``--python /abs/path/to/.venv/bin/python``. The submitting interpreter is not the
default because its path does not exist on a remote head.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

# Named explicitly because under `python -m infra.submit` __name__ is "__main__".
log = logging.getLogger("infra.submit")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_PYTHON = "python"

# Kept out of the uploaded working directory, on top of what .gitignore lists
# (Ray applies .gitignore too). Ray 2.60 rejects packages over 512 MiB, its gRPC
# message limit, and results or data in the upload would reach every node.
EXCLUDES = (".venv", ".git", "runs", "bench", "demo", "*.tar", "__pycache__", ".pytest_cache")

# Non-secret settings the job needs to reach the same S3 endpoint as this shell.
# Credentials are never forwarded: cluster nodes get them from their instance
# profile (AWS) or service account (KubeRay).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

# Job options whose value is a folder or file the job writes.
OUTPUT_OPTIONS = ("--output", "--maps")

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_JOB_NAME = re.compile(r"[a-z][a-z0-9_]*")
_POLL_INTERVAL_S = 1.0
_STOP_TIMEOUT_S = 60.0


class SubmitError(RuntimeError):
    """A job cannot be submitted or queried; the message names the value and the fix."""


def available_jobs(root: Path = REPO_ROOT) -> list[str]:
    """List the job modules under ``root/jobs`` that ``python -m jobs.<name>`` runs."""
    return sorted(path.stem for path in (root / "jobs").glob("*.py") if _JOB_NAME.fullmatch(path.stem))


def _config_in_repo(config: str, root: Path) -> str:
    """Return ``config`` relative to ``root``, the folder uploaded as the job's working directory."""
    path = Path(config).resolve()
    if not path.is_file():
        raise SubmitError(f"config file {config} not found; pass a path such as jobs/configs/method4.yaml")
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(
            f"config file {config} is outside {root}, and only that folder is uploaded to the cluster; "
            "copy the file under jobs/configs/ and pass that path"
        ) from None


def _check_output_paths(args: Sequence[str]) -> None:
    """Reject relative output paths: they would land in the job's temporary working directory."""
    for index, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option not in OUTPUT_OPTIONS:
            continue
        if not value and index + 1 < len(args):
            value = args[index + 1]
        if value and "://" not in value and not os.path.isabs(value):
            raise SubmitError(
                f"{option} {value!r} is a relative path, but the job runs in a temporary copy of the "
                "repository on the cluster, so anything written there is deleted with it; pass an "
                "s3:// URL, or an absolute path on storage that the cluster shares"
            )


def job_command(
    job: str,
    config: str | None,
    args: Sequence[str],
    python: str = DEFAULT_PYTHON,
    root: Path = REPO_ROOT,
) -> str:
    """Build the shell entrypoint ``<python> -m jobs.<job> [--config CONFIG] ARGS``.

    Args:
        job: Module name under ``jobs/``, such as ``train``.
        config: Config file inside ``root``, relative to the current directory or absolute.
        args: Further job arguments, passed on unchanged.
        python: Interpreter on the head node.
        root: Repository root that is uploaded as the working directory.

    Raises:
        SubmitError: If the job module or the config file is missing, the config lies
            outside ``root``, or an output option is a relative path.
    """
    jobs = available_jobs(root)
    if job not in jobs:
        known = ", ".join(jobs) or "(none)"
        raise SubmitError(f"unknown job {job!r}: expected one of {known} in {root / 'jobs'}")
    command = [python, "-m", f"jobs.{job}"]
    if config is not None:
        command += ["--config", _config_in_repo(config, root)]
    _check_output_paths(args)
    return shlex.join([*command, *args])


def job_env_vars(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Collect the environment variables the job gets: no usage statistics, plus FORWARDED_ENV if set."""
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0"}
    env_vars.update({name: environ[name] for name in FORWARDED_ENV if environ.get(name)})
    return env_vars


def runtime_env(root: Path = REPO_ROOT, environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """Build the job's runtime environment: the repository as working directory, and job_env_vars."""
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": job_env_vars(environ)}


def enable_token_auth_if_available(environ: MutableMapping[str, str], home: Path) -> str | None:
    """Set ``RAY_AUTH_MODE=token`` when it is unset and a Ray authentication token exists.

    ``ray start`` turns on token authentication by itself whenever a token exists,
    but the Jobs SDK sends the token only with ``RAY_AUTH_MODE=token`` (Ray 2.60).
    Without it, every request fails with "Missing authentication token". Ray reads
    the mode once per process, so this must run before ``ray`` is imported. Ray
    then reads the token itself, from the same places that are checked here.

    Returns:
        Where the token was found, or None if the mode was left as it was.
    """
    if "RAY_AUTH_MODE" in environ:
        return None
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    default_path = home / ".ray" / "auth_token"
    if environ.get("RAY_AUTH_TOKEN"):
        source = "the RAY_AUTH_TOKEN variable"
    elif token_path and Path(token_path).is_file():
        source = token_path
    elif default_path.is_file():
        source = str(default_path)
    else:
        return None
    environ["RAY_AUTH_MODE"] = "token"
    return source


def connect(address: str) -> JobSubmissionClient:
    """Open a Jobs SDK client on the dashboard at ``address``, with token authentication if a token exists.

    Raises:
        SubmitError: If the dashboard cannot be reached or rejects the credentials.
    """
    source = enable_token_auth_if_available(os.environ, Path.home())
    if source:
        log.info("using Ray token authentication with the token from %s", source)

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise SubmitError(
            f"the Ray cluster at {address} rejected the request: {error}\n"
            "Put the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN, and set RAY_AUTH_MODE=token"
        ) from None
    except ConnectionError as error:
        raise SubmitError(
            f"cannot reach a Ray dashboard at {address} ({error}); start a head with `ray start --head`, "
            "open a tunnel with `ray dashboard infra/aws/cluster.yaml`, or set RAY_ADDRESS"
        ) from None


def _job_details(client: JobSubmissionClient, submission_id: str) -> JobDetails:
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise SubmitError(
                f"job {submission_id} not found on this cluster; "
                "list its jobs with `python -m infra.submit list`"
            ) from None
        raise


def wait_for_end(client: JobSubmissionClient, submission_id: str, timeout_s: float | None = None) -> str:
    """Poll the job until it reaches a terminal state, and return that state.

    Raises:
        TimeoutError: If ``timeout_s`` passes first.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL_STATES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(_POLL_INTERVAL_S)


def stream_logs(client: JobSubmissionClient, submission_id: str, out: TextIO) -> None:
    """Copy the job's logs to ``out`` from the start until the job ends."""

    async def copy() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(copy())
    except RuntimeError as error:
        # The SDK raises RuntimeError when the log stream closes abnormally, for
        # example when a tunnel drops. The job itself may still be running.
        log.warning(
            "log stream of job %s closed abnormally (%s); waiting for the job to end", submission_id, error
        )


def follow(client: JobSubmissionClient, submission_id: str, out: TextIO) -> int:
    """Stream the job's logs until it ends, and return 0 if it SUCCEEDED, 1 if not, 130 on Ctrl-C."""
    try:
        stream_logs(client, submission_id, out)
        status = wait_for_end(client, submission_id)
    except KeyboardInterrupt:
        log.warning(
            "stopped following job %s, which keeps running; stop it with `python -m infra.submit stop %s`",
            submission_id, submission_id,
        )
        return 130

    details = client.get_job_info(submission_id)
    log.info("job %s %s: %s", submission_id, status, details.message)
    if status == "SUCCEEDED":
        return 0
    if "ModuleNotFoundError" in client.get_job_logs(submission_id):
        log.error(
            "the job's interpreter could not import a module: start the head with the project's "
            "environment first on PATH, or pass --python with an interpreter on the head that has "
            "requirements.txt installed"
        )
    return 1


def _print_details(details: JobDetails, out: TextIO) -> None:
    for name in ("submission_id", "status", "entrypoint", "message", "driver_exit_code"):
        value = getattr(details, name, None)
        if hasattr(value, "value"):
            value = value.value
        out.write(f"{name}: {value}\n")


def submit(parsed: argparse.Namespace, job_args: Sequence[str], out: TextIO) -> int:
    """Submit the job, print its submission ID to ``out``, and follow it unless --no-wait was given."""
    entrypoint = job_command(parsed.job, parsed.config, job_args, parsed.python)
    client = connect(parsed.address)
    submission_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env(), metadata={"job": parsed.job}
    )
    # Variable names only, because the values can be private endpoints.
    forwarded = ", ".join(name for name in FORWARDED_ENV if name in job_env_vars()) or "none"
    log.info(
        "submitted job %s to %s: %s (forwarded variables: %s)",
        submission_id, parsed.address, entrypoint, forwarded,
    )
    out.write(f"{submission_id}\n")
    out.flush()
    if parsed.no_wait:
        return 0
    return follow(client, submission_id, out)


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"Ray dashboard URL (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser = argparse.ArgumentParser(
        prog="python -m infra.submit",
        description="Submit jobs.<name> to a Ray cluster and follow, inspect or stop submitted jobs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    submit_parser = commands.add_parser(
        "submit", parents=[common], help="submit a job and stream its logs until it ends",
        description="Submit `python -m jobs.JOB [--config CONFIG] ARGS`. Put the job's arguments after --.",
    )
    submit_parser.add_argument(
        "--job", required=True, help="module under jobs/, such as train or build_shards"
    )
    submit_parser.add_argument(
        "--config", help="config file inside the repository, such as jobs/configs/method4.yaml"
    )
    submit_parser.add_argument(
        "--python", default=DEFAULT_PYTHON,
        help="interpreter on the head node that has requirements.txt installed (default: %(default)s)",
    )
    submit_parser.add_argument(
        "--no-wait", action="store_true", help="print the submission ID and return without following the job"
    )

    for name, summary in (
        ("status", "print a job's status"), ("logs", "print a job's logs"), ("stop", "stop a job")
    ):
        sub = commands.add_parser(name, parents=[common], help=summary)
        sub.add_argument("submission_id", help="ID printed by submit, such as raysubmit_XYZ")
        if name == "logs":
            sub.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    commands.add_parser("list", parents=[common], help="list the jobs on the cluster")
    return parser


def run(argv: Sequence[str], out: TextIO) -> int:
    """Run one command line and return the process exit code."""
    argv = list(argv)
    job_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, job_args = argv[:split], argv[split + 1:]
    parsed = _build_parser().parse_args(argv)
    if job_args and parsed.command != "submit":
        raise SubmitError(f"arguments after -- are only accepted by submit, not by {parsed.command}")

    if parsed.command == "submit":
        return submit(parsed, job_args, out)

    client = connect(parsed.address)
    if parsed.command == "list":
        for details in client.list_jobs():
            out.write(f"{details.submission_id}\t{details.status.value}\t{details.entrypoint}\n")
        return 0

    details = _job_details(client, parsed.submission_id)
    if parsed.command == "status":
        _print_details(details, out)
    elif parsed.command == "logs" and parsed.follow:
        return follow(client, parsed.submission_id, out)
    elif parsed.command == "logs":
        out.write(client.get_job_logs(parsed.submission_id))
    elif parsed.command == "stop":
        if client.stop_job(parsed.submission_id):
            log.info("stop requested for job %s", parsed.submission_id)
        try:
            status = wait_for_end(client, parsed.submission_id, _STOP_TIMEOUT_S)
        except TimeoutError as error:
            raise SubmitError(f"{error}; check it later with `python -m infra.submit status`") from None
        out.write(f"{parsed.submission_id}: {status}\n")
    return 0


def main() -> None:
    from anomaly.logs import setup_logging

    setup_logging()
    try:
        sys.exit(run(sys.argv[1:], sys.stdout))
    except SubmitError as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
