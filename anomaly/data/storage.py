"""Read and write files on a local disk or in S3 through one set of functions.

A location is either a local path or an ``s3://bucket/key`` URL. The S3 client is
created lazily in each process (Ray workers included) from the standard AWS
configuration, so ``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` and the usual credential
variables work. Every S3 call, listing pages included, is retried with exponential
backoff and full jitter on throttling (SlowDown, 503), server errors, dropped
connections and short reads, on top of botocore's own retries. A permanent error
(access denied, missing bucket, invalid credentials) raises
:class:`StorageAccessError` at once. A missing object raises
:class:`ObjectNotFoundError`. Credentials never appear in messages or logs.

Writes are atomic: a local file is written under a temporary name and renamed, and
an S3 object becomes visible only after its upload completes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator

from boto3.s3.transfer import TransferConfig

from anomaly.data.s3_retry import (
    ObjectNotFoundError,
    ShortReadError,
    StorageAccessError,
    StorageError,
    call_with_retries,
    client,
)

logger = logging.getLogger(__name__)

# A shard of 1000 car photos at 256 px is about 25 MB (measured), so it uploads in one
# request. Larger shards go up in 16 MB parts, which S3 assembles into the object only
# when the upload completes.
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=64 * 1024**2,
    multipart_chunksize=16 * 1024**2,
    max_concurrency=4,
)

__all__ = [
    "ObjectNotFoundError", "StorageAccessError", "StorageError", "delete", "download_file", "exists",
    "file_size", "is_s3", "join", "list_files", "open_stream", "read_bytes",
    "register_webdataset_s3", "split_s3_url", "temporary_path_beside", "upload_file", "write_bytes",
]


def is_s3(url: str | os.PathLike[str]) -> bool:
    """Return whether a location is an ``s3://`` URL."""
    return str(url).startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Raises:
        ValueError: If the URL does not start with ``s3://`` or names no bucket.
    """
    if not is_s3(url):
        raise ValueError(f"invalid S3 URL {url!r}: expected s3://bucket/key")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"invalid S3 URL {url!r}: the bucket name is missing, expected s3://bucket/key")
    return bucket, key


def join(url: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URL with ``/`` separators."""
    url = str(url)
    if not is_s3(url):
        return os.path.join(url, *parts)
    joined = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            joined = f"{joined}/{part}"
    return joined


def read_bytes(url: str) -> bytes:
    """Read a whole file or object.

    Raises:
        ObjectNotFoundError: If it does not exist.
        StorageAccessError: If access is denied or the bucket does not exist.
        StorageError: If retries are exhausted.
    """
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"file not found: {url}") from None
        except PermissionError:
            message = f"permission denied reading {url}: check the file's owner and mode"
            raise StorageAccessError(message) from None

    bucket, key = split_s3_url(url)

    def get() -> bytes:
        response = client().get_object(Bucket=bucket, Key=key)
        body = response["Body"].read()
        if len(body) != response["ContentLength"]:
            raise ShortReadError(f"short read of {url}: got {len(body)} of {response['ContentLength']} bytes")
        return body

    return call_with_retries("GetObject", url, get)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file or object atomically, creating local parent folders."""
    if is_s3(url):
        bucket, key = split_s3_url(url)
        call_with_retries("PutObject", url, lambda: client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    with _atomic_local_write(url) as handle:
        handle.write(data)


def delete(url: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3_url(url)
    call_with_retries("DeleteObject", url, lambda: client().delete_object(Bucket=bucket, Key=key))


def exists(url: str) -> bool:
    """Return whether a file or object exists."""
    return file_size(url) is not None


def file_size(url: str) -> int | None:
    """Return the size in bytes of a file or object, or None if it does not exist."""
    if not is_s3(url):
        try:
            return Path(url).stat().st_size
        except FileNotFoundError:
            return None
    bucket, key = split_s3_url(url)
    try:
        response = call_with_retries("HeadObject", url, lambda: client().head_object(Bucket=bucket, Key=key))
    except ObjectNotFoundError:
        return None
    return int(response["ContentLength"])


def list_files(url: str, page_size: int = 1000) -> Iterator[str]:
    """Yield the relative paths of all files below a folder or S3 prefix.

    A local folder is walked with names sorted in each folder, and S3 returns keys in
    UTF-8 byte order.

    An S3 prefix is treated as a folder: ``s3://bucket/photos`` lists keys that start
    with ``photos/``. Folder marker objects (keys ending in ``/``) are skipped. Each
    listing page of up to ``page_size`` keys (S3 caps it at 1000) is requested and
    retried on its own, so any number of objects works.
    """
    if not is_s3(url):
        root = Path(url)
        if not root.is_dir():
            raise ObjectNotFoundError(f"folder not found: {url}")
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            relative_folder = Path(folder).relative_to(root)
            for name in sorted(files):
                yield (relative_folder / name).as_posix()
        return

    bucket, prefix = split_s3_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    request: dict[str, str | int] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = call_with_retries(
            "ListObjectsV2", url, lambda request=dict(request): client().list_objects_v2(**request)
        )
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield item["Key"][len(prefix):]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def open_stream(url: str) -> IO[bytes]:
    """Open a file or object for streaming reads.

    Opening is retried like any other call. For S3 the result is botocore's
    streaming body, which reads from the open connection.
    """
    # NOTE: an S3 connection that drops while the caller reads the stream is not
    # retried here, because the position inside the caller's parser would be lost.
    if not is_s3(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise ObjectNotFoundError(f"file not found: {url}") from None
    bucket, key = split_s3_url(url)
    response = call_with_retries("GetObject", url, lambda: client().get_object(Bucket=bucket, Key=key))
    return response["Body"]


def upload_file(local_path: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to a location, atomically and in parts when large."""
    if not is_s3(url):
        with _atomic_local_write(url) as handle:
            with open(local_path, "rb") as source:
                shutil.copyfileobj(source, handle, length=1024**2)
        return

    bucket, key = split_s3_url(url)

    def upload() -> None:
        # Reopen on every attempt: a failed attempt leaves the file position anywhere.
        with open(local_path, "rb") as source:
            client().upload_fileobj(source, bucket, key, Config=TRANSFER_CONFIG)

    call_with_retries("PutObject", url, upload)


def download_file(url: str, local_path: str | os.PathLike[str]) -> None:
    """Copy a file or object to a local path, which appears only once complete."""
    if not is_s3(url):
        with _atomic_local_write(local_path) as handle:
            try:
                with open(url, "rb") as source:
                    shutil.copyfileobj(source, handle, length=1024**2)
            except FileNotFoundError:
                raise ObjectNotFoundError(f"file not found: {url}") from None
        return

    bucket, key = split_s3_url(url)

    def download() -> None:
        with _atomic_local_write(local_path) as handle:
            client().download_fileobj(bucket, key, handle, Config=TRANSFER_CONFIG)

    call_with_retries("GetObject", url, download)


@contextlib.contextmanager
def _atomic_local_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` on success."""
    path = Path(path)
    temp = temporary_path_beside(path)
    try:
        with open(temp, "xb") as handle:
            yield handle
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def temporary_path_beside(path: str | os.PathLike[str]) -> Path:
    """Return an unused hidden path in the folder of ``path``, creating the folder.

    Renaming the temporary file onto ``path`` is atomic because both are in one
    folder. Files created there get the usual permissions from the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def register_webdataset_s3() -> None:
    """Install an ``s3`` opener in ``webdataset.gopen_schemes``.

    webdataset 1.0.2 has no opener for ``s3://`` shard URLs. The one installed here
    returns the boto3 streaming body, with the client created lazily in the calling
    process. Call it in every process that reads shards, Ray workers included.
    """
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: object) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads shards: got mode {mode!r} for {url}")
    return open_stream(url)
