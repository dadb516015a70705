"""Build one webdataset shard: fetch its images, preprocess them, write and upload the tar.

Each sample is two tar members, ``<key>.jpg`` (the preprocessed JPEG) and
``<key>.json`` (``{"key", "label", "anomalous", "group"}``). Members are sorted and
carry fixed metadata (mtime 0, uid and gid 0, mode 0644), so the same inputs always
give the same bytes.

Beside ``<split>/shard-NNNNNN.tar`` the builder writes ``shard-NNNNNN.json``, a
sidecar with the digest of the planned inputs and settings, the counts, the rejects
and the tar's SHA-256 and size. The sidecar is written after the tar, so a sidecar
whose digest matches the plan marks a finished shard that a rerun can skip.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import PIL

from anomaly.data import storage
from anomaly.data.preprocess import JPEG_QUALITY, ImageDecodeError, encode_jpeg, preprocess
from anomaly.data.splits import PlannedSample, ShardPlan
from anomaly.data.tar_writer import UstarWriter

logger = logging.getLogger(__name__)

SIDECAR_FORMAT_VERSION = 1
# Concurrent S3 reads per task: enough to hide the latency of S3, and few enough that a
# task keeps only a few encoded images in memory instead of its whole shard.
PREFETCH_WINDOW = 16


@dataclass(frozen=True)
class ShardSettings:
    """Build settings shared by all shards of one job.

    Attributes:
        source: Folder or S3 prefix that sample paths are relative to.
        output: Folder or S3 prefix that receives the shards.
        image_size: Side of the square output images in pixels.
        min_side: Inputs whose shorter side is below this many pixels are rejected.
    """

    source: str
    output: str
    image_size: int
    min_side: int


@dataclass
class ShardResult:
    """Contents and checksum of one shard, as recorded in its sidecar and in index.json."""

    name: str
    inputs_sha256: str
    count: int
    labels: dict[str, int]
    sha256: str
    bytes: int
    rejects: list[dict[str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    skipped: bool = False


def sidecar_name(shard_name: str) -> str:
    """Return the sidecar path for a shard path: ``train/shard-000000.json``."""
    return shard_name.removesuffix(".tar") + ".json"


def inputs_digest(plan: ShardPlan, settings: ShardSettings) -> str:
    """Hash everything that determines a shard's bytes: its inputs, the settings and Pillow."""
    description = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "name": plan.name,
        "source": settings.source,
        "image_size": settings.image_size,
        "min_side": settings.min_side,
        "jpeg_quality": JPEG_QUALITY,
        "pillow": PIL.__version__,
        "samples": [
            [sample.sample_key, sample.key, sample.path, sample.label, sample.anomalous, sample.group]
            for sample in plan.samples
        ],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def read_finished(plan: ShardPlan, settings: ShardSettings) -> ShardResult | None:
    """Return the recorded result of a finished shard that matches the plan, or None.

    A shard counts as finished when its sidecar has the planned inputs digest and
    the tar exists with the recorded size.
    """
    # NOTE: an image replaced under an unchanged key goes unnoticed, because the digest
    # covers keys and settings, not image contents.
    try:
        sidecar = json.loads(storage.read_bytes(storage.join(settings.output, sidecar_name(plan.name))))
    except storage.ObjectNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("sidecar of %s is not valid JSON, so the shard is rebuilt", plan.name)
        return None
    if sidecar.get("inputs_sha256") != inputs_digest(plan, settings):
        return None
    if storage.file_size(storage.join(settings.output, plan.name)) != sidecar.get("bytes"):
        return None
    known = {f.name for f in ShardResult.__dataclass_fields__.values()} - {"skipped"}
    return ShardResult(**{k: v for k, v in sidecar.items() if k in known}, skipped=True)


def build_shard(plan: ShardPlan, settings: ShardSettings) -> ShardResult:
    """Fetch, preprocess and write one shard and its sidecar, as one Ray task.

    Images that are missing, unreadable or too small are left out and reported in
    the result's rejects. Storage errors other than a missing object propagate, so a
    permanent error such as access denied stops the job.
    """
    result = ShardResult(
        name=plan.name,
        inputs_sha256=inputs_digest(plan, settings),
        count=0,
        labels={},
        sha256="",
        bytes=0,
        inputs=[sample.key for sample in plan.samples],
    )
    _publish(storage.join(settings.output, plan.name), lambda path: _write_tar(path, plan, settings, result))
    sidecar = {"format_version": SIDECAR_FORMAT_VERSION, **asdict(result)}
    del sidecar["skipped"]
    storage.write_bytes(
        storage.join(settings.output, sidecar_name(plan.name)),
        json.dumps(sidecar, indent=1, sort_keys=True).encode(),
    )
    return result


def _write_tar(path: str, plan: ShardPlan, settings: ShardSettings, result: ShardResult) -> None:
    """Write the tar to a local path and fill in the result's counts, size and hash."""
    labels: collections.Counter[str] = collections.Counter()
    with open(path, "wb") as handle:
        tar = UstarWriter(handle)
        for sample, data in _prefetch(plan.samples, settings.source):
            if data is None:
                result.rejects.append({"key": sample.key, "reason": "missing object"})
                continue
            try:
                image = preprocess(data, sample.key, settings.image_size, settings.min_side)
            except ImageDecodeError as exc:
                result.rejects.append({"key": sample.key, "reason": exc.reason})
                continue
            metadata = {
                "key": sample.key,
                "label": sample.label,
                "anomalous": int(sample.anomalous),
                "group": sample.group,
            }
            tar.add(f"{sample.sample_key}.jpg", encode_jpeg(image))
            tar.add(f"{sample.sample_key}.json", json.dumps(metadata, sort_keys=True).encode())
            labels[sample.label] += 1
        tar.close()
    result.count = sum(labels.values())
    result.labels = dict(sorted(labels.items()))
    result.sha256 = _file_sha256(path)
    result.bytes = os.path.getsize(path)


def _prefetch(
    samples: tuple[PlannedSample, ...], source: str
) -> Iterator[tuple[PlannedSample, bytes | None]]:
    """Yield each sample with its bytes, or None when the object is missing, in order.

    S3 objects are fetched by a small thread pool ahead of use. Local files are read
    one by one, because threads cost more CPU time than a local read waits.
    """

    def fetch(sample: PlannedSample) -> bytes | None:
        try:
            return storage.read_bytes(storage.join(source, sample.path))
        except storage.ObjectNotFoundError:
            return None

    if not storage.is_s3(source):
        for sample in samples:
            yield sample, fetch(sample)
        return

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=PREFETCH_WINDOW)
    pending: collections.deque[tuple[PlannedSample, concurrent.futures.Future[bytes | None]]]
    pending = collections.deque()
    remaining = iter(samples)
    try:
        for sample in remaining:
            pending.append((sample, pool.submit(fetch, sample)))
            if len(pending) >= PREFETCH_WINDOW:
                break
        while pending:
            sample, future = pending.popleft()
            next_sample = next(remaining, None)
            if next_sample is not None:
                pending.append((next_sample, pool.submit(fetch, next_sample)))
            yield sample, future.result()
    finally:
        # After an error, skip the reads that have not started instead of waiting for them.
        pool.shutdown(wait=True, cancel_futures=True)


def _publish(url: str, write: Callable[[str], None]) -> None:
    """Write a shard to a temporary path with ``write``, then move it into place.

    A local shard is written beside its final path and renamed, so it appears only
    complete. An S3 shard is written to the local temp folder and uploaded, and S3
    shows the object only once the upload completes.
    """
    if storage.is_s3(url):
        fd, temp_name = tempfile.mkstemp(prefix="shard-", suffix=".tar")
        os.close(fd)
        temp = Path(temp_name)
    else:
        temp = storage.temporary_path_beside(url)
    try:
        write(str(temp))
        if storage.is_s3(url):
            storage.upload_file(temp, url)
        else:
            os.replace(temp, url)
    finally:
        temp.unlink(missing_ok=True)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024**2), b""):
            digest.update(block)
    return digest.hexdigest()
