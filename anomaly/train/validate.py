"""Score a split on every rank and gather the results, de-duplicated by key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from anomaly.config import Config
from anomaly.data.stream import eval_batches
from anomaly.metrics import check_finite, dedupe_by_key
from anomaly.scoring import anomaly_scores, reconstruction_error


@dataclass
class SplitScores:
    keys: list[str]
    scores: np.ndarray  # anomaly score per key, higher means more anomalous
    labels: np.ndarray  # 1 for anomalous
    recon_errors: np.ndarray  # mean squared reconstruction error per key


def _gather(local: list[Any]) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


@torch.no_grad()
def score_split(config: Config, generator: nn.Module, discriminator: nn.Module, index: dict[str, Any],
                shards_root: str, split: str, rank: int, world_size: int, device: torch.device,
                max_samples: int = 0) -> SplitScores:
    """Score ``split`` with the networks in eval mode; every rank returns the same gathered result."""
    was_training = generator.training, discriminator.training
    generator.eval()
    discriminator.eval()
    rows: list[tuple[str, float, int, float]] = []
    try:
        for images, labels, keys in eval_batches(
            index, shards_root, split, rank=rank, world_size=world_size,
            image_size=config.model.image_size, batch_size=config.train.eval_batch_size,
            max_samples=max_samples,
        ):
            images = images.to(device)
            scores = anomaly_scores(config, generator, discriminator, images).float().cpu().numpy()
            errors = reconstruction_error(config, generator, images).float().cpu().numpy()
            rows.extend(zip(keys, scores.tolist(), labels.tolist(), errors.tolist()))
    finally:
        generator.train(was_training[0])
        discriminator.train(was_training[1])

    rows = _gather(rows)
    recon_by_key = {key: error for key, _, _, error in rows}
    keys, scores, labels = dedupe_by_key([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    check_finite(scores, keys)
    recon = np.array([recon_by_key[k] for k in keys], dtype=np.float64)
    return SplitScores(keys, scores, labels, recon)
