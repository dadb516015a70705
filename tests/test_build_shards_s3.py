"""Tests of S3 storage and of shard builds from and to a moto S3 server on 127.0.0.1.

The retry tests put a :class:`tests.s3server.FaultProxy` between boto3 and moto. It
responds to chosen requests with 503 SlowDown, 403 AccessDenied, a dropped connection or
a short body, because moto itself never throttles or fails.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import webdataset as wds

from anomaly.data import s3_retry, storage
from anomaly.data.build import BuildOptions, build_shards
from jobs.build_shards import main
from tests.s3server import FaultProxy, MotoServer
from tests.shard_checks import SamplePhotos, verify_build

pytestmark = pytest.mark.s3

SIZE = 64
FAST = ["--image-size", str(SIZE), "--shard-samples", "8"]


def s3_client() -> Any:
    return boto3.client("s3")


def upload_photos(bucket: str, photos: SamplePhotos, prefix: str = "photos") -> None:
    client = s3_client()
    for key in photos.keys:
        client.upload_file(str(photos.folder / key), bucket, f"{prefix}/{key}")


def read_s3(bucket: str, prefix: str):
    return lambda name: s3_client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


def list_keys(bucket: str, prefix: str) -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture()
def proxy(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Route this process's S3 calls through a fault proxy, with botocore retries off.

    With ``AWS_MAX_ATTEMPTS=1`` botocore tries each request once, so every retry
    in the test comes from anomaly.data.s3_retry.
    """
    with FaultProxy(moto_server.url) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setattr(s3_retry, "BASE_DELAY_S", 0.05)
        yield fault_proxy


@pytest.fixture(scope="module")
def s3_build(
    moto_server: MotoServer, ray_local: None, sample_photos: SamplePhotos
) -> tuple[str, dict[str, Any]]:
    """Upload the sample photos and build shards from S3 to S3 once for the module."""
    bucket = "module-build"
    s3_client().create_bucket(Bucket=bucket)
    upload_photos(bucket, sample_photos)
    status = main(["--source", f"s3://{bucket}/photos", "--output", f"s3://{bucket}/shards", *FAST])
    assert status == 0
    index = json.loads(s3_client().get_object(Bucket=bucket, Key="shards/index.json")["Body"].read())
    return bucket, index


# Storage functions


def test_storage_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/a/b.bin"
    storage.write_bytes(url, b"payload")
    assert storage.read_bytes(url) == b"payload"
    assert storage.file_size(url) == 7
    assert storage.exists(url)
    assert not storage.exists(f"s3://{s3_bucket}/a/missing.bin")
    with pytest.raises(storage.ObjectNotFoundError, match="missing.bin"):
        storage.read_bytes(f"s3://{s3_bucket}/a/missing.bin")

    local = tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 4096)
    storage.upload_file(local, f"s3://{s3_bucket}/big.bin")
    storage.download_file(f"s3://{s3_bucket}/big.bin", tmp_path / "copy" / "big.bin")
    assert (tmp_path / "copy" / "big.bin").read_bytes() == local.read_bytes()
    with storage.open_stream(f"s3://{s3_bucket}/big.bin") as stream:
        assert stream.read(4) == bytes([0, 1, 2, 3])
    assert storage.join(f"s3://{s3_bucket}/", "x/", "/y.tar") == f"s3://{s3_bucket}/x/y.tar"
    assert storage.split_s3_url(f"s3://{s3_bucket}/x/y.tar") == (s3_bucket, "x/y.tar")


def test_list_files_pages_through_prefix(s3_bucket: str) -> None:
    client = s3_client()
    for i in range(25):
        client.put_object(Bucket=s3_bucket, Key=f"photos/whole/{i:03d}.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="photos/whole/", Body=b"")  # folder marker
    client.put_object(Bucket=s3_bucket, Key="photos-other/a.jpg", Body=b"x")
    listed = list(storage.list_files(f"s3://{s3_bucket}/photos", page_size=10))
    assert listed == [f"whole/{i:03d}.jpg" for i in range(25)]


def test_slowdown_retried_to_success(
    s3_bucket: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://{s3_bucket}/throttled.bin"
    with caplog.at_level(logging.WARNING, logger="anomaly.data.s3_retry"):
        proxy.inject("slowdown", 4, methods=("PUT",))
        storage.write_bytes(url, b"0123456789")
        proxy.inject("slowdown", 4, methods=("GET",))
        assert storage.read_bytes(url) == b"0123456789"
        proxy.inject("slowdown", 2, methods=("HEAD",))
        assert storage.file_size(url) == 10
    assert proxy.faults["slowdown"] == 10
    # A HEAD response has no body, so its retries show only the status, 503.
    retries = [record for record in caplog.records if "HTTP 503" in record.getMessage()]
    assert len(retries) == 10


def test_slowdown_during_listing_retried(s3_bucket: str, proxy: FaultProxy) -> None:
    for i in range(12):
        storage.write_bytes(f"s3://{s3_bucket}/p/{i:02d}", b"x")
    listing = storage.list_files(f"s3://{s3_bucket}/p", page_size=5)
    first_page = [next(listing) for _ in range(5)]
    proxy.inject("slowdown", 3, methods=("GET",))
    rest = list(listing)
    assert first_page + rest == [f"{i:02d}" for i in range(12)]
    assert proxy.faults["slowdown"] == 3


def test_dropped_connections_and_short_reads_retried(s3_bucket: str, proxy: FaultProxy) -> None:
    url = f"s3://{s3_bucket}/body.bin"
    storage.write_bytes(url, bytes(range(200)))
    proxy.inject("short", 2, methods=("GET",))
    assert storage.read_bytes(url) == bytes(range(200))
    proxy.inject("drop", 2, methods=("GET",))
    assert storage.read_bytes(url) == bytes(range(200))
    assert proxy.faults["short"] == 2
    assert proxy.faults["drop"] == 2


def test_retries_exhausted_raise_storage_error(
    s3_bucket: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_retry, "MAX_ATTEMPTS", 3)
    storage.write_bytes(f"s3://{s3_bucket}/x", b"x")
    proxy.inject("slowdown", 100, methods=("GET",))
    expected = r"GetObject s3://.*/x failed after 3 attempts: HTTP 503 SlowDown"
    with pytest.raises(storage.StorageError, match=expected):
        storage.read_bytes(f"s3://{s3_bucket}/x")
    assert proxy.faults["slowdown"] == 3


def test_botocore_retries_also_handle_slowdown(
    s3_bucket: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default client configuration: adaptive botocore retries under ours.
    storage.write_bytes(f"s3://{s3_bucket}/x", b"abc")
    with FaultProxy(moto_server.url) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
        fault_proxy.inject("slowdown", 2, methods=("GET",))
        assert storage.read_bytes(f"s3://{s3_bucket}/x") == b"abc"
    assert fault_proxy.faults["slowdown"] == 2


def test_access_denied_fails_fast(
    s3_bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "wJalrXUtnFEMI-test-secret-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    proxy.inject("access_denied", 1000)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        status = main(["--source", f"s3://{s3_bucket}/photos", "--output", str(tmp_path / "out"), *FAST])
    assert status == 2
    assert time.monotonic() - started < 10
    assert proxy.faults["access_denied"] == 1, "a permanent error must not be retried"
    assert f"ListObjectsV2 s3://{s3_bucket}/photos failed with AccessDenied" in caplog.text
    assert f"bucket {s3_bucket!r}" in caplog.text
    assert secret not in caplog.text
    assert not (tmp_path / "out").exists()


def test_missing_output_bucket_fails_fast(
    sample_photos: SamplePhotos, tmp_path: Path, caplog: pytest.LogCaptureFixture, moto_server: MotoServer
) -> None:
    with caplog.at_level(logging.ERROR):
        output = "s3://no-such-bucket-here/shards"
        status = main(["--source", str(sample_photos.folder), "--output", output, *FAST])
    assert status == 2
    assert "NoSuchBucket" in caplog.text
    assert "'no-such-bucket-here'" in caplog.text


# Builds


def test_s3_folder_build_matches_local_build(
    s3_build: tuple[str, dict[str, Any]], sample_photos: SamplePhotos, tmp_path: Path
) -> None:
    bucket, index = s3_build
    assert index["totals"] == {"rows": 60, "written": 60, "rejected": 0}
    assert index["source"] == f"s3://{bucket}/photos"
    samples = verify_build(index, read_s3(bucket, "shards"), SIZE)
    assert sorted(samples) == sorted(sample_photos.keys)

    local = build_shards(
        BuildOptions(source=str(sample_photos.folder), output=str(tmp_path), image_size=SIZE, shard_samples=8)
    )
    for split in ("train", "val", "test"):
        s3_shards = [(s["name"], s["sha256"]) for s in index["splits"][split]["shards"]]
        local_shards = [(s["name"], s["sha256"]) for s in local.index["splits"][split]["shards"]]
        assert s3_shards == local_shards, "the same images must give byte-identical shards"

    expected = {"shards/index.json", "shards/rejects.json"}
    for name in (s["name"] for entry in index["splits"].values() for s in entry["shards"]):
        expected |= {f"shards/{name}", f"shards/{name.removesuffix('.tar')}.json"}
    assert list_keys(bucket, "shards/") == sorted(expected), "no temporary or stray objects may remain"


def test_webdataset_reads_s3_shards(s3_build: tuple[str, dict[str, Any]]) -> None:
    bucket, index = s3_build
    storage.register_webdataset_s3()
    urls = [f"s3://{bucket}/shards/{shard['name']}" for shard in index["splits"]["train"]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    samples = list(dataset.decode("pil"))
    assert len(samples) == index["splits"]["train"]["count"] == 32
    assert all(sample["jpg"].size == (SIZE, SIZE) for sample in samples)
    assert {sample["json"]["label"] for sample in samples} == {"whole"}


def test_s3_resume_rebuilds_deleted_shard(s3_build: tuple[str, dict[str, Any]]) -> None:
    bucket, index = s3_build
    client = s3_client()
    client.delete_object(Bucket=bucket, Key="shards/index.json")
    client.delete_object(Bucket=bucket, Key="shards/val/shard-000001.tar")
    options = BuildOptions(
        source=f"s3://{bucket}/photos", output=f"s3://{bucket}/shards", image_size=SIZE, shard_samples=8
    )
    report = build_shards(options)
    assert (report.built, report.skipped) == (1, 8)
    assert report.index == index
    rebuilt = client.get_object(Bucket=bucket, Key="shards/val/shard-000001.tar")["Body"].read()
    assert len(rebuilt) == index["splits"]["val"]["shards"][1]["bytes"]


@pytest.mark.usefixtures("ray_local")
def test_s3_inventory_manifest_build(s3_bucket: str, sample_photos: SamplePhotos, tmp_path: Path) -> None:
    upload_photos(s3_bucket, sample_photos, prefix="claims")
    s3_client().upload_file(str(sample_photos.inventory_manifest), s3_bucket, "inventory/manifest.csv")
    output = tmp_path / "shards"
    status = main([
        "--source", f"s3://{s3_bucket}/claims", "--output", str(output),
        "--manifest", f"s3://{s3_bucket}/inventory/manifest.csv",
        "--path-column", "Key", "--label-column", "Dataset", "--normal-label", "Undamaged", *FAST,
    ])
    assert status == 0
    index = json.loads((output / "index.json").read_text())
    samples = verify_build(index, lambda name: (output / name).read_bytes(), SIZE)
    assert sorted(samples) == sorted(sample_photos.keys)
    assert index["splits"]["train"]["labels"] == {"Undamaged": 32}


@pytest.mark.usefixtures("ray_local")
def test_s3_template_manifest_build_with_missing_object(
    s3_bucket: str, sample_photos: SamplePhotos, tmp_path: Path
) -> None:
    upload_photos(s3_bucket, sample_photos)
    s3_client().delete_object(Bucket=s3_bucket, Key="photos/damaged/damaged_0003.jpg")
    status = main([
        "--source", f"s3://{s3_bucket}/photos", "--output", f"s3://{s3_bucket}/out",
        "--manifest", str(sample_photos.template_manifest), "--path-template", "{label}/{key}.jpg",
        "--max-reject-fraction", "0.05", *FAST,
    ])
    assert status == 0
    index = json.loads(s3_client().get_object(Bucket=s3_bucket, Key="out/index.json")["Body"].read())
    assert index["rejects"] == [{"key": "damaged_0003", "reason": "missing object"}]
    assert index["totals"] == {"rows": 60, "written": 59, "rejected": 1}
    verify_build(index, read_s3(s3_bucket, "out"), SIZE)
