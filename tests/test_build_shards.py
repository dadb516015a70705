"""End-to-end tests of the shard builder on local folders, run as Ray tasks."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from anomaly.data.build import BuildOptions, build_shards
from anomaly.data.sources import ManifestColumns
from anomaly.ray_cluster import ClusterResourceError, check_resources
from jobs.build_shards import main
from tests.shard_checks import SamplePhotos, read_tar, tree_bytes, verify_build

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

SIZE = 64
FAST = ["--image-size", str(SIZE), "--shard-samples", "8"]
OLD_MTIME = 1_000_000_000


def load_index(output: Path) -> dict:
    return json.loads((output / "index.json").read_text())


def read_local(output: Path):
    return lambda name: (output / name).read_bytes()


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_folder_layout_build(
    sample_photos: SamplePhotos, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "shards"
    arguments = ["--source", str(sample_photos.folder), "--output", str(output), "--normal-label", "whole"]
    assert main([*arguments, *FAST]) == 0

    index = load_index(output)
    assert index["format_version"] == 1
    assert index["image_size"] == SIZE
    assert index["labels"] == ["damaged", "whole"]
    assert index["totals"] == {"rows": 60, "written": 60, "rejected": 0}
    assert index["splits"]["train"]["labels"] == {"whole": 32}
    assert index["splits"]["val"]["labels"] == {"damaged": 6, "whole": 4}
    assert index["splits"]["test"]["labels"] == {"damaged": 14, "whole": 4}
    assert [len(index["splits"][s]["shards"]) for s in ("train", "val", "test")] == [4, 2, 3]

    samples = verify_build(index, read_local(output), SIZE)
    assert sorted(samples) == sorted(sample_photos.keys)
    assert samples["whole/whole_0001.jpg"]["label"] == "whole"
    assert samples["damaged/damaged_0001.jpg"]["anomalous"] == 1
    assert samples["damaged/damaged_0001.jpg"]["split"] in {"val", "test"}

    sidecar = json.loads((output / "train" / "shard-000000.json").read_text())
    assert sidecar["count"] == 8
    assert sidecar["sha256"] == index["splits"]["train"]["shards"][0]["sha256"]
    assert len(sidecar["inputs"]) == 8
    index_mtime = (output / "index.json").stat().st_mtime_ns
    assert all(path.stat().st_mtime_ns <= index_mtime for path in output.rglob("shard-*"))

    printed = capsys.readouterr().out
    assert "train" in printed
    assert "rows 60, written 60, rejected 0" in printed


def test_inventory_manifest_build(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    output = tmp_path / "shards"
    status = main([
        "--source", str(sample_photos.folder), "--output", str(output),
        "--manifest", str(sample_photos.inventory_manifest),
        "--path-column", "Key", "--label-column", "Dataset", "--normal-label", "Undamaged", *FAST,
    ])
    assert status == 0
    index = load_index(output)
    assert index["labels"] == ["Damaged", "Undamaged"]
    assert index["normal_label"] == "Undamaged"
    assert index["totals"] == {"rows": 60, "written": 60, "rejected": 0}
    assert "Damaged" not in index["splits"]["train"]["labels"]
    samples = verify_build(index, read_local(output), SIZE)
    assert sorted(samples) == sorted(sample_photos.keys)


def test_template_manifest_build(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    output = tmp_path / "shards"
    status = main([
        "--source", str(sample_photos.folder), "--output", str(output),
        "--manifest", str(sample_photos.template_manifest), "--path-template", "{label}/{key}.jpg", *FAST,
    ])
    assert status == 0
    index = load_index(output)
    samples = verify_build(index, read_local(output), SIZE)
    assert index["totals"]["written"] == 60
    # The manifest's key column has no folder and no extension, and is kept as given.
    assert sorted(samples) == sorted(key.split("/")[1].removesuffix(".jpg") for key in sample_photos.keys)
    assert samples["whole_0001"]["label"] == "whole"


def test_parallel_build_equals_single_task_build(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    common = ["--source", str(sample_photos.folder), *FAST]
    assert main([*common, "--output", str(tmp_path / "single"), "--workers", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "parallel"), "--workers", "2"]) == 0
    single = tree_bytes(tmp_path / "single")
    parallel = tree_bytes(tmp_path / "parallel")
    assert sorted(single) == sorted(parallel)
    assert len([name for name in single if name.endswith(".tar")]) == 9
    for name in single:
        assert single[name] == parallel[name], f"{name} differs between the builds"


def test_resume_rebuilds_only_unfinished_shards(
    sample_photos: SamplePhotos, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "shards"
    options = BuildOptions(
        source=str(sample_photos.folder), output=str(output), image_size=SIZE, shard_samples=8
    )
    first = build_shards(options)
    assert (first.built, first.skipped) == (9, 0)
    finished = tree_bytes(output)
    for path in output.rglob("*"):
        os.utime(path, (OLD_MTIME, OLD_MTIME))

    # Simulate a build killed part-way: no index yet, one shard lost with its sidecar,
    # one with only its sidecar left, one overwritten by a partial file, and a
    # temporary file left by an interrupted write.
    (output / "index.json").unlink()
    (output / "rejects.json").unlink()
    (output / "val" / "shard-000000.tar").unlink()
    (output / "val" / "shard-000000.json").unlink()
    (output / "train" / "shard-000001.tar").unlink()
    (output / "test" / "shard-000002.tar").write_bytes(finished["test/shard-000002.tar"][:1000])
    (output / "train" / ".shard-000003.tar.0123456789ab.tmp").write_bytes(b"partial")

    with caplog.at_level(logging.WARNING):
        second = build_shards(options)
    assert (second.built, second.skipped) == (3, 6)
    assert "1 files in" in caplog.text
    assert ".shard-000003.tar.0123456789ab.tmp" in caplog.text
    rebuilt = {"val/shard-000000.tar", "train/shard-000001.tar", "test/shard-000002.tar"}
    for name in finished:
        if name.endswith(".tar") and name not in rebuilt:
            assert (output / name).stat().st_mtime == OLD_MTIME, f"{name} was rebuilt"
    for name in rebuilt:
        assert (output / name).stat().st_mtime > OLD_MTIME
    resumed = tree_bytes(output)
    resumed.pop("train/.shard-000003.tar.0123456789ab.tmp")
    assert resumed == finished


def test_rerun_of_finished_build_does_nothing(
    sample_photos: SamplePhotos, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--source", str(sample_photos.folder), "--output", str(tmp_path / "shards"), *FAST]
    assert main(arguments) == 0
    index_mtime = (tmp_path / "shards" / "index.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(arguments) == 0
    assert "nothing to do: all 9 shards were already built" in capsys.readouterr().out
    assert (tmp_path / "shards" / "index.json").stat().st_mtime_ns == index_mtime


def test_changed_settings_rebuild_every_shard(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    options = BuildOptions(
        source=str(sample_photos.folder), output=str(tmp_path), image_size=SIZE, shard_samples=8
    )
    build_shards(options)
    report = build_shards(BuildOptions(**{**options.__dict__, "image_size": 32}))
    assert (report.built, report.skipped) == (9, 0)
    verify_build(report.index, read_local(tmp_path), 32)


def make_bad_inputs(sample_photos: SamplePhotos, root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Create a source of good and bad images and its manifest, and return them with the expected rejects."""
    source = root / "source"
    shutil.copytree(sample_photos.folder, source)
    whole = source / "whole"
    photo = (whole / "whole_0001.jpg").read_bytes()
    (whole / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (whole / "zero.jpg").write_bytes(b"")
    (whole / "note.jpg").write_text("adjuster note: photo to follow\n")
    (whole / "tiny.jpg").write_bytes(encode(Image.new("RGB", (16, 40), "gray"), "JPEG"))
    rgba = Image.new("RGBA", (90, 90), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (30, 30, 60, 60))
    (whole / "cutout.png").write_bytes(encode(rgba, "PNG"))
    (whole / "gray.jpg").write_bytes(encode(Image.new("L", (80, 60), 90), "JPEG"))
    (whole / "cmyk.jpg").write_bytes(encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG"))
    upright = Image.new("RGB", (120, 60), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 60, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the red left half goes on top
    (whole / "rotated.jpg").write_bytes(encode(upright, "JPEG", quality=95, exif=exif.tobytes()))
    # A readable image outside the source, so that only the key check keeps it out.
    (root / "outside.jpg").write_bytes(photo)

    good = sorted(f"{p.parent.name}/{p.name}" for p in source.glob("*/*_*.jpg"))
    extra = ["whole/cutout.png", "whole/gray.jpg", "whole/cmyk.jpg", "whole/rotated.jpg"]
    expected_rejects = {
        "whole/truncated.jpg": "corrupt or truncated image data",
        "whole/zero.jpg": "empty file (0 bytes)",
        "whole/note.jpg": "not an image file",
        "whole/tiny.jpg": "too small: shorter side is 16 px, minimum is 32 px",
        "whole/missing.jpg": "missing object",
        "../outside.jpg": "unsafe key: contains a '..' path segment",
        str(root / "outside.jpg"): "unsafe key: absolute path",
        good[0] + "#duplicate": "duplicate key",
    }
    lines = ["path,label"]
    for key in good + extra + list(expected_rejects):
        key = key.removesuffix("#duplicate")
        label = key.split("/")[0] if key.split("/")[0] in {"whole", "damaged"} else "whole"
        lines.append(f"{key},{label}")
    manifest = root / "bad.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return source, manifest, expected_rejects


def test_bad_inputs_end_in_rejects(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    source, manifest, expected = make_bad_inputs(sample_photos, tmp_path)
    output = tmp_path / "shards"
    status = main([
        "--source", str(source), "--output", str(output), "--manifest", str(manifest),
        "--path-column", "path", "--max-reject-fraction", "0.2", *FAST,
    ])
    assert status == 0
    index = load_index(output)
    assert index["totals"] == {"rows": 72, "written": 64, "rejected": 8}

    rejects = [(r["key"], r["reason"]) for r in index["rejects"]]
    for key, reason in expected.items():
        key = key.removesuffix("#duplicate")
        matching = [found for k, found in rejects if k == key and found.startswith(reason)]
        assert len(matching) == 1, f"{key}: expected one reject starting with {reason!r}, got {rejects}"
    assert len(rejects) == len(expected)

    samples = verify_build(index, read_local(output), SIZE)
    assert len(samples) == 64
    for key in ("whole/cutout.png", "whole/gray.jpg", "whole/cmyk.jpg", "whole/rotated.jpg"):
        assert key in samples
    assert samples["whole/whole_0001.jpg"]["label"] == "whole"

    def shard_image(key: str) -> Image.Image:
        data = (output / samples[key]["shard"]).read_bytes()
        members = next(m for m in read_tar(data).values() if json.loads(m["json"])["key"] == key)
        return Image.open(io.BytesIO(members["jpg"])).convert("RGB")

    rotated = shard_image("whole/rotated.jpg")
    assert max(abs(a - b) for a, b in zip(rotated.getpixel((32, 6)), (255, 0, 0))) < 30
    assert max(abs(a - b) for a, b in zip(rotated.getpixel((32, 58)), (0, 0, 255))) < 30
    cutout = shard_image("whole/cutout.png")
    assert min(cutout.getpixel((3, 3))) > 240, "transparent pixels must become the white background"
    assert max(abs(a - b) for a, b in zip(cutout.getpixel((32, 32)), (255, 0, 0))) < 30


def test_reject_limit_fails_after_writing_rejects(
    sample_photos: SamplePhotos, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, manifest, expected = make_bad_inputs(sample_photos, tmp_path)
    output = tmp_path / "shards"
    arguments = [
        "--source", str(source), "--output", str(output), "--manifest", str(manifest), "--path-column", "path",
    ]
    assert main([*arguments, "--max-reject-fraction", "0.2", *FAST]) == 0
    assert (output / "index.json").exists()

    # The same inputs under the default limit of 1%: the earlier index must go.
    with caplog.at_level(logging.ERROR):
        status = main([*arguments, *FAST])
    assert status == 1
    assert not (output / "index.json").exists()
    written = json.loads((output / "rejects.json").read_text())
    assert len(written["rejects"]) == len(expected)
    assert written["totals"] == {"rows": 72, "written": 64, "rejected": 8}
    assert "8 of 72 rows were rejected" in caplog.text
    assert "--max-reject-fraction" in caplog.text


def test_unknown_manifest_column_exits_with_message(
    sample_photos: SamplePhotos, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        status = main([
            "--source", str(sample_photos.folder), "--output", str(tmp_path / "shards"),
            "--manifest", str(sample_photos.inventory_manifest),
            "--path-column", "Key", "--label-column", "Class",
        ])
    assert status == 2
    assert "no column 'Class'" in caplog.text
    assert "Dataset" in caplog.text
    assert not (tmp_path / "shards").exists()


def test_group_column_keeps_groups_together(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    manifest = tmp_path / "grouped.csv"
    # Whole photos form 7 claims, and damaged photos 3 claims of their own.
    rows = ["path,label,claim"]
    for number, key in enumerate(sample_photos.keys):
        label = key.split("/")[0]
        rows.append(f"{key},{label},{label}-claim-{number % (7 if label == 'whole' else 3)}")
    manifest.write_text("\n".join(rows) + "\n")
    output = tmp_path / "shards"
    options = BuildOptions(
        source=str(sample_photos.folder), output=str(output), manifest=str(manifest),
        columns=ManifestColumns(path_column="path", group_column="claim"), image_size=SIZE, shard_samples=8,
    )
    samples = verify_build(build_shards(options).index, read_local(output), SIZE)
    splits_by_group: dict[str, set[str]] = {}
    for metadata in samples.values():
        splits_by_group.setdefault(metadata["group"], set()).add(metadata["split"])
    assert len(splits_by_group) == 10
    assert all(len(splits) == 1 for splits in splits_by_group.values())
    assert "train" in set.union(*splits_by_group.values())


def test_local_cluster_is_loopback_only() -> None:
    import ray

    nodes = ray.nodes()
    assert [node["NodeManagerAddress"] for node in nodes] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_check_resources_names_request_and_total() -> None:
    check_resources({"CPU": 2}, "two workers")
    with pytest.raises(ClusterResourceError, match=r"three workers requests CPU=3 \(cluster total 2\)"):
        check_resources({"CPU": 3}, "three workers")
    with pytest.raises(ClusterResourceError, match=r"GPU=1 \(cluster total 0\)"):
        check_resources({"CPU": 1, "GPU": 1}, "a GPU worker")


def test_job_process_joins_running_cluster(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    import ray

    environment = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        # Ray enables token authentication for clusters started by ray.init.
        "RAY_AUTH_MODE": "token",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "jobs.build_shards", "--source", str(sample_photos.folder),
         "--output", str(tmp_path / "shards"), *FAST],
        env=environment, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "joined the Ray cluster at 127.0.0.1:" in completed.stderr
    assert "rows 60, written 60, rejected 0" in completed.stdout
    verify_build(load_index(tmp_path / "shards"), read_local(tmp_path / "shards"), SIZE)


def test_killed_build_resumes_identically(sample_photos: SamplePhotos, tmp_path: Path) -> None:
    """SIGKILL a running build once its first shard is done, rerun it, and compare with a clean build."""
    import signal
    import time

    import ray

    small = ["--image-size", str(SIZE), "--shard-samples", "2", "--workers", "1"]
    common = ["--source", str(sample_photos.folder), *small]
    output = tmp_path / "killed"
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.build_shards", *common, "--output", str(output)],
        env=environment, cwd=Path(__file__).resolve().parents[1], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(output.glob("*/shard-*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the build ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "index.json").exists()
    done_before = {p.relative_to(output).as_posix() for p in output.glob("*/shard-*.json")}
    assert len(done_before) >= 1
    assert len(done_before) < 30  # 60 photos at 2 per shard
    shards_before = {name[: -len(".json")] + ".tar" for name in done_before}
    mtimes = {name: (output / name).stat().st_mtime_ns for name in shards_before}

    assert main([*common, "--output", str(output)]) == 0
    for name, mtime in mtimes.items():
        assert (output / name).stat().st_mtime_ns == mtime, f"{name} was rebuilt after the kill"
    assert main([*common, "--output", str(tmp_path / "clean")]) == 0
    resumed, clean = tree_bytes(output), tree_bytes(tmp_path / "clean")
    leftovers = [name for name in resumed if name.rsplit("/", 1)[-1].startswith(".")]
    # Temporary files left by writes that the kill interrupted.
    for name in leftovers:
        resumed.pop(name)
    assert resumed == clean
    verify_build(load_index(output), read_local(output), SIZE)
