"""Input rows for the shard builder: from a folder per label or from a manifest CSV.

A row names one input image by its path relative to the source location. Rows that
cannot be used safely are rejected here, before any image is read: unsafe paths
(absolute, ``..``, backslashes, control characters), duplicates of an earlier row,
and manifest rows with an empty path or label. Every accepted row also gets a
unique sample key that is safe as a tar member name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import string
from dataclasses import dataclass

from anomaly.data import storage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
MAX_SAMPLE_KEY_LENGTH = 80

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class ManifestError(ValueError):
    """A manifest that cannot be read as configured. The message names the file and the fix."""


@dataclass(frozen=True)
class SourceRow:
    """One input image as listed by the source.

    Attributes:
        key: The image's name as the manifest or listing gives it. Rejects and the
            sample metadata report this value.
        path: The path to read, relative to the source location.
        label: The class label, for example ``whole`` or ``damaged``.
        group: Images with the same group never go to different splits. None makes
            the image a group of its own.
    """

    key: str
    path: str
    label: str
    group: str | None = None


@dataclass(frozen=True)
class Reject:
    """An input row that ends in no shard, with the reason."""

    key: str
    reason: str


@dataclass(frozen=True)
class ManifestColumns:
    """How to read a manifest CSV.

    Attributes:
        path_column: Column with the image path or key.
        label_column: Column with the class label.
        group_column: Optional column with the group id, or "" for no groups.
        path_template: Optional ``str.format`` template that builds the path from
            the row's columns, for example ``{label}/{key}.jpg``, or "" to use the
            path column as it is.
    """

    path_column: str = "key"
    label_column: str = "label"
    group_column: str = ""
    path_template: str = ""


def list_label_folders(source: str) -> list[SourceRow]:
    """List the images below a folder or S3 prefix that has one sub-folder per label.

    The first path segment is the label, so ``whole/a/b.jpg`` has the label
    ``whole``. Files directly in the source, hidden files and files without an
    image extension are skipped and counted in the log.
    """
    rows = []
    skipped = 0
    for path in storage.list_files(source):
        segments = path.split("/")
        is_image = any(path.lower().endswith(ext) for ext in IMAGE_EXTENSIONS)
        if len(segments) < 2 or not is_image or any(s.startswith(".") for s in segments):
            skipped += 1
            continue
        rows.append(SourceRow(key=path, path=path, label=segments[0]))
    # Sorting makes a local folder and its copy in S3 give the same rows in the same order.
    rows.sort(key=lambda row: row.path)
    if skipped:
        logger.info("skipped %d files in %s that are not images inside a label folder", skipped, source)
    if not rows:
        raise ManifestError(
            f"no images found in label folders below {source}: expected files such as "
            f"{storage.join(source, 'whole', 'photo.jpg')}, or pass --manifest"
        )
    return rows


def read_manifest(manifest: str, columns: ManifestColumns) -> tuple[list[SourceRow], list[Reject]]:
    """Read a manifest CSV from a local path or S3 into rows and rejects.

    Returns:
        The rows, in file order, and the rejects for rows with an empty path or
        label or with a different number of fields than the header.

    Raises:
        ManifestError: If the file is not UTF-8 CSV, lacks a configured column, or the
            path template uses a placeholder that is not a column.
    """
    try:
        text = storage.read_bytes(manifest).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {manifest} is not UTF-8 text: {exc}") from None
    except storage.ObjectNotFoundError:
        raise ManifestError(f"manifest not found: {manifest}") from None

    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    _check_columns(manifest, header, columns)

    rows: list[SourceRow] = []
    rejects: list[Reject] = []
    for record in reader:
        line = reader.line_num
        key = (record.get(columns.path_column) or "").strip()
        if None in record or None in record.values():
            reason = f"manifest line {line} does not have the {len(header)} fields of the header"
            rejects.append(Reject(key, reason))
            continue
        label = record[columns.label_column].strip()
        if not key or not label:
            empty = columns.path_column if not key else columns.label_column
            rejects.append(Reject(key, f"manifest line {line} has an empty {empty} column"))
            continue
        path = columns.path_template.format_map(record) if columns.path_template else key
        group = record[columns.group_column].strip() if columns.group_column else ""
        rows.append(SourceRow(key=key, path=path, label=label, group=group or None))
    logger.info("read %d rows from manifest %s", len(rows) + len(rejects), manifest)
    return rows, rejects


def _check_columns(manifest: str, header: list[str], columns: ManifestColumns) -> None:
    available = ", ".join(header) if header else "none (the file is empty)"
    for option, column in (
        ("--path-column", columns.path_column),
        ("--label-column", columns.label_column),
        ("--group-column", columns.group_column),
    ):
        if column and column not in header:
            raise ManifestError(
                f"manifest {manifest} has no column {column!r} (set by {option}). "
                f"Its columns are: {available}"
            )
    for _, field, _, _ in string.Formatter().parse(columns.path_template):
        if field is not None and field not in header:
            raise ManifestError(
                f"--path-template {columns.path_template!r} uses {{{field}}}, which is not a column of "
                f"manifest {manifest}. Its columns are: {available}"
            )


def unsafe_path_reason(path: str) -> str | None:
    """Return why a relative path is unsafe to read or to name a file after, or None."""
    if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", path):
        return "unsafe key: absolute path"
    if "\\" in path or _CONTROL_CHARACTERS.search(path):
        return "unsafe key: contains a backslash or a control character"
    segments = path.split("/")
    if ".." in segments:
        return "unsafe key: contains a '..' path segment"
    if any(segment in {"", "."} for segment in segments):
        return "unsafe key: contains an empty or '.' path segment"
    return None


def screen_rows(rows: list[SourceRow]) -> tuple[list[SourceRow], list[Reject]]:
    """Reject unsafe paths and rows whose path repeats an earlier row's, keeping order."""
    accepted: list[SourceRow] = []
    rejects: list[Reject] = []
    seen: set[str] = set()
    for row in rows:
        reason = unsafe_path_reason(row.path)
        if reason is None and row.path in seen:
            reason = "duplicate key: an earlier row names the same path"
        if reason is not None:
            rejects.append(Reject(row.key, reason))
            continue
        seen.add(row.path)
        accepted.append(row)
    return accepted, rejects


def assign_sample_keys(rows: list[SourceRow]) -> list[str]:
    """Derive a unique tar sample key for each row, in row order.

    The key is the path without its extension, with every run of characters other
    than ``A-Z a-z 0-9 _ -`` replaced by ``_``: ``whole/whole_0001.jpg`` becomes
    ``whole_whole_0001``. A key that is too long or already taken by an earlier row
    gets a suffix from a hash of the path, so keys depend only on the rows.
    """
    keys: list[str] = []
    used_keys: set[str] = set()
    for row in rows:
        stem = row.path.rsplit(".", 1)[0] if "." in row.path.rsplit("/", 1)[-1] else row.path
        key = _UNSAFE_CHARACTERS.sub("_", stem).strip("_") or "image"
        digest = hashlib.sha256(row.path.encode()).hexdigest()
        if len(key) > MAX_SAMPLE_KEY_LENGTH or key in used_keys:
            key = f"{key[:MAX_SAMPLE_KEY_LENGTH - 9]}-{digest[:8]}"
        unique = key
        counter = 1
        while unique in used_keys:
            counter += 1
            unique = f"{key}-{counter}"
        used_keys.add(unique)
        keys.append(unique)
    return keys
