"""Evaluate a trained run on one split and write the report.

The model, its config and its decision threshold all come from ``model.pt`` in
the run folder. The threshold was fitted on val during training, so nothing
here is fitted on the split being evaluated.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anomaly.config import Config
from anomaly.data import storage
from anomaly.data.stream import check_image_size, eval_batches, read_index, split_count
from anomaly.metrics import check_finite, dedupe_by_key, detection_metrics
from anomaly.models import build_models
from anomaly.plots import overlay_grid, overlay_png, reconstruction_grid, roc_figure, score_histogram
from anomaly.scoring import anomaly_maps, anomaly_scores, reconstruct
from anomaly.train.checkpoint import MODEL_FILE, config_of, load_state

log = logging.getLogger(__name__)

EXAMPLES_PER_GROUP = 4  # images shown per (class, best or worst) in reconstructions.png
MAP_EXAMPLES = 8  # method 5: top-scored images shown with anomaly maps


def safe_file_name(key: str) -> str:
    """Turn a sample key such as ``whole/../x.jpg`` into one safe file name."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")
    return name[:150] or "sample"


@dataclass
class LoadedModel:
    config: Config
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    threshold: float
    threshold_method: str
    epoch: int
    shard_image_size: int | None  # image size of the shards it was trained on


def load_model(run_dir: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the selected model of a run from ``model.pt``, networks in eval mode."""
    state = load_state(storage.join(run_dir, MODEL_FILE))
    config = config_of(state)
    generator, discriminator = build_models(config)
    generator.load_state_dict(state["generator"], strict=True)
    discriminator.load_state_dict(state["discriminator"], strict=True)
    generator.to(device).eval()
    discriminator.to(device).eval()
    return LoadedModel(config, generator, discriminator, float(state["threshold"]["value"]),
                       str(state["threshold"]["method"]), int(state["epoch"]),
                       state.get("shard_image_size"))


@dataclass
class _Extremes:
    """Keep the k highest- and k lowest-scored images of one class without holding the split."""

    k: int
    high: list[tuple[float, str, torch.Tensor]] = field(default_factory=list)
    low: list[tuple[float, str, torch.Tensor]] = field(default_factory=list)

    def add(self, score: float, key: str, image: torch.Tensor) -> None:
        item_high = (score, key, image)
        item_low = (-score, key, image)
        (heapq.heappush if len(self.high) < self.k else heapq.heappushpop)(self.high, item_high)
        (heapq.heappush if len(self.low) < self.k else heapq.heappushpop)(self.low, item_low)

    def highest(self) -> list[tuple[float, str, torch.Tensor]]:
        return sorted(self.high, key=lambda item: -item[0])

    def lowest(self) -> list[tuple[float, str, torch.Tensor]]:
        return [(-s, k, i) for s, k, i in sorted(self.low, key=lambda item: -item[0])]


def _write_scores_csv(url: str, keys: list[str], labels: np.ndarray, scores: np.ndarray) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["key", "label", "score"])
    for key, label, score in zip(keys, labels, scores):
        writer.writerow([key, "anomalous" if label else "normal", f"{score:.8g}"])
    storage.write_bytes(url, text.getvalue().encode())


def _example_grid(model: LoadedModel, extremes: dict[int, _Extremes], url: str, device: torch.device) -> None:
    rows: list[tuple[float, str, torch.Tensor, str]] = []
    for label, name in ((0, "normal"), (1, "anomalous")):
        if label not in extremes:
            continue
        lowest = extremes[label].lowest()[:EXAMPLES_PER_GROUP]
        highest = extremes[label].highest()[:EXAMPLES_PER_GROUP]
        rows += [(s, k, i, f"{name}, lowest") for s, k, i in lowest]
        rows += [(s, k, i, f"{name}, highest") for s, k, i in highest]
    if not rows:
        return
    images = torch.stack([r[2] for r in rows]).to(device)
    with torch.no_grad():
        recon = reconstruct(model.config, model.generator, images)
    captions = [f"{tag}\n{key.rsplit('/', 1)[-1][-22:]}\n{score:.3g}" for score, key, _, tag in rows]
    reconstruction_grid(images, recon, url, captions, columns=2 * EXAMPLES_PER_GROUP)


def _map_overlays(model: LoadedModel, extremes: dict[int, _Extremes], output: str, device: torch.device) -> None:
    """Method 5: save heatmap overlays of the top-scored images, one file each plus a grid."""
    top = sorted((item for ext in extremes.values() for item in ext.highest()), key=lambda i: -i[0])[:MAP_EXAMPLES]
    if not top:
        return
    images = torch.stack([image for _, _, image in top]).to(device)
    scores, maps = anomaly_maps(model.config, model.generator, images)
    vmax = float(maps.max().item())
    for (score, key, _), image, heat in zip(top, images, maps):
        storage.write_bytes(storage.join(output, "maps", f"{safe_file_name(key)}.png"),
                            overlay_png(image, heat, vmax))
    overlay_grid(images, maps, [f"{key.rsplit('/', 1)[-1][-22:]}\n{s:.3g}" for (s, key, _) in top],
                 storage.join(output, "anomaly_maps.png"))


def evaluate_run(run_dir: str, shards: str, split: str, output: str, batch_size: int = 64) -> dict[str, Any]:
    """Score ``split`` with the run's selected model and write the report into ``output``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, device)
    index = read_index(shards)
    check_image_size(index, model.config.model.image_size, shards)
    total = split_count(index, split)
    keep = max(MAP_EXAMPLES, EXAMPLES_PER_GROUP) if model.config.model.method == 5 else EXAMPLES_PER_GROUP
    extremes: dict[int, _Extremes] = {}
    rows: list[tuple[str, float, int]] = []

    with tqdm(total=total, desc=f"scoring {split}", unit="img") as progress, torch.no_grad():
        for images, labels, keys in eval_batches(index, shards, split, rank=0, world_size=1,
                                                 image_size=model.config.model.image_size, batch_size=batch_size):
            scores = anomaly_scores(model.config, model.generator, model.discriminator, images.to(device)).cpu()
            for image, label, key, score in zip(images, labels.tolist(), keys, scores.tolist()):
                rows.append((key, score, label))
                extremes.setdefault(label, _Extremes(keep)).add(score, key, image)
            progress.update(len(keys))

    keys, scores, labels = dedupe_by_key([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    if len(keys) < len(rows):
        log.warning("%d duplicate keys in the %s split were scored once", len(rows) - len(keys), split)
    check_finite(scores, keys)
    metrics = detection_metrics(scores, labels, model.threshold)
    metrics.update(split=split, threshold_method=model.threshold_method, model_epoch=model.epoch,
                   method=model.config.model.method, image_size=model.config.model.image_size)

    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    _write_scores_csv(storage.join(output, "scores.csv"), keys, labels, scores)
    roc_figure({f"method {model.config.model.method}": (labels, scores)}, storage.join(output, "roc.png"),
               title=f"ROC on {split}")
    score_histogram(scores, labels, model.threshold, storage.join(output, "score_hist.png"))
    _example_grid(model, extremes, storage.join(output, "reconstructions.png"), device)
    if model.config.model.method == 5:
        _map_overlays(model, extremes, output, device)
    return metrics
