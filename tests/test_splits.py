"""Tests for input screening, sample keys, split assignment and shard planning."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from anomaly.data.sources import (
    ManifestColumns,
    ManifestError,
    SourceRow,
    assign_sample_keys,
    read_manifest,
    screen_rows,
    unsafe_path_reason,
)
from anomaly.data.splits import PlannedSample, assign_splits, parse_fractions, plan_shards

SAMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def make_rows(normal: int, anomalous: int, groups: int = 0) -> list[SourceRow]:
    rows = []
    for i in range(normal + anomalous):
        label = "whole" if i < normal else "damaged"
        group = f"claim-{i % groups}" if groups else None
        path = f"{label}/{i:05d}.jpg"
        rows.append(SourceRow(key=path, path=path, label=label, group=group))
    return rows


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("whole/a.jpg", None),
        ("../x.jpg", "unsafe key: contains a '..' path segment"),
        ("whole/../../etc/passwd", "unsafe key: contains a '..' path segment"),
        ("/etc/passwd", "unsafe key: absolute path"),
        ("C:/photos/a.jpg", "unsafe key: absolute path"),
        ("~/a.jpg", "unsafe key: absolute path"),
        ("whole\\a.jpg", "unsafe key: contains a backslash or a control character"),
        ("whole/a\n.jpg", "unsafe key: contains a backslash or a control character"),
        ("whole//a.jpg", "unsafe key: contains an empty or '.' path segment"),
        ("./a.jpg", "unsafe key: contains an empty or '.' path segment"),
    ],
)
def test_unsafe_path_reason(path: str, reason: str | None) -> None:
    assert unsafe_path_reason(path) == reason


def test_screen_rows_rejects_duplicates_and_unsafe() -> None:
    rows = [
        SourceRow("a", "whole/a.jpg", "whole"),
        SourceRow("b", "../b.jpg", "whole"),
        SourceRow("a-again", "whole/a.jpg", "whole"),
        SourceRow("c", "damaged/c.jpg", "damaged"),
    ]
    accepted, rejects = screen_rows(rows)
    assert [row.key for row in accepted] == ["a", "c"]
    reasons = [(r.key, r.reason.split(":")[0]) for r in rejects]
    assert reasons == [("b", "unsafe key"), ("a-again", "duplicate key")]


def test_sample_keys_sanitised_and_unique() -> None:
    paths = [
        "whole/whole_0001.jpg",
        "whole/whole_0001.png",  # same stem, other extension
        "whole_whole_0001.jpg",  # sanitises to the same key
        "dam aged/ü.v2.jpeg",
        "x" * 200 + ".jpg",
        "noextension",
    ]
    keys = assign_sample_keys([SourceRow(p, p, "whole") for p in paths])
    assert keys[0] == "whole_whole_0001"
    assert len(set(keys)) == len(keys)
    assert all(SAMPLE_KEY.match(key) and len(key) <= 90 for key in keys), keys
    assert keys[3] == "dam_aged_v2"
    assert keys[5] == "noextension"
    assert keys == assign_sample_keys([SourceRow(p, p, "whole") for p in paths])


def test_parse_fractions() -> None:
    assert parse_fractions("0.8,0.1,0.1", ("train", "val", "test"), "--normal-split") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.1", "0.5,0.5,0.5", "a,b,c", "1.2,-0.1,-0.1"):
        with pytest.raises(ValueError, match="--normal-split"):
            parse_fractions(bad, ("train", "val", "test"), "--normal-split")


def test_anomalies_never_in_train_and_fractions_hold() -> None:
    rows = make_rows(normal=1000, anomalous=400)
    splits = assign_splits(rows, "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=3)
    normal = Counter(split for row, split in zip(rows, splits) if row.label == "whole")
    anomalous = Counter(split for row, split in zip(rows, splits) if row.label != "whole")
    assert normal == {"train": 800, "val": 100, "test": 100}
    assert anomalous == {"val": 120, "test": 280}


def test_groups_never_straddle_splits() -> None:
    rows = make_rows(normal=300, anomalous=0, groups=40)
    # Ten damaged images join five of the normal groups, which makes those groups anomalous.
    for i in range(10):
        rows.append(SourceRow(f"damaged/{i}.jpg", f"damaged/{i}.jpg", "damaged", f"claim-{i % 5}"))
    splits = assign_splits(rows, "whole", (0.6, 0.2, 0.2), (0.5, 0.5), seed=0)
    by_group: dict[str, set[str]] = {}
    for row, split in zip(rows, splits):
        by_group.setdefault(row.group or "", set()).add(split)
    assert len(by_group) == 40
    assert all(len(names) == 1 for names in by_group.values())
    for group in (f"claim-{i}" for i in range(5)):
        assert by_group[group] <= {"val", "test"}, f"{group} contains a damaged image"
    assert set(splits) == {"train", "val", "test"}


def test_split_assignment_depends_only_on_rows_and_seed() -> None:
    rows = make_rows(normal=200, anomalous=50)
    first = assign_splits(rows, "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=7)
    assert first == assign_splits(list(rows), "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=7)
    reordered = assign_splits(rows[::-1], "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=7)
    assert first == reordered[::-1]
    other_seed = assign_splits(rows, "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=8)
    assert first != other_seed


def test_adding_rows_moves_few_existing_ones() -> None:
    rows = make_rows(normal=1000, anomalous=0)
    before = assign_splits(rows, "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=1)
    extra = [SourceRow(f"new/{i}.jpg", f"new/{i}.jpg", "whole") for i in range(20)]
    after = assign_splits(rows + extra, "whole", (0.8, 0.1, 0.1), (0.3, 0.7), seed=1)
    moved = sum(a != b for a, b in zip(before, after))
    assert moved <= 40


def test_plan_shards_sizes_names_and_order() -> None:
    rows = make_rows(normal=25, anomalous=0)
    keys = assign_sample_keys(rows)
    samples = [PlannedSample(k, r.key, r.path, r.label, False, None) for k, r in zip(keys, rows)]
    splits = ["train"] * 25
    plans = plan_shards(samples, splits, shard_samples=10, seed=0)
    assert [plan.name for plan in plans] == [f"train/shard-{n:06d}.tar" for n in range(3)]
    assert [len(plan.samples) for plan in plans] == [10, 10, 5]
    for plan in plans:
        names = [sample.sample_key for sample in plan.samples]
        assert names == sorted(names)
    planned = sorted(sample.sample_key for plan in plans for sample in plan.samples)
    assert planned == sorted(keys)
    assert plans == plan_shards(samples, splits, shard_samples=10, seed=0)


def test_manifest_missing_column_names_the_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("Key,Dataset\nwhole/a.jpg,Undamaged\n")
    with pytest.raises(ManifestError, match=r"no column 'path'.*--path-column.*Key, Dataset"):
        read_manifest(str(manifest), ManifestColumns(path_column="path", label_column="Dataset"))


def test_manifest_template_with_unknown_placeholder(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("key,label\na,whole\n")
    with pytest.raises(ManifestError, match=r"\{folder\}"):
        read_manifest(str(manifest), ManifestColumns(path_template="{folder}/{key}.jpg"))


def test_manifest_rows_groups_and_bad_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\ufeffkey,label,claim\n"
        "a,whole,c1\n"
        "b,damaged,\n"
        ",whole,c2\n"
        "c,,c3\n"
        "d,whole\n"
    )
    rows, rejects = read_manifest(
        str(manifest), ManifestColumns(group_column="claim", path_template="{label}/{key}.jpg")
    )
    assert rows == [
        SourceRow("a", "whole/a.jpg", "whole", "c1"),
        SourceRow("b", "damaged/b.jpg", "damaged", None),
    ]
    assert [(r.key, r.reason) for r in rejects] == [
        ("", "manifest line 4 has an empty key column"),
        ("c", "manifest line 5 has an empty label column"),
        ("d", "manifest line 6 does not have the 3 fields of the header"),
    ]
