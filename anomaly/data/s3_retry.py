"""The per-process S3 client and the retry policy wrapped around every S3 call.

Errors fall into four groups:

- transient (throttling, 5xx, dropped connections, timeouts, short reads): retried
  with exponential backoff and full jitter, then :class:`StorageError`;
- permanent (access denied, missing bucket, invalid or missing credentials):
  :class:`StorageAccessError` at once, because retrying cannot help;
- missing object: :class:`ObjectNotFoundError`, for the caller to count;
- anything else: :class:`StorageError` at once.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import threading
import time
from typing import Any, Callable, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions
from boto3.exceptions import RetriesExceededError, S3UploadFailedError

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ATTEMPTS = 8
BASE_DELAY_S = 0.2
MAX_DELAY_S = 20.0

_PERMANENT_CODES = {
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidAccessKeyId",
    "InvalidBucketName", "InvalidToken", "NoSuchBucket", "SignatureDoesNotMatch",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "503", "500",
}
_TRANSIENT_EXCEPTIONS = (
    botocore.exceptions.ConnectionError,  # includes endpoint and connect-timeout errors
    botocore.exceptions.HTTPClientError,  # includes closed connections and read timeouts
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    http.client.IncompleteRead,
    RetriesExceededError,
    ConnectionError,
)

_clients: dict[tuple[int, str, str, str], Any] = {}
_clients_lock = threading.Lock()


class StorageError(RuntimeError):
    """A failed storage call. The message names the location and what to check."""


class StorageAccessError(StorageError):
    """A permanent error, such as access denied or a missing bucket, that must stop the job."""


class ObjectNotFoundError(StorageError):
    """The file or object does not exist."""


class ShortReadError(ConnectionError):
    """A response body that ended before its Content-Length, retried like a dropped connection."""


def client() -> Any:
    """Return this process's S3 client, creating it on first use.

    The client reads the standard AWS configuration. Botocore's retry mode and
    attempt count come from ``AWS_RETRY_MODE`` and ``AWS_MAX_ATTEMPTS`` when set,
    otherwise adaptive mode with 4 attempts, which also slows the client down after
    throttling. An endpoint set in ``AWS_ENDPOINT_URL`` gets path-style addressing,
    which S3-compatible servers such as MinIO and moto expect.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    mode = os.environ.get("AWS_RETRY_MODE", "adaptive")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "4")
    # A forked process must not share its parent's connection pool, and a changed
    # environment must take effect, so the cache key contains the process and settings.
    cache_key = (os.getpid(), endpoint, mode, attempts)
    with _clients_lock:
        if cache_key not in _clients:
            config = botocore.config.Config(
                # AWS_MAX_ATTEMPTS counts the first attempt, like total_max_attempts.
                retries={"mode": mode, "total_max_attempts": int(attempts)},
                max_pool_connections=32,
                s3={"addressing_style": "path"} if endpoint else None,
            )
            _clients[cache_key] = boto3.session.Session().client("s3", config=config)
        return _clients[cache_key]


def call_with_retries(operation: str, url: str, call: Callable[[], T]) -> T:
    """Run one S3 call, retrying transient failures with backoff and full jitter.

    Args:
        operation: The S3 operation name, used in messages (``GetObject``).
        url: The ``s3://`` location involved, used in messages.
        call: The call to run, which must be safe to repeat.

    Raises:
        StorageAccessError: On a permanent error.
        ObjectNotFoundError: If the object does not exist.
        StorageError: On any other error, or when retries are exhausted.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unknown
            error = _classify(exc, operation, url)
            if error is not None:
                raise error from exc
            if attempt == MAX_ATTEMPTS:
                raise StorageError(
                    f"{operation} {url} failed after {MAX_ATTEMPTS} attempts: {_describe(exc)}. "
                    "Check that the S3 endpoint is reachable and not throttling this job"
                ) from exc
            delay = random.uniform(0.0, min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1)))
            logger.warning(
                "%s %s failed (%s), retrying in %.2f s (attempt %d of %d)",
                operation, url, _describe(exc), delay, attempt + 1, MAX_ATTEMPTS,
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _classify(exc: BaseException, operation: str, url: str) -> StorageError | None:
    """Map an exception to the error to raise, or to None when it is worth retrying."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        # boto3 wraps the ClientError of a failed upload and keeps it only as context.
        exc = exc.__context__
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return StorageAccessError(
            f"{operation} {url} failed: no usable AWS credentials. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role is available"
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(f"object not found: {url}")
        if code in _PERMANENT_CODES or status == 403:
            # A HEAD response has no body, so its code is only the status number.
            shown_code = "AccessDenied" if code == "403" else code
            return StorageAccessError(_permanent_message(operation, url, shown_code))
        if code in _TRANSIENT_CODES or status >= 500:
            return None
        return StorageError(f"{operation} {url} failed: {_describe(exc)}")
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return None
    return StorageError(f"{operation} {url} failed: {_describe(exc)}")


def _permanent_message(operation: str, url: str, code: str) -> str:
    bucket = url[len("s3://"):].partition("/")[0]
    if code == "NoSuchBucket":
        hint = f"check the bucket name {bucket!r} and that AWS_ENDPOINT_URL points at the right server"
    elif code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}:
        hint = "check the AWS credentials in use (environment, AWS_PROFILE or instance role)"
    else:
        hint = (
            f"check that the credentials in use may run {operation} on bucket {bucket!r} "
            "(bucket policy, IAM policy, KMS key). Without s3:ListBucket, a missing key also "
            "returns AccessDenied"
        )
    return f"{operation} {url} failed with {code}, which retrying cannot fix: {hint}"


def _describe(exc: BaseException) -> str:
    """Describe an exception in one line without request headers or credentials."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"HTTP {status} {error.get('Code', '')} {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
