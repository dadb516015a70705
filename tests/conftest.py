"""Shared fixtures: a moto S3 server on 127.0.0.1 and a local Ray cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.s3server import MotoServer
from tests.shard_checks import SamplePhotos, copy_sample_photos

# Dummy credentials and no instance-metadata lookups, so boto3 never reaches for
# a real account or the network.
TEST_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """Start a moto S3 server for the session and point boto3 at it through os.environ.

    Sets ``AWS_ENDPOINT_URL``, dummy credentials and ``AWS_EC2_METADATA_DISABLED``,
    and restores the previous environment at the end.
    """
    home = tmp_path_factory.mktemp("aws")
    environment = {
        **TEST_AWS_ENVIRONMENT,
        # Empty config files keep a developer's own AWS profile out of the tests.
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }
    server = MotoServer(log_path=home / "moto.log")
    server.start()
    environment["AWS_ENDPOINT_URL"] = server.url
    saved = {name: os.environ.get(name) for name in [*environment, "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(environment)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture()
def s3_bucket(moto_server: MotoServer) -> str:
    """Create an empty bucket with a unique name on the moto server and return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server.url).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(moto_server: MotoServer) -> Iterator[None]:
    """Start a 2-CPU local Ray cluster for the session, bound to 127.0.0.1.

    It depends on ``moto_server`` because Ray workers inherit the environment that
    exists when the cluster starts, and S3 code in tasks needs ``AWS_ENDPOINT_URL``.
    """
    import ray

    from anomaly.ray_cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def car_photos() -> Path:
    """Return the folder of real car photos that tests may read, skipping when it is absent."""
    # The shared folder sits beside the repository checkout.
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "car_damage"
    folder = Path(os.environ.get("CAR_DAMAGE_DIR", str(default)))
    if not (folder / "whole").is_dir():
        pytest.skip(f"car photos not found in {folder}. Set CAR_DAMAGE_DIR")
    return folder


@pytest.fixture(scope="session")
def sample_photos(car_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> SamplePhotos:
    """A copy of 40 whole and 20 damaged photos with both manifest layouts filtered to them."""
    return copy_sample_photos(car_photos, tmp_path_factory.mktemp("sample_photos"), whole=40, damaged=20)


@pytest.fixture(scope="session")
def car_shards(car_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Shards at 32 px from 64 whole and 32 damaged real photos."""
    raw = tmp_path_factory.mktemp("cars")
    for label, count in (("whole", 64), ("damaged", 32)):
        (raw / label).mkdir()
        for path in sorted((car_photos / label).glob("*.jpg"))[:count]:
            shutil.copy(path, raw / label / path.name)
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [sys.executable, "-m", "jobs.build_shards", "--source", str(raw), "--output", str(out),
         "--normal-label", "whole", "--image-size", "32", "--shard-samples", "16", "--seed", "3"],
        check=True, cwd=Path(__file__).resolve().parents[1],
    )
    return str(out)
