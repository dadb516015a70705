"""Read decoded samples from a list of webdataset shards, local or on S3.

Only this module opens shards and decodes their JPEGs. The epoch planning in
``stream`` and the worker processes in ``loader`` both read through
``iterate_samples``.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import webdataset as wds
from PIL import Image

from anomaly.data import storage
from anomaly.data.preprocess import image_to_tensor

log = logging.getLogger(__name__)

# A decoded sample: the image [C,H,W] in [-1, 1], 1 if anomalous else 0, and its key.
Sample = tuple[torch.Tensor, int, str]


@dataclass(frozen=True)
class RankPlan:
    """The shards one rank reads, and the sample stride it keeps from each of them."""

    urls: list[str]
    # With fewer shards than ranks every rank reads all shards and keeps the
    # samples whose position inside their shard is offset modulo stride. Counting
    # inside each shard, not along the whole stream, keeps ranks disjoint however
    # each rank orders or splits its shards.
    stride: int
    offset: int


def _decode(sample: dict[str, Any], image_size: int) -> Sample:
    meta = json.loads(sample["json"])
    image = Image.open(io.BytesIO(sample["jpg"]))
    image.load()
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        # Shards hold square images, so a plain resize keeps the crop policy.
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image_to_tensor(image), int(meta["anomalous"]), str(meta["key"])


class SkipCounter:
    """A webdataset handler that logs and counts unreadable samples instead of stopping."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exc: Exception) -> bool:
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("skipped an unreadable shard sample (%d so far): %s", self.count, exc)
        return True

    def add(self, count: int) -> None:
        """Add samples skipped elsewhere, in a loader worker that has already logged them."""
        self.count += count


def iterate_samples(plan: RankPlan, image_size: int, shuffle_seed: int | None = None,
                    shuffle_buffer: int = 0, skipped: SkipCounter | None = None) -> Iterator[Sample]:
    """Yield the plan's samples once, shards in a seeded order, shuffled through a buffer."""
    storage.register_webdataset_s3()
    urls = list(plan.urls)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(urls)
    handler = skipped or SkipCounter()
    dataset = wds.WebDataset(
        urls,
        shardshuffle=False,  # the order was already shuffled above, from a seed every rank agrees on
        nodesplitter=None,   # ranks were split by plan_for_rank
        workersplitter=None,  # loader workers are split by loader.ShardPass
        empty_check=False,
        handler=handler,
    )
    buffer: list[Sample] = []
    rng = random.Random(shuffle_seed)
    positions: dict[str, int] = {}
    for sample in dataset:
        url = str(sample.get("__url__"))
        position = positions.get(url, 0)
        positions[url] = position + 1
        if position % plan.stride != plan.offset:
            continue
        try:
            item = _decode(sample, image_size)
        except Exception as exc:  # a damaged member must not stop a long job
            handler(RuntimeError(f"sample {sample.get('__key__')} in {url}: {exc}"))
            continue
        if shuffle_buffer <= 1 or shuffle_seed is None:
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


__all__ = ["RankPlan", "Sample", "SkipCounter", "iterate_samples"]
