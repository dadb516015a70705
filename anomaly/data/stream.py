"""Stream shards back for training and scoring, local or from S3.

Training needs every data-parallel rank to run exactly the same number of steps
per epoch, or one rank blocks in all-reduce while another has finished. The
plan here fixes ``steps_per_epoch`` from the split's total count and the global
batch, gives each rank a disjoint set of shards, and cycles a rank's shards if
they run out before its steps are done. Evaluation instead reads every sample
exactly once across ranks, and callers de-duplicate by key after gathering.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any, Iterator

import torch

from anomaly.data import storage
from anomaly.data.loader import chunks_in_workers
from anomaly.data.samples import RankPlan, Sample, SkipCounter, iterate_samples

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SPLITS = ("train", "val", "test")


class ShardIndexError(ValueError):
    """The shard folder or its index.json is missing or does not fit the request."""


def read_index(shards_root: str) -> dict[str, Any]:
    """Read ``index.json`` from a shard folder or S3 prefix."""
    url = storage.join(shards_root, INDEX_NAME)
    try:
        index = json.loads(storage.read_bytes(url))
    except storage.ObjectNotFoundError as exc:
        raise ShardIndexError(
            f"no {INDEX_NAME} at {url}: build shards first with python -m jobs.build_shards "
            "(an unfinished build writes index.json last, so rerun it to finish)"
        ) from exc
    if index.get("format_version") != 1:
        raise ShardIndexError(f"{url} has format_version {index.get('format_version')!r}; this code reads 1")
    return index


def check_image_size(index: dict[str, Any], image_size: int, shards_root: str) -> None:
    """Fail when the model wants larger images than the shards hold (upsampling would hide detail loss)."""
    if image_size > index["image_size"]:
        raise ShardIndexError(
            f"model.image_size={image_size} is larger than the {index['image_size']} px images in "
            f"{shards_root}; rebuild the shards with --image-size {image_size} or lower model.image_size"
        )


def split_count(index: dict[str, Any], split: str) -> int:
    if split not in index["splits"]:
        raise ShardIndexError(f"split {split!r} is not in the shard index; it has {sorted(index['splits'])}")
    return int(index["splits"][split]["count"])


def assign_shards(shards: list[dict[str, Any]], world_size: int) -> list[list[dict[str, Any]]]:
    """Spread shards over ranks, largest first onto the rank with the fewest samples.

    Deterministic for a given shard list, so every rank computes the same plan.
    """
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for shard in sorted(shards, key=lambda s: (-int(s["count"]), s["name"])):
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        buckets[rank].append(shard)
        totals[rank] += int(shard["count"])
    return buckets


def plan_for_rank(index: dict[str, Any], shards_root: str, split: str, rank: int, world_size: int) -> RankPlan:
    shards = [s for s in index["splits"][split]["shards"] if int(s["count"]) > 0]
    if len(shards) >= world_size:
        mine = assign_shards(shards, world_size)[rank]
        return RankPlan([storage.join(shards_root, s["name"]) for s in sorted(mine, key=lambda s: s["name"])], 1, 0)
    urls = [storage.join(shards_root, s["name"]) for s in shards]
    return RankPlan(urls, world_size, rank)


def _collate(items: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    return images, labels, [item[2] for item in items]


def steps_per_epoch(index: dict[str, Any], split: str, global_batch_size: int) -> int:
    total = split_count(index, split)
    if total < global_batch_size:
        raise ShardIndexError(
            f"the {split} split has {total} images, fewer than train.global_batch_size={global_batch_size}; "
            "lower the batch size or add images"
        )
    return total // global_batch_size


def train_batches(index: dict[str, Any], shards_root: str, *, rank: int, world_size: int, image_size: int,
                  batch_size: int, steps: int, seed: int, epoch: int, shuffle_buffer: int,
                  skipped: SkipCounter | None = None, loader_workers: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Yield exactly ``steps`` training batches for one rank and epoch.

    Shard order and sample shuffling depend on (seed, epoch, rank, loader_workers)
    only, so a resumed epoch reads the same data as the interrupted one. With
    ``loader_workers`` > 0, worker processes decode (see ``anomaly.data.loader``).
    """
    plan = plan_for_rank(index, shards_root, "train", rank, world_size)
    pending: list[Sample] = []
    produced = 0
    cycle = 0
    while produced < steps:
        shuffle_seed = random.Random(f"{seed}-{epoch}-{rank}-{cycle}").getrandbits(31)
        got_any = False
        if loader_workers > 0:
            chunks = chunks_in_workers(plan, image_size, shuffle_seed, shuffle_buffer, skipped,
                                       loader_workers, chunk_size=batch_size)
        else:
            chunks = _single_samples(iterate_samples(plan, image_size, shuffle_seed, shuffle_buffer, skipped))
        for images, labels, keys in chunks:
            got_any = True
            if not pending and len(keys) == batch_size:
                # A whole batch decoded by one loader worker needs no restacking.
                yield images, torch.tensor(labels, dtype=torch.long), keys
            else:
                # Chunks hold at most batch_size samples, so this completes at most one batch.
                pending.extend(zip(images, labels, keys))
                if len(pending) < batch_size:
                    continue
                yield _collate(pending[:batch_size])
                pending = pending[batch_size:]
            produced += 1
            if produced == steps:
                return
        if not got_any:
            raise ShardIndexError(f"rank {rank} read no readable training samples from {plan.urls}")
        cycle += 1


def _single_samples(samples: Iterator[Sample]) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    """Wrap each sample as a chunk of one, sharing the image's memory."""
    for image, label, key in samples:
        yield image.unsqueeze(0), [label], [key]


def eval_batches(index: dict[str, Any], shards_root: str, split: str, *, rank: int, world_size: int,
                 image_size: int, batch_size: int, max_samples: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Yield every sample of ``split`` once across all ranks, in a fixed order.

    ``max_samples`` (0 for all) caps each rank at ``ceil(max_samples / world_size)``.
    """
    split_count(index, split)
    plan = plan_for_rank(index, shards_root, split, rank, world_size)
    cap = -(-max_samples // world_size) if max_samples else 0
    pending: list[Sample] = []
    seen = 0
    for item in iterate_samples(plan, image_size):
        pending.append(item)
        seen += 1
        if len(pending) == batch_size:
            yield _collate(pending)
            pending = []
        if cap and seen >= cap:
            break
    if pending:
        yield _collate(pending)
