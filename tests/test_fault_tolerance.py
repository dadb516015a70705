"""A worker process killed mid-run: Ray restarts the group from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from anomaly.config import load_config
from anomaly.train.launch import read_history, run_training

pytestmark = pytest.mark.ray


def _worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # Name this cluster's dashboard: other Ray clusters may run on the same machine.
    address = f"http://{ray._private.worker.get_dashboard_url()}"
    actors = list_actors(address=address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def test_killed_worker_resumes_from_last_checkpoint(car_shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = load_config(None, [
        "model.method=1", "model.image_size=32", "model.base_channels=32", "train.epochs=5",
        "train.batch_size_per_worker=8", "ray.num_workers=2", "ray.num_cpus=2", "ray.max_failures=1",
        "train.grid_images=4",
    ])
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run_training(config, car_shards, str(run_dir))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    metrics = run_dir / "metrics.jsonl"
    # Ray Train records each registered checkpoint here; metrics.jsonl is written
    # before the checkpoint is reported, so it cannot tell when a restart can resume.
    snapshot = run_dir / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    killed = None
    # Kill one worker as soon as epoch 0's checkpoint is registered, i.e. during the second epoch.
    while thread.is_alive() and time.monotonic() < deadline:
        if snapshot.exists() and '"checkpoint_dir_name"' in snapshot.read_text():
            pids = _worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert not errors, errors
    assert killed is not None, "no worker was found to kill"

    history = read_history(str(run_dir))
    epochs = [row["epoch"] for row in history if "event" not in row]
    assert epochs == [0, 1, 2, 3, 4], "an epoch is missing or counted twice"
    resumed = [row for row in history if row.get("event") == "resumed"]
    assert len(resumed) == 1
    # The kill landed after epoch 0's checkpoint was registered, so the restart never starts
    # from scratch. It resumes at epoch 1, or later if more epochs finished before the kill.
    assert 1 <= resumed[0]["from_epoch"] <= 4
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines == history
