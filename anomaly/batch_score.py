"""Score new photos with a trained run: a folder or S3 prefix in, a CSV out.

Each photo goes through the same pipeline as a training sample: the shard
preprocessing at the shards' image size, a JPEG round trip as in the shards,
then the resize to the model's size. Unreadable inputs are listed with their
reason in the CSV instead of stopping the job.
"""

from __future__ import annotations

import csv
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image
from tqdm import tqdm

from anomaly.data import storage
from anomaly.data.preprocess import ImageDecodeError, encode_jpeg, image_to_tensor, preprocess
from anomaly.evaluate import LoadedModel, load_model, safe_file_name
from anomaly.metrics import check_finite
from anomaly.plots import overlay_png
from anomaly.scoring import anomaly_maps, anomaly_scores

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ScoreSummary:
    scored: int
    flagged: int
    unreadable: int


def _load_input(url: str, key: str, shard_size: int, model_size: int) -> torch.Tensor:
    image = preprocess(storage.read_bytes(url), key, shard_size)
    # Round-trip through the shards' JPEG encoding so scores match evaluation.
    image = Image.open(io.BytesIO(encode_jpeg(image)))
    image.load()
    if model_size != shard_size:
        image = image.resize((model_size, model_size), Image.Resampling.BICUBIC)
    return image_to_tensor(image.convert("RGB"))


def _batches(source: str, keys: list[str], shard_size: int, model_size: int, batch_size: int
             ) -> Iterator[tuple[list[str], list[torch.Tensor], list[tuple[str, str]]]]:
    """Read inputs on a thread pool (S3 reads wait on the network) and yield ready batches."""
    def load(key: str) -> tuple[str, torch.Tensor | None, str | None]:
        try:
            return key, _load_input(storage.join(source, key), key, shard_size, model_size), None
        except ImageDecodeError as exc:
            return key, None, exc.reason
        except storage.ObjectNotFoundError:
            return key, None, "not found"

    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(keys), batch_size):
            good_keys, tensors, failed = [], [], []
            for key, tensor, reason in pool.map(load, keys[start:start + batch_size]):
                if tensor is None:
                    failed.append((key, reason or "unreadable"))
                else:
                    good_keys.append(key)
                    tensors.append(tensor)
            yield good_keys, tensors, failed


def list_images(source: str) -> list[str]:
    """Image keys under ``source``, sub-folders included, relative to it and sorted."""
    keys = sorted(key for key in storage.list_files(source) if key.lower().endswith(IMAGE_SUFFIXES))
    if not keys:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {source}")
    return keys


def score_images(run_dir: str, source: str, output_csv: str, maps_dir: str | None = None,
                 batch_size: int = 32, shard_image_size: int | None = None) -> ScoreSummary:
    """Score every image under ``source`` and write ``key,score,decision,error`` rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: LoadedModel = load_model(run_dir, device)
    if maps_dir and model.config.model.method != 5:
        raise ValueError(
            f"--maps needs a method 5 run (image completion); {run_dir} was trained with method "
            f"{model.config.model.method}"
        )
    size = model.config.model.image_size
    shard_size = shard_image_size or model.shard_image_size or size
    keys = list_images(source)
    log.info("scoring %d images under %s with %s (method %d, threshold %.6g from %s)", len(keys), source,
             run_dir, model.config.model.method, model.threshold, model.threshold_method)

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["key", "score", "decision", "error"])
    summary = ScoreSummary(0, 0, 0)
    with tqdm(total=len(keys), desc="scoring", unit="img") as progress, torch.no_grad():
        for good_keys, tensors, failed in _batches(source, keys, shard_size, size, batch_size):
            for key, reason in failed:
                writer.writerow([key, "", "", reason])
                log.warning("skipped %s: %s", key, reason)
            summary.unreadable += len(failed)
            if tensors:
                images = torch.stack(tensors).to(device)
                if maps_dir:
                    scores, maps = anomaly_maps(model.config, model.generator, images)
                    for key, image, heat in zip(good_keys, images, maps):
                        storage.write_bytes(storage.join(maps_dir, f"{safe_file_name(key)}.png"),
                                            overlay_png(image, heat, vmax=float(heat.max().item())))
                else:
                    scores = anomaly_scores(model.config, model.generator, model.discriminator, images)
                check_finite(scores.cpu().numpy(), good_keys)
                for key, score in zip(good_keys, scores.tolist()):
                    flagged = score >= model.threshold
                    writer.writerow([key, f"{score:.8g}", "anomalous" if flagged else "normal", ""])
                    summary.flagged += int(flagged)
                summary.scored += len(good_keys)
            progress.update(len(good_keys) + len(failed))
    storage.write_bytes(output_csv, text.getvalue().encode())
    return summary
