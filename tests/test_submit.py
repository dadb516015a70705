"""Tests of infra/submit.py: entrypoint and runtime environment building, token
detection, and real submissions through `make submit` to a local Ray head."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.submit import (
    EXCLUDES,
    SubmitError,
    enable_token_auth_if_available,
    job_command,
    runtime_env,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADDRESS = "http://127.0.0.1:8265"
SUBMISSION_ID = re.compile(r"^(raysubmit_\w+)$", re.MULTILINE)

# PID 1 of the test's PID namespace. It reaps the Ray processes that `ray start`
# leaves behind as orphans, and its death kills everything left in the namespace.
REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


# --- building the submission ----------------------------------------------------


def test_job_command_with_config() -> None:
    command = job_command(
        "train", str(REPO / "jobs" / "configs" / "method4.yaml"),
        ["--shards", "s3://bucket/shards", "--output", "s3://bucket/runs/a b", "--set", "ray.num_workers=2"],
    )
    assert shlex.split(command) == [
        "python", "-m", "jobs.train", "--config", "jobs/configs/method4.yaml",
        "--shards", "s3://bucket/shards", "--output", "s3://bucket/runs/a b", "--set", "ray.num_workers=2",
    ]


def test_job_command_without_config() -> None:
    command = job_command("build_shards", None, ["--help"], python="/opt/venv/bin/python")
    assert shlex.split(command) == ["/opt/venv/bin/python", "-m", "jobs.build_shards", "--help"]


def test_job_command_unknown_job() -> None:
    with pytest.raises(SubmitError, match=r"unknown job 'trian': expected one of .*\btrain\b"):
        job_command("trian", None, [])


def test_job_command_rejects_private_modules() -> None:
    with pytest.raises(SubmitError, match="unknown job '__init__'"):
        job_command("__init__", None, [])


def test_job_command_missing_config() -> None:
    with pytest.raises(SubmitError, match=r"config file jobs/configs/nope\.yaml not found"):
        job_command("train", "jobs/configs/nope.yaml", [])


def test_job_command_config_outside_repo(tmp_path: Path) -> None:
    outside = tmp_path / "method4.yaml"
    outside.write_text("model:\n  method: 4\n")
    with pytest.raises(SubmitError, match="is outside .* only that folder is uploaded"):
        job_command("train", str(outside), [])


@pytest.mark.parametrize(
    "args",
    [
        ["--output", "runs/m4"],
        ["--output=runs/m4"],
        ["--maps", "maps"],
        ["--run", "/r", "--output", "out.csv"],
    ],
)
def test_job_command_rejects_relative_outputs(args: list[str]) -> None:
    with pytest.raises(SubmitError, match="is a relative path"):
        job_command("score", None, args)


@pytest.mark.parametrize(
    "args", [["--output", "s3://bucket/runs/m4"], ["--output=/shared/runs/m4"], ["--shards", "shards/local"]]
)
def test_job_command_allows_absolute_outputs(args: list[str]) -> None:
    assert shlex.split(job_command("train", None, args))[3:] == args


def test_runtime_env_forwards_only_settings() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE00",
        "AWS_SECRET_ACCESS_KEY": "not-to-be-forwarded",
        "AWS_SESSION_TOKEN": "not-to-be-forwarded",
        "RAY_AUTH_TOKEN": "not-to-be-forwarded",
    }
    env = runtime_env(environ=environ)
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
    }
    for pattern in (".venv", ".git", "runs", "bench", "demo", "*.tar"):
        assert pattern in env["excludes"]
    assert list(EXCLUDES) == env["excludes"]


def test_cli_reports_unreachable_cluster() -> None:
    # A port that was free a moment ago: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "infra.submit", "status", "raysubmit_x", "--address", address],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert result.returncode == 2
    assert f"cannot reach a Ray dashboard at {address}" in result.stderr
    assert "Traceback" not in result.stderr


# --- token detection ------------------------------------------------------------


def test_token_auth_from_default_file(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    environ: dict[str, str] = {}
    assert enable_token_auth_if_available(environ, tmp_path) == str(tmp_path / ".ray" / "auth_token")
    assert environ == {"RAY_AUTH_MODE": "token"}


def test_token_auth_from_variables(tmp_path: Path) -> None:
    environ = {"RAY_AUTH_TOKEN": "x" * 32}
    assert enable_token_auth_if_available(environ, tmp_path) == "the RAY_AUTH_TOKEN variable"
    assert environ["RAY_AUTH_MODE"] == "token"

    token_file = tmp_path / "token"
    token_file.write_text("y" * 32)
    environ = {"RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert enable_token_auth_if_available(environ, tmp_path) == str(token_file)
    assert environ["RAY_AUTH_MODE"] == "token"


def test_token_auth_keeps_explicit_mode(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    environ = {"RAY_AUTH_MODE": "disabled"}
    assert enable_token_auth_if_available(environ, tmp_path) is None
    assert environ == {"RAY_AUTH_MODE": "disabled"}


def test_token_auth_without_token(tmp_path: Path) -> None:
    environ = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}
    assert enable_token_auth_if_available(environ, tmp_path) is None
    assert "RAY_AUTH_MODE" not in environ


# --- a real Ray head ---------------------------------------------------------------


@dataclass
class Cluster:
    """A Ray head in private network and PID namespaces, and commands run beside it."""

    namespace_pid: int
    env: dict[str, str]
    root: Path

    def run(self, command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # --wd because entering the mount namespace resets the working directory.
        return subprocess.run(
            ["nsenter", "-t", str(self.namespace_pid), "-n", "-p", "-m", f"--wd={REPO}", "--", *command],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def make(self, *arguments: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        # `-o setup` because `make test` has just run setup, and the namespace has no
        # network for pip to use.
        return self.run(["make", "-C", str(REPO), "-o", "setup", *arguments], timeout=timeout)


def namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-n", "-p", "-m", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def start_namespace() -> tuple[subprocess.Popen[str], int]:
    """Start the reaper in new network, PID and mount namespaces with loopback up."""
    holder = subprocess.Popen(
        ["unshare", "-n", "-p", "-m", "--fork", "--mount-proc", "sh", "-c",
         'ip link set lo up && echo ready && exec "$0" -c "$1"', sys.executable, REAPER],
        # unshare reports the reaper's SIGKILL at teardown on stderr; keep it for failures only.
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stderr is not None
    if holder.stdout.readline().strip() != "ready":
        holder.wait(timeout=10)
        raise RuntimeError(f"creating the namespaces failed: {holder.stderr.read()}")
    children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
    assert len(children) == 1, children
    return holder, int(children[0])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not namespaces_available():
        pytest.skip("needs root and unshare: outside a PID namespace, `ray stop` stops every Ray process")
    root = tmp_path_factory.mktemp("ray")
    (root / "home").mkdir()
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("RAY_", "AWS_")) and key not in {"HOME", "PATH"}
    }
    env.update(
        # A private HOME keeps the cluster's token out of the user's ~/.ray.
        HOME=str(root / "home"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_ENABLE_PRINT_PATCH="0",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    holder, namespace_pid = start_namespace()
    handle = Cluster(namespace_pid, env, root)
    try:
        # With a token in place, `ray start` turns on token authentication, as it
        # does on any machine where a local Ray cluster has run before.
        token = handle.run(["ray", "get-auth-token", "--generate"])
        assert token.returncode == 0, token.stderr
        started = handle.run([
            "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--num-cpus=2", "--disable-usage-stats", "--temp-dir", str(root / "tmp"),
        ])
        assert started.returncode == 0, started.stdout + started.stderr
        assert "Token authentication is enabled" in started.stderr + started.stdout
        handle.env["RAY_ADDRESS"] = ADDRESS
        yield handle
    finally:
        try:
            handle.run(["ray", "stop"], timeout=60)
        finally:
            os.kill(namespace_pid, signal.SIGKILL)
            holder.wait(timeout=30)


@pytest.fixture(scope="module")
def submit_photos(car_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real photos, 16 whole and 8 damaged, in one folder per label."""
    source = tmp_path_factory.mktemp("cars")
    for label, count in (("whole", 16), ("damaged", 8)):
        (source / label).mkdir()
        for path in sorted((car_photos / label).glob("*.jpg"))[:count]:
            shutil.copy(path, source / label / path.name)
    return source


def submission_id(output: str) -> str:
    match = SUBMISSION_ID.search(output)
    assert match, f"no submission ID in:\n{output}"
    return match.group(1)


@pytest.fixture(scope="module")
def car_shards(cluster: Cluster, submit_photos: Path) -> Path:
    """Shards at 32 px built by a job submitted without a config."""
    shards = cluster.root / "shards"
    built = cluster.make(
        "submit", "JOB=build_shards",
        f"ARGS=--source {submit_photos} --output {shards} --normal-label whole --image-size 32 "
        "--shard-samples 8 --seed 3",
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"job {submission_id(built.stdout)} SUCCEEDED" in built.stderr
    return shards


def train_args(shards: Path, run_dir: Path, epochs: int) -> str:
    return (
        f"--shards {shards} --output {run_dir} --set model.image_size=32 --set model.base_channels=8 "
        f"--set train.epochs={epochs} --set train.batch_size_per_worker=4 --set ray.num_workers=1 "
        "--set train.grid_images=4"
    )


@pytest.mark.ray
def test_built_shards_hold_all_photos(car_shards: Path) -> None:
    index = json.loads((car_shards / "index.json").read_text())
    assert index["image_size"] == 32
    assert index["totals"]["written"] == 24
    assert sum(split["count"] for split in index["splits"].values()) == 24
    for split in index["splits"].values():
        for shard in split["shards"]:
            assert (car_shards / shard["name"]).stat().st_size == shard["bytes"]


@pytest.mark.ray
def test_submit_train_job(cluster: Cluster, car_shards: Path) -> None:
    run_dir = cluster.root / "run"
    trained = cluster.make(
        "submit", "JOB=train", "CONFIG=jobs/configs/method4.yaml",
        f"ARGS={train_args(car_shards, run_dir, 1)}", timeout=300,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    job_id = submission_id(trained.stdout)
    assert "using Ray token authentication" in trained.stderr
    assert f"job {job_id} SUCCEEDED" in trained.stderr
    assert "done: 1 epochs" in trained.stdout

    status = cluster.make("job-status", f"ID={job_id}")
    assert status.returncode == 0, status.stderr
    assert "status: SUCCEEDED" in status.stdout
    assert "python -m jobs.train --config jobs/configs/method4.yaml" in status.stdout

    logs = cluster.make("job-logs", f"ID={job_id}")
    assert logs.returncode == 0, logs.stderr
    assert "done: 1 epochs" in logs.stdout

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in history if "event" not in row]
    assert [row["epoch"] for row in epochs] == [0]
    assert (run_dir / "model.pt").stat().st_size > 0


@pytest.mark.ray
def test_submit_failing_job(cluster: Cluster) -> None:
    missing = cluster.root / "no-such-folder"
    failed = cluster.make(
        "submit", "JOB=build_shards", f"ARGS=--source {missing} --output {cluster.root / 'unused'}"
    )
    assert failed.returncode != 0
    job_id = submission_id(failed.stdout)
    assert f"job {job_id} FAILED" in failed.stderr
    assert str(missing) in failed.stdout

    status = cluster.make("job-status", f"ID={job_id}")
    assert "status: FAILED" in status.stdout


@pytest.mark.ray
def test_stop_running_job(cluster: Cluster, car_shards: Path) -> None:
    submitted = cluster.run([
        sys.executable, "-m", "infra.submit", "submit", "--no-wait", "--job", "train",
        "--config", "jobs/configs/method4.yaml", "--",
        *shlex.split(train_args(car_shards, cluster.root / "stopped", 1000)),
    ])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert SUBMISSION_ID.fullmatch(job_id)

    deadline = time.monotonic() + 60
    status = ""
    while "status: RUNNING" not in status:
        assert time.monotonic() < deadline, f"job {job_id} did not start:\n{status}"
        status = cluster.make("job-status", f"ID={job_id}").stdout

    stopped = cluster.make("job-stop", f"ID={job_id}")
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout
    status = cluster.make("job-status", f"ID={job_id}").stdout
    assert "status: STOPPED" in status


@pytest.mark.ray
def test_status_of_unknown_job(cluster: Cluster) -> None:
    result = cluster.make("job-status", "ID=raysubmit_doesnotexist")
    assert result.returncode != 0
    assert "job raysubmit_doesnotexist not found" in result.stderr
