"""Method 5 end to end: anomaly maps in evaluation, and batch scoring of new photos."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.config import load_config
from anomaly.data.stream import read_index
from anomaly.evaluate import evaluate_run, load_model
from anomaly.train.launch import run_training

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def method5_run(car_shards: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    run_dir = tmp_path_factory.mktemp("m5") / "run"
    config = load_config(None, [
        "model.method=5", "model.image_size=32", "model.base_channels=16", "train.epochs=1",
        "train.batch_size_per_worker=8", "ray.num_workers=1", "ray.num_cpus=2", "train.grid_images=2",
    ])
    run_training(config, car_shards, str(run_dir))
    return str(run_dir)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_anomaly_maps(method5_run: str, car_shards: str, tmp_path: Path) -> None:
    report = tmp_path / "report"
    metrics = evaluate_run(method5_run, car_shards, "test", str(report))
    assert metrics["method"] == 5
    assert (report / "anomaly_maps.png").read_bytes().startswith(PNG_MAGIC)
    overlays = sorted((report / "maps").glob("*.png"))
    assert len(overlays) == 8
    for overlay in overlays:
        assert overlay.read_bytes().startswith(PNG_MAGIC)
        assert ".." not in overlay.name
        assert "/" not in overlay.name


def test_score_folder_matches_evaluation(method5_run: str, car_shards: str, car_photos: Path,
                                         tmp_path: Path) -> None:
    """Photos scored from their original files get the scores evaluation gave their shard copies."""
    index = read_index(car_shards)
    report = tmp_path / "report"
    evaluate_run(method5_run, car_shards, "test", str(report))
    expected = {row["key"]: float(row["score"]) for row in _read_csv(report / "scores.csv")}

    # The test split's originals, in nested folders, plus inputs that cannot be read.
    photos = tmp_path / "incoming"
    for key in list(expected)[:12]:
        target = photos / "claims" / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(car_photos / key, target)
    (photos / "claims" / "broken.jpg").write_bytes(b"not an image")
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.txt").write_text("ignored: not an image suffix")

    out_csv = tmp_path / "scores.csv"
    maps = tmp_path / "maps"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--run", method5_run, "--input", str(photos),
         "--output", str(out_csv), "--maps", str(maps)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["key"]: row for row in _read_csv(out_csv)}
    assert len(rows) == 14  # 12 photos and 2 unreadable files; the .txt is not listed
    assert rows["claims/broken.jpg"]["error"] != ""
    assert rows["claims/broken.jpg"]["score"] == ""
    assert "empty" in rows["empty.png"]["error"]

    for key, score in list(expected.items())[:12]:
        row = rows[f"claims/{key}"]
        assert row["error"] == ""
        assert float(row["score"]) == pytest.approx(score, rel=1e-4, abs=1e-6), key
        assert row["decision"] in ("anomalous", "normal")
    # Decisions follow the threshold stored with the model.
    stored = load_model(method5_run).threshold
    for key in list(expected)[:12]:
        row = rows[f"claims/{key}"]
        assert (row["decision"] == "anomalous") == (float(row["score"]) >= stored)
    assert len(list(maps.glob("*.png"))) == 12
    assert index["image_size"] == 32


def test_score_maps_need_method5(car_shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = load_config(None, [
        "model.method=1", "model.image_size=32", "model.base_channels=8", "train.epochs=1",
        "train.batch_size_per_worker=8", "ray.num_workers=1", "ray.num_cpus=2", "train.grid_images=0",
    ])
    run_training(config, car_shards, str(run_dir))
    photos = tmp_path / "in"
    photos.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--run", str(run_dir), "--input", str(photos),
         "--output", str(tmp_path / "s.csv"), "--maps", str(tmp_path / "maps")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "method 5" in result.stderr
