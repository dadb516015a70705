"""Decode training shards in DataLoader worker processes.

JPEG decoding in the training process leaves a GPU idle between steps. With
``data.loader_workers=N``, each pass over a rank's shards is split by shard
among N worker processes. They decode and send back chunks of samples, and the
training process only stacks them into batches. The sample order depends on
the seed and on N, and is the same on every run with both fixed, so a resumed
epoch still reads what the interrupted one read.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from anomaly.data.samples import RankPlan, Sample, SkipCounter, iterate_samples

# Images [N,C,H,W], labels, keys, and the count of samples skipped since the last
# chunk. Images are None in a final chunk that only reports skipped samples.
Chunk = tuple[torch.Tensor | None, list[int], list[str], int]


class ShardPass(IterableDataset):
    """One pass over a rank's shards, where DataLoader worker ``w`` of ``n`` reads shards ``w::n``."""

    def __init__(self, plan: RankPlan, image_size: int, shuffle_seed: int, shuffle_buffer: int,
                 chunk_size: int) -> None:
        super().__init__()
        self.plan, self.image_size = plan, image_size
        self.shuffle_seed, self.shuffle_buffer, self.chunk_size = shuffle_seed, shuffle_buffer, chunk_size

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        urls = list(self.plan.urls)
        random.Random(self.shuffle_seed).shuffle(urls)
        mine = RankPlan(urls[worker::workers], self.plan.stride, self.plan.offset)
        seed = random.Random(f"{self.shuffle_seed}-{worker}").getrandbits(31)
        # The workers share data.shuffle_buffer, so memory and the wait before the first
        # batch stay what they are with one process.
        buffer = self.shuffle_buffer // workers if self.shuffle_buffer > 1 else self.shuffle_buffer
        skipped = SkipCounter()
        reported = 0
        pending: list[Sample] = []
        for item in iterate_samples(mine, self.image_size, seed, buffer, skipped):
            pending.append(item)
            if len(pending) == self.chunk_size:
                yield _chunk(pending, skipped.count - reported)
                reported, pending = skipped.count, []
        if pending or skipped.count > reported:
            yield _chunk(pending, skipped.count - reported)


def _chunk(items: list[Sample], newly_skipped: int) -> Chunk:
    images = torch.stack([item[0] for item in items]) if items else None
    return images, [item[1] for item in items], [item[2] for item in items], newly_skipped


def _as_is(chunk: Any) -> Any:
    # Chunks are stacked in the worker already, so the default collate would only
    # walk them again. This is a module-level function so that it pickles.
    return chunk


def chunks_in_workers(plan: RankPlan, image_size: int, shuffle_seed: int, shuffle_buffer: int,
                      skipped: SkipCounter | None, workers: int, chunk_size: int
                      ) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    """Yield one pass of the plan's samples as ``(images, labels, keys)`` chunks of up to ``chunk_size``.

    Up to ``workers`` processes decode. A rank with fewer shards than ``workers``
    starts one process per shard, since a shard is never split between processes.
    """
    dataset = ShardPass(plan, image_size, shuffle_seed, shuffle_buffer, chunk_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=max(1, min(workers, len(plan.urls))),
                        collate_fn=_as_is)
    for images, labels, keys, newly_skipped in loader:
        if skipped is not None:
            skipped.add(newly_skipped)
        if images is not None:
            yield images, labels, keys


__all__ = ["ShardPass", "chunks_in_workers"]
