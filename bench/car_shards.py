"""Shards of the car photos that the benchmarks build once and then reuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "car_damage"


def build_car_shards(data: Path, shards: Path, image_size: int, shard_samples: int, seed: int = 0) -> None:
    """Build shards of ``data`` (folders whole/ and damaged/) with jobs.build_shards, unless index.json exists."""
    if (shards / "index.json").exists():
        return
    subprocess.run(
        [sys.executable, "-m", "jobs.build_shards", "--source", str(data), "--output", str(shards),
         "--normal-label", "whole", "--image-size", str(image_size), "--shard-samples", str(shard_samples),
         "--seed", str(seed)],
        check=True, cwd=REPO,
    )
