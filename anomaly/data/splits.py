"""Deterministic assignment of images to splits and shards.

Normal images go to train, val and test. Anomalous images go only to val and test,
so the model never trains on an anomaly. Images that share a group (for example one
insurance claim) always land in the same split, and a group with any anomalous image
is handled as anomalous.

The assignment is a pure function of the rows and the seed. Groups are ordered by a
seeded SHA-256 hash and cut into splits at the requested image fractions, so the
fractions hold to within one group. When images are added to a data set, only groups
whose hash lies near a cut can change split.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

from anomaly.data.sources import SourceRow

SPLITS = ("train", "val", "test")
ANOMALY_SPLITS = ("val", "test")


@dataclass(frozen=True)
class PlannedSample:
    """One image planned into a shard.

    Attributes:
        sample_key: The tar sample key (``__key__``), unique across all shards.
        key: The key that the manifest or listing gives.
        path: The path to read, relative to the source.
        label: The class label.
        anomalous: Whether the label differs from the normal label.
        group: The group id, or None.
    """

    sample_key: str
    key: str
    path: str
    label: str
    anomalous: bool
    group: str | None


@dataclass(frozen=True)
class ShardPlan:
    """The inputs of one shard: its name relative to the output, its split and samples."""

    name: str
    split: str
    samples: tuple[PlannedSample, ...]


def parse_fractions(text: str, names: tuple[str, ...], option: str) -> tuple[float, ...]:
    """Parse comma-separated split fractions such as ``0.8,0.1,0.1``.

    Raises:
        ValueError: If the count differs from ``names``, a value is negative or not a
            number, or the values do not sum to 1.
    """
    parts = [part.strip() for part in text.split(",")]
    expected = f"{len(names)} comma-separated fractions for {', '.join(names)} that sum to 1"
    try:
        fractions = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"invalid {option} {text!r}: expected {expected}") from None
    if len(fractions) != len(names) or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"invalid {option} {text!r}: expected {expected}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"invalid {option} {text!r}: the fractions sum to {sum(fractions):g}, expected 1")
    return fractions


def _seeded_hash(seed: int, purpose: str, text: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign_splits(
    rows: list[SourceRow],
    normal_label: str,
    normal_split: tuple[float, float, float],
    anomaly_split: tuple[float, float],
    seed: int,
) -> list[str]:
    """Return the split name of each row, in row order.

    Args:
        rows: The accepted rows, with unique paths.
        normal_label: The label of normal images. Every other label is anomalous.
        normal_split: Fractions of normal images for train, val and test.
        anomaly_split: Fractions of anomalous images for val and test.
        seed: Seed of the hash that orders the groups.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        # The prefixes keep an ungrouped row apart from a group whose id equals its path.
        group_id = f"group:{row.group}" if row.group is not None else f"path:{row.path}"
        groups[group_id].append(index)

    normal_groups = []
    anomalous_groups = []
    for group_id, members in groups.items():
        if any(rows[i].label != normal_label for i in members):
            anomalous_groups.append((group_id, members))
        else:
            normal_groups.append((group_id, members))

    splits = [""] * len(rows)
    for chosen_groups, names, fractions in (
        (normal_groups, SPLITS, normal_split),
        (anomalous_groups, ANOMALY_SPLITS, anomaly_split),
    ):
        for group_id, split in _cut_groups(chosen_groups, names, fractions, seed):
            for index in groups[group_id]:
                splits[index] = split
    return splits


def _cut_groups(
    groups: list[tuple[str, list[int]]], names: tuple[str, ...], fractions: tuple[float, ...], seed: int
) -> list[tuple[str, str]]:
    """Order groups by hash and give each the split in which its middle image falls."""
    ordered = sorted(groups, key=lambda group: (_seeded_hash(seed, "split", group[0]), group[0]))
    total = sum(len(members) for _, members in ordered)
    bounds = [sum(fractions[: i + 1]) for i in range(len(fractions))]
    assigned = []
    position = 0
    for group_id, members in ordered:
        middle = (position + len(members) / 2) / total
        split_index = next((i for i, bound in enumerate(bounds) if middle < bound), len(names) - 1)
        assigned.append((group_id, names[split_index]))
        position += len(members)
    return assigned


def plan_shards(
    samples: list[PlannedSample], splits: list[str], shard_samples: int, seed: int
) -> list[ShardPlan]:
    """Shuffle each split's samples with the seed and cut them into shards.

    Shards are named ``<split>/shard-NNNNNN.tar`` and numbered from 0 in each split.
    Within a shard the samples are sorted by sample key, which fixes the tar member
    order.
    """
    if shard_samples < 1:
        raise ValueError(f"invalid shard size {shard_samples}: expected at least 1 image per shard")
    plans = []
    for split in SPLITS:
        members = [sample for sample, name in zip(samples, splits) if name == split]
        members.sort(key=lambda s: (_seeded_hash(seed, "shard", s.sample_key), s.sample_key))
        for number, start in enumerate(range(0, len(members), shard_samples)):
            chunk = sorted(members[start:start + shard_samples], key=lambda s: s.sample_key)
            plans.append(ShardPlan(f"{split}/shard-{number:06d}.tar", split, tuple(chunk)))
    return plans
