"""Hyperparameter search: config checks, a search on car photos killed and resumed, reproducibility."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from anomaly.config import ConfigError, load_config
from anomaly.data.stream import read_index
from anomaly.train.launch import read_history, run_training
from anomaly.tune import fitting_trials
from anomaly.tune_report import short_error, trial_status
from anomaly.tune_space import load_tune_config

REPO = Path(__file__).resolve().parents[1]
TUNE_YAML = REPO / "jobs" / "configs" / "tune.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 4
# Methods 1 and 4 train. Every method-2 trial requests 64 px images from 32 px shards,
# which passes the config check at load but makes the trial raise when it starts.
SEARCH_SETTINGS = [
    "search.methods=[1,2,4]", "search.num_samples=2", "search.seed=7",
    # A grace period of all epochs leaves ASHA nothing to stop. A trial stopped early is
    # killed, and Ray 2.60 then frees its workers only through the State API, which
    # fails when several Ray clusters run on one machine, as they can during tests.
    "search.scheduler=asha", f"search.grace_period={EPOCHS}",
    "model.base_channels=8", "model.image_size=32", f"train.epochs={EPOCHS}",
    "train.batch_size_per_worker=8", "train.grid_images=0", "ray.num_workers=1", "ray.num_cpus=2",
    "method_space.2.model.image_size.choice=[64]",
]
ERROR_TRIALS = 2  # the method-2 trials
TRAINED_TRIALS = 4


# ---------------------------------------------------------------- config checks, no Ray


def test_shipped_config_applies_keys_per_method() -> None:
    spec = load_tune_config(TUNE_YAML)
    assert spec.search.methods == (1, 2, 3, 4, 5)
    for method in (1, 2, 3):
        assert spec.spaces[method]["model.kernel_size"].args == (4, 5)
    for method in (4, 5):
        assert "model.kernel_size" not in spec.spaces[method]
    assert spec.spaces[1]["optim.lr_g"].kind == "loguniform"
    assert spec.spaces[1]["model.latent_dim"].args == (100, 256, 512)
    assert "mask.num_masks" in spec.spaces[5]
    assert "mask.num_masks" not in spec.spaces[1]
    assert spec.max_epochs == 15


@pytest.mark.parametrize("override, message", [
    ("space.model.latnt_dim.choice=[100]", "unknown config key model.latnt_dim"),
    ("search.num_sample=3", "unknown tune config key search.num_sample"),
    ("space.model.latent_dim.choice=[100,-5]", "model.latent_dim=-5"),
    ("space.model.latent_dim.uniform=[64,512]", "expected an integer"),
    ("space.optim.lr_g.loguniform=[0,1]", "0 < low < high"),
    ("space.optim.lr_g.normal=[0,1]", "distribution"),
    ("space.optim.lr_g=0.001", "fixed values go in the base config"),
    ("search.methods=[1,6]", "methods from 1, 2, 3, 4, 5"),
    ("model.method=2", "search.methods"),
    ("train.epoch=3", "unknown config key train.epoch"),
    ("tuning.x=1", "unknown tune config section 'tuning'"),
])
def test_invalid_search_fails_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_tune_config(TUNE_YAML, [override])


def test_override_replaces_distribution() -> None:
    spec = load_tune_config(TUNE_YAML, [
        "space.optim.lr_g.uniform=[1e-4,1.0e-3]", "space.model.kernel_size=null",
        "method_space.4.model.latent_dim.choice=[64]",
    ])
    assert spec.spaces[1]["optim.lr_g"].kind == "uniform"
    assert spec.spaces[1]["optim.lr_g"].args == (1e-4, 1e-3)
    assert "model.kernel_size" not in spec.spaces[1]
    assert spec.spaces[4]["model.latent_dim"].args == (64,)
    assert spec.spaces[1]["model.latent_dim"].args == (100, 256, 512)


def test_concurrency_status_and_error_text() -> None:
    assert fitting_trials({"CPU": 2.0}, {"CPU": 5.0}) == 2
    assert fitting_trials({"CPU": 3.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 4.0}) == 2
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad lr 3"
    assert short_error(text) == "ValueError: bad lr 3"
    assert trial_status("TERMINATED", "", 4, 4) == "TERMINATED"
    assert trial_status("TERMINATED", "", 2, 4) == "STOPPED_EARLY"
    assert trial_status("ERROR", "ValueError: x", 1, 4) == "ERROR"
    assert trial_status("RUNNING", "", 2, 4) == "UNFINISHED"


# ---------------------------------------------------------------- one search, killed and resumed


@dataclass(frozen=True)
class KilledSearch:
    tune_dir: Path
    argv: list[str]
    finished_trial: str  # had all its epochs when the job was killed
    finished_metrics: bytes
    finished_mtime: float
    interrupted_trial: str  # had some of its epochs when the job was killed
    interrupted_epochs: list[dict]


def _epoch_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_history(str(run_dir)) if "event" not in row]


def _registered_checkpoints(run_dir: Path) -> int:
    """Count the checkpoints that Ray Train has registered for a run folder's next restart.

    Ray Train records them in ``train/checkpoint_manager_snapshot.json`` (Ray 2.60), a
    moment after the worker wrote the checkpoint and the epoch's metrics.jsonl line.
    """
    try:
        snapshot = json.loads((run_dir / "train" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0  # not written yet, or caught mid-write
    return len(snapshot.get("checkpoint_results", []))


def _wait_for_interruption_point(tune_dir: Path, job: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """Wait until one trial has all its epochs and another has a registered checkpoint but not all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the search ended (exit {job.returncode}) before it could be killed"
        trials = sorted(p for p in (tune_dir / "trials").glob("*") if p.is_dir())
        counts = {p.name: len(_epoch_rows(p)) for p in trials}
        finished = [t for t, n in counts.items() if n == EPOCHS]
        partial = [t for t, n in counts.items()
                   if n < EPOCHS and _registered_checkpoints(tune_dir / "trials" / t) > 0]
        if finished and partial:
            return finished[0], partial[0]
        time.sleep(0.05)
    raise AssertionError(f"no trial finished while another was running within {timeout_s:.0f} s")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the job's Ray processes) at once, like a crash."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # The command name in parentheses may contain spaces, so read the fields after it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def killed_search(car_shards: str, tmp_path_factory: pytest.TempPathFactory) -> KilledSearch:
    """Start the search as a job, SIGKILL it mid-way, then rerun the same command to the end."""
    from jobs.tune import main

    tune_dir = tmp_path_factory.mktemp("tune") / "search"
    argv = ["--config", str(TUNE_YAML), "--shards", car_shards, "--output", str(tune_dir)]
    for setting in SEARCH_SETTINGS:
        argv += ["--set", setting]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    log_path = tune_dir.parent / "killed_job.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen([sys.executable, "-m", "jobs.tune", *argv], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            finished, interrupted = _wait_for_interruption_point(tune_dir, job, timeout_s=300)
        finally:
            _kill_tree(job.pid)
            job.wait(timeout=60)
    finished_file = tune_dir / "trials" / finished / "metrics.jsonl"
    snapshot = KilledSearch(
        tune_dir, argv, finished, finished_file.read_bytes(), finished_file.stat().st_mtime,
        interrupted, _epoch_rows(tune_dir / "trials" / interrupted),
    )
    assert 1 <= len(snapshot.interrupted_epochs) < EPOCHS

    assert main(argv) == 0
    return snapshot


def _results(tune_dir: Path) -> list[dict[str, str]]:
    with open(tune_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
def test_search_writes_results(killed_search: KilledSearch, car_shards: str) -> None:
    tune_dir = killed_search.tune_dir
    rows = _results(tune_dir)
    assert len(rows) == TRAINED_TRIALS + ERROR_TRIALS
    assert sorted(int(row["method"]) for row in rows) == [1, 1, 2, 2, 4, 4]
    trained = [row for row in rows if row["status"] != "ERROR"]
    assert len(trained) == TRAINED_TRIALS
    for row in trained:
        assert row["status"] == "TERMINATED"
        assert int(row["epochs"]) == EPOCHS
        assert 0.0 <= float(row["val_auroc"]) <= 1.0
        assert float(row["best_val_objective"]) == pytest.approx(float(row["val_auroc"]))
        assert float(row["optim.lr_g"]) > 0
        assert int(row["model.latent_dim"]) in (100, 256, 512)
    # Method 4 does not read model.kernel_size, so its trials leave that column empty.
    assert {row["model.kernel_size"] for row in trained if row["method"] == "4"} == {""}
    assert {row["model.kernel_size"] for row in trained if row["method"] == "1"} <= {"4", "5"}

    best_row = max(trained, key=lambda row: float(row["best_val_objective"]))
    best = load_config(tune_dir / "best.yaml")
    trial_config = yaml.safe_load((tune_dir / "trials" / best_row["trial_id"] / "config.yaml").read_text())
    assert best.model.method == int(best_row["method"])
    assert best.optim.lr_g == pytest.approx(trial_config["optim"]["lr_g"])
    assert best.model.latent_dim == trial_config["model"]["latent_dim"]
    assert best.train.epochs == EPOCHS
    assert best.model.image_size == 32

    report = json.loads((tune_dir / "best_test" / "metrics.json").read_text())
    test_labels = read_index(car_shards)["splits"]["test"]["labels"]
    assert report["split"] == "test"
    assert 0.0 <= report["auroc"] <= 1.0
    assert report["n_normal"] == test_labels["whole"]
    assert report["n_anomalous"] == test_labels["damaged"]
    assert report["method"] == best.model.method
    assert (tune_dir / "val_by_trial.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.ray
def test_failed_trial_is_recorded(killed_search: KilledSearch) -> None:
    failed = [row for row in _results(killed_search.tune_dir) if row["status"] == "ERROR"]
    assert len(failed) == ERROR_TRIALS
    for row in failed:
        assert row["method"] == "2"
        assert "model.image_size=64 is larger than the 32 px" in row["error"]
        assert row["epochs"] == "0"
        assert row["val_auroc"] == ""


@pytest.mark.ray
def test_killed_search_resumes_without_retraining(killed_search: KilledSearch) -> None:
    trials = killed_search.tune_dir / "trials"
    finished_file = trials / killed_search.finished_trial / "metrics.jsonl"
    assert finished_file.read_bytes() == killed_search.finished_metrics
    assert finished_file.stat().st_mtime == killed_search.finished_mtime

    history = read_history(str(trials / killed_search.interrupted_trial))
    epochs = [row for row in history if "event" not in row]
    assert [row["epoch"] for row in epochs] == list(range(EPOCHS))
    # Ray Train registers a checkpoint a moment after its epoch's metrics.jsonl line, so the
    # trial resumes after the last registered checkpoint, which can be before the last line.
    done_before = len(killed_search.interrupted_epochs)
    resumed = [row["from_epoch"] for row in history if row.get("event") == "resumed"]
    assert len(resumed) == 1
    assert 1 <= resumed[0] <= done_before
    for before, after in zip(killed_search.interrupted_epochs[:resumed[0]], epochs):
        assert after["loss_g"] == before["loss_g"]  # carried over from the checkpoint, not retrained

    for run_dir in trials.iterdir():
        numbers = [row["epoch"] for row in _epoch_rows(run_dir)]
        assert numbers in ([], list(range(EPOCHS))), f"{run_dir.name} has epochs {numbers}"


@pytest.mark.ray
def test_best_config_reproduces_val_metric(killed_search: KilledSearch, car_shards: str,
                                           tmp_path: Path) -> None:
    """Retrain best.yaml with its seed: one CPU worker gave bit-identical losses, so the tolerance is 1e-9."""
    rows = [row for row in _results(killed_search.tune_dir) if row["status"] != "ERROR"]
    best_id = max(rows, key=lambda row: float(row["best_val_objective"]))["trial_id"]
    original = _epoch_rows(killed_search.tune_dir / "trials" / best_id)

    config = load_config(killed_search.tune_dir / "best.yaml")
    run_training(config, car_shards, str(tmp_path / "retrain"))
    retrained = _epoch_rows(tmp_path / "retrain")
    best_epoch = original[-1]["best_epoch"]
    assert retrained[-1]["best_epoch"] == best_epoch
    assert abs(retrained[best_epoch]["val_auroc"] - original[best_epoch]["val_auroc"]) <= 1e-9
    assert abs(retrained[-1]["loss_g"] - original[-1]["loss_g"]) <= 1e-9


@pytest.mark.ray
def test_rerun_with_other_settings_is_rejected(killed_search: KilledSearch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from jobs.tune import main

    with caplog.at_level(logging.ERROR):
        assert main([*killed_search.argv, "--set", "search.seed=8"]) == 2
    assert "search.seed: 7 -> 8" in caplog.text


@pytest.mark.ray
def test_impossible_trial_fails_fast(car_shards: str, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    from anomaly.ray_cluster import init_ray
    from jobs.tune import main

    init_ray("", 2)  # start-up is not what this test times
    argv = ["--config", str(TUNE_YAML), "--shards", car_shards, "--output", str(tmp_path / "search"),
            "--set", "ray.num_workers=16", "--set", "search.methods=[1]"]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert time.monotonic() - started < 10
    assert "CPU=17" in caplog.text  # 16 workers and the trial's driver
    assert "cluster total" in caplog.text
    assert not (tmp_path / "search" / "search").exists()
    assert not (tmp_path / "search" / "tune_config.yaml").exists()


SMALL_TRIAL = ["--set", "model.base_channels=8", "--set", "model.image_size=32", "--set", "train.grid_images=0",
               "--set", "train.batch_size_per_worker=8", "--set", "ray.num_workers=1", "--set", "ray.num_cpus=2"]


def _run_tune_job(argv: list[str]) -> None:
    """Run ``python -m jobs.tune`` in a new process, with a Ray cluster of its own, and check it succeeded."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    job = subprocess.run([sys.executable, "-m", "jobs.tune", *argv], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=500)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]


@pytest.mark.ray
@pytest.mark.s3
def test_search_state_and_results_on_s3(car_shards: str, s3_bucket: str) -> None:
    """One trial with TUNE_DIR on the moto server: Tune's state, the run folder and the summaries."""
    import boto3

    output = f"s3://{s3_bucket}/tune/search"
    argv = ["--config", str(TUNE_YAML), "--shards", car_shards, "--output", output,
            "--set", "search.methods=[4]", "--set", "search.num_samples=1", "--set", "train.epochs=1",
            *SMALL_TRIAL]
    # A job of its own, so its Ray cluster starts with the moto endpoint in its environment.
    _run_tune_job(argv)

    s3 = boto3.client("s3")
    keys = {obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for obj in page.get("Contents", [])}
    prefix = "tune/search/"
    assert prefix + "search/tuner.pkl" in keys
    assert any(k.startswith(prefix + "search/experiment_state-") for k in keys)
    summaries = ("results.csv", "best.yaml", "val_by_trial.png", "best_test/metrics.json", "tune_config.yaml")
    for name in summaries:
        assert prefix + name in keys, name

    def text(name: str) -> str:
        return s3.get_object(Bucket=s3_bucket, Key=prefix + name)["Body"].read().decode()

    rows = list(csv.DictReader(text("results.csv").splitlines()))
    assert len(rows) == 1
    assert rows[0]["status"] == "TERMINATED"
    assert rows[0]["method"] == "4"
    assert rows[0]["run_dir"] == f"{output}/trials/{rows[0]['trial_id']}"
    assert prefix + f"trials/{rows[0]['trial_id']}/metrics.jsonl" in keys
    assert 0.0 <= json.loads(text("best_test/metrics.json"))["auroc"] <= 1.0
    assert yaml.safe_load(text("best.yaml"))["model"]["method"] == 4


@pytest.mark.ray
def test_asha_stops_weak_trials_early(car_shards: str, tmp_path: Path) -> None:
    """Four trials that differ only in lr_g: ASHA stops the ones that barely train, and only those."""
    output = tmp_path / "search"
    epochs = 12
    argv = ["--config", str(TUNE_YAML), "--shards", car_shards, "--output", str(output),
            "--set", "search.methods=[1]", "--set", "search.num_samples=4", "--set", "search.seed=0",
            "--set", "search.grace_period=1", "--set", "search.reduction_factor=2",
            # ASHA decides at epochs 1, 2, 4 and 8, but a stop reaches a trial only after its next
            # epochs have run. Epochs take well under a second here, so a weak trial needs many left.
            "--set", f"train.epochs={epochs}",
            # After one epoch the val recon loss separates the two rates. AUROC on 17 val images does not.
            "--set", "train.selection_metric=val_recon_loss",
            "--set", "space.optim.lr_g.choice=[1.0e-3,1.0e-9]", "--set", "space.optim.lr_d.choice=[1.0e-4]",
            *SMALL_TRIAL]
    # The search runs as its own job, as users run it, so its own Ray cluster serves the
    # State API calls that free a stopped trial's workers.
    _run_tune_job(argv)

    rows = list(csv.DictReader((output / "results.csv").read_text().splitlines()))
    assert len(rows) == 4
    stopped = [row for row in rows if row["status"] == "STOPPED_EARLY"]
    finished = [row for row in rows if row["status"] == "TERMINATED"]
    assert stopped, "ASHA stopped no trial"
    assert len(stopped) + len(finished) == 4
    for row in stopped:
        assert float(row["optim.lr_g"]) == pytest.approx(1e-9), row["trial_id"]
        assert int(row["epochs"]) < epochs, row["trial_id"]
        history = read_history(str(output / "trials" / row["trial_id"]))
        assert len([r for r in history if "event" not in r]) == int(row["epochs"])
    for row in finished:
        assert int(row["epochs"]) == epochs, row["trial_id"]
