"""Test helpers that read built shards back and check them against index.json."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

SAMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class SamplePhotos:
    """A small copy of the real car photos with both manifest layouts for it.

    Attributes:
        folder: Folder with ``whole/`` and ``damaged/`` sub-folders.
        inventory_manifest: S3-inventory-style CSV (Key, ..., Dataset) for the copy.
        template_manifest: CSV with ``key`` (file name without .jpg) and ``label``.
        keys: The relative paths of all copied images.
    """

    folder: Path
    inventory_manifest: Path
    template_manifest: Path
    keys: tuple[str, ...]


def copy_sample_photos(source: Path, target: Path, whole: int, damaged: int) -> SamplePhotos:
    """Copy the first images of each class and filter both manifests to them."""
    keys = []
    for label, count in (("whole", whole), ("damaged", damaged)):
        (target / "photos" / label).mkdir(parents=True)
        for path in sorted((source / label).glob("*.jpg"))[:count]:
            shutil.copyfile(path, target / "photos" / label / path.name)
            keys.append(f"{label}/{path.name}")
    wanted = set(keys)
    inventory = _filter_csv(source / "nugen_style_manifest.csv", lambda row: row["Key"] in wanted)
    template = _filter_csv(source / "manifest.csv", lambda row: f"{row['label']}/{row['key']}.jpg" in wanted)
    (target / "inventory.csv").write_text(inventory)
    (target / "manifest.csv").write_text(template)
    return SamplePhotos(target / "photos", target / "inventory.csv", target / "manifest.csv", tuple(keys))


def _filter_csv(path: Path, keep: Callable[[dict[str, str]], bool]) -> str:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        output = io.StringIO()
        writer = csv.DictWriter(output, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        writer.writerows(row for row in reader if keep(row))
    return output.getvalue()


def read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """Return ``{sample key: {extension: bytes}}`` and check the fixed member metadata."""
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    names = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            assert member.isfile(), member.name
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644), member.name
            assert member.uname == "", member.name
            assert member.gname == "", member.name
            key, extension = member.name.split(".", 1)
            samples[key][extension] = tar.extractfile(member).read()  # type: ignore[union-attr]
            names.append(member.name)
    assert names == sorted(names), "tar members must be sorted"
    return dict(samples)


def verify_build(
    index: dict[str, Any], read: Callable[[str], bytes], image_size: int
) -> dict[str, dict[str, Any]]:
    """Check every shard against index.json and return each sample's metadata by original key."""
    metadata_by_key: dict[str, dict[str, Any]] = {}
    sample_keys: set[str] = set()
    for split, entry in index["splits"].items():
        split_labels: collections.Counter[str] = collections.Counter()
        for shard in entry["shards"]:
            assert shard["name"].startswith(f"{split}/shard-")
            assert shard["name"].endswith(".tar")
            data = read(shard["name"])
            assert len(data) == shard["bytes"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            samples = read_tar(data)
            assert len(samples) == shard["count"]
            labels: collections.Counter[str] = collections.Counter()
            for sample_key, members in samples.items():
                assert SAMPLE_KEY.match(sample_key), sample_key
                assert sample_key not in sample_keys, f"duplicate sample key {sample_key}"
                sample_keys.add(sample_key)
                assert set(members) == {"jpg", "json"}
                metadata = json.loads(members["json"])
                assert set(metadata) == {"key", "label", "anomalous", "group"}
                assert metadata["anomalous"] == int(metadata["label"] != index["normal_label"])
                if split == "train":
                    assert metadata["anomalous"] == 0
                image = Image.open(io.BytesIO(members["jpg"]))
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (image_size, image_size)
                labels[metadata["label"]] += 1
                metadata_by_key[metadata["key"]] = {**metadata, "split": split, "shard": shard["name"]}
            assert dict(labels) == shard["labels"]
            split_labels.update(labels)
        assert entry["count"] == sum(shard["count"] for shard in entry["shards"])
        assert entry["labels"] == dict(split_labels)
    totals = index["totals"]
    assert totals["written"] == len(metadata_by_key)
    assert totals["rejected"] == len(index["rejects"])
    assert totals["rows"] == totals["written"] + totals["rejected"]
    return metadata_by_key


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Return the contents of every file below a folder, by relative path."""
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in files}
