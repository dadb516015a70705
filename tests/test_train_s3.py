"""Shards and run folder on the moto S3 server: train, then resume from a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from anomaly.config import load_config
from anomaly.train.launch import read_history, run_training

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def test_run_on_s3_resumes_in_fresh_process(sample_photos, s3_bucket: str, ray_local: None) -> None:
    shards = f"s3://{s3_bucket}/shards"
    run_dir = f"s3://{s3_bucket}/runs/m1"
    built = _job("jobs.build_shards", "--source", str(sample_photos.folder), "--output", shards,
                 "--normal-label", "whole", "--image-size", "32", "--shard-samples", "16")
    assert built.returncode == 0, built.stderr[-3000:]

    # Two DataLoader processes stream the shards from S3, each with its own client.
    overrides = ["model.image_size=32", "model.base_channels=16", "train.batch_size_per_worker=8",
                 "ray.num_workers=1", "train.grid_images=2", "data.loader_workers=2"]
    run_training(load_config(None, overrides + ["train.epochs=1"]), shards, run_dir)
    s3 = boto3.client("s3")
    keys = {obj["Key"] for obj in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/m1/")["Contents"]}
    assert {"runs/m1/model.pt", "runs/m1/metrics.jsonl", "runs/m1/config.yaml"} <= keys
    assert any(key.startswith("runs/m1/train/checkpoint_") for key in keys)

    # A new process, as on another machine: the same command with more epochs resumes.
    resumed = _job("jobs.train", "--shards", shards, "--output", run_dir,
                   *[arg for o in overrides + ["train.epochs=2"] for arg in ("--set", o)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = read_history(run_dir)
    assert [row["epoch"] for row in history if "event" not in row] == [0, 1]
    assert [row["from_epoch"] for row in history if row.get("event") == "resumed"] == [1]
    body = s3.get_object(Bucket=s3_bucket, Key="runs/m1/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line) for line in body.splitlines()] == history
