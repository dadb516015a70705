"""The per-worker training loop that Ray Train runs on every rank.

Each epoch: train for a fixed number of steps (equal on every rank), score the
val split, pick the best epoch on val, then every rank calls
``ray.train.report`` exactly once, rank 0 attaching the checkpoint. Rank 0 also
keeps the run folder current: ``metrics.jsonl``, a reconstruction grid per
epoch and ``model.pt`` (the selected model with its val-fitted threshold).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from anomaly.config import Config, from_dict, to_dict
from anomaly.data import storage
from anomaly.data.samples import SkipCounter
from anomaly.data.stream import eval_batches, read_index, steps_per_epoch, train_batches
from anomaly.losses import instance_noise_std
from anomaly.metrics import detection_metrics, fit_threshold
from anomaly.models import build_models
from anomaly.plots import reconstruction_grid
from anomaly.scoring import reconstruct
from anomaly.train.checkpoint import MODEL_FILE, TRAINING_STATE, load_state, save_atomic, save_to_url, training_state
from anomaly.train.step import Networks, build_optimizers, train_step
from anomaly.train.validate import SplitScores, score_split

log = logging.getLogger(__name__)


def selection_value(config: Config, val: SplitScores) -> tuple[str, float, bool]:
    """Return (metric name, value, higher_is_better) used to pick the best epoch."""
    both_classes = val.labels.min() != val.labels.max()
    requested = config.train.selection_metric
    if requested == "val_auroc" or (requested == "auto" and both_classes):
        if not both_classes:
            raise ValueError("train.selection_metric=val_auroc needs anomalous images in the val split")
        return "val_auroc", float(detection_metrics(val.scores, val.labels, None)["auroc"]), True
    normal = val.recon_errors[val.labels == 0]
    return "val_recon_loss", float(normal.mean()), False


def _objective(name: str, value: float, higher: bool) -> float:
    """Turn a selection metric into a number where higher is better, for Tune and comparisons."""
    return value if higher else -value


def _restore(nets: Networks) -> dict[str, Any]:
    """Load the latest Ray Train checkpoint into the bare networks and optimizers, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": -1, "history": [], "best": None}
    with checkpoint.as_directory() as folder:
        state = load_state(str(Path(folder) / TRAINING_STATE))
    Networks.unwrap(nets.generator).load_state_dict(state["generator"])
    Networks.unwrap(nets.discriminator).load_state_dict(state["discriminator"])
    nets.opt_g.load_state_dict(state["opt_g"])
    nets.opt_d.load_state_dict(state["opt_d"])
    return {"epoch": state["epoch"], "history": state["history"], "best": state["best"]}


def _write_history(run_dir: str, history: list[dict[str, Any]]) -> None:
    # Rewritten whole each epoch: after a restart the file matches the
    # checkpoint's history, so no epoch is ever listed twice.
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), lines.encode())


def _grid(config: Config, nets: Networks, index: dict[str, Any], shards_root: str, run_dir: str,
          epoch: int, device: torch.device) -> None:
    count = config.train.grid_images
    if count == 0:
        return
    generator = Networks.unwrap(nets.generator)
    generator.eval()
    try:
        batch = next(iter(eval_batches(index, shards_root, "val", rank=0, world_size=1,
                                       image_size=config.model.image_size, batch_size=count)), None)
        if batch is None:
            return
        images = batch[0].to(device)
        with torch.no_grad():
            recon = reconstruct(config, generator, images)
        reconstruction_grid(images, recon, storage.join(run_dir, "grids", f"epoch_{epoch:03d}.png"),
                            captions=batch[2])
    finally:
        generator.train()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point run by Ray Train on every worker; ``loop_config`` is plain data."""
    config = from_dict(loop_config["config"])
    shards_root: str = loop_config["shards"]
    run_dir: str = loop_config["run_dir"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Same seed on every rank, so both networks start identical before DDP
    # broadcasts them anyway; data order and noise get rank-specific seeds below.
    torch.manual_seed(config.train.seed)
    generator, discriminator = build_models(config)
    generator = ray.train.torch.prepare_model(generator)
    discriminator = ray.train.torch.prepare_model(discriminator)
    opt_g, opt_d = build_optimizers(config, generator, discriminator)
    nets = Networks(generator, discriminator, opt_g, opt_d)
    resumed = _restore(nets)
    history: list[dict[str, Any]] = resumed["history"]
    best: dict[str, Any] | None = resumed["best"]
    start_epoch = resumed["epoch"] + 1
    if start_epoch > 0 and start_epoch < config.train.epochs:
        history.append({"event": "resumed", "from_epoch": start_epoch, "time": time.time()})
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d", start_epoch - 1)

    index = read_index(shards_root)
    steps = steps_per_epoch(index, "train", config.global_batch_size)
    skipped = SkipCounter()

    for epoch in range(start_epoch, config.train.epochs):
        noise_std = instance_noise_std(config.loss, epoch, config.train.epochs)
        rng = torch.Generator(device=device).manual_seed(config.train.seed * 100_003 + epoch * 1_009 + rank)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        for step, (images, _, _) in enumerate(train_batches(
            index, shards_root, rank=rank, world_size=world_size, image_size=config.model.image_size,
            batch_size=config.train.batch_size_per_worker, steps=steps, seed=config.train.seed,
            epoch=epoch, shuffle_buffer=config.data.shuffle_buffer, skipped=skipped,
            loader_workers=config.data.loader_workers,
        )):
            step_seed = random.Random(f"{config.train.seed}-{epoch}-{step}").getrandbits(31)
            values = train_step(config, nets, images.to(device), noise_std, rng, step_seed)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
        train_seconds = time.perf_counter() - started
        means = _all_reduce_means(sums, steps, device)

        val = score_split(config, Networks.unwrap(generator), Networks.unwrap(discriminator), index,
                          shards_root, "val", rank, world_size, device, config.train.max_val_samples)
        name, value, higher = selection_value(config, val)
        val_metrics = detection_metrics(val.scores, val.labels, None)
        record = {
            "epoch": epoch,
            **{k: v for k, v in means.items() if k != "d_reinit"},
            # Every rank takes the same re-initialisation decision, so the local count is the global one.
            "d_reinit_count": int(round(sums.get("d_reinit", 0.0))),
            "instance_noise_std": noise_std,
            "images_per_second": steps * config.global_batch_size / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            "val_auroc": val_metrics["auroc"],
            "val_average_precision": val_metrics["average_precision"],
            "val_recon_loss": float(val.recon_errors[val.labels == 0].mean()) if (val.labels == 0).any() else None,
            "val_n_normal": val_metrics["n_normal"],
            "val_n_anomalous": val_metrics["n_anomalous"],
            "selection_metric": name,
            "objective": _objective(name, value, higher),
            "skipped_samples": skipped.count,
        }
        improved = best is None or record["objective"] > best["objective"]
        if improved:
            threshold = fit_threshold(val.scores, val.labels, config.score.threshold_percentile)
            best = {"epoch": epoch, "objective": record["objective"], "metric": name, "value": value,
                    "threshold": threshold.to_dict()}
        record["best_epoch"] = best["epoch"]
        record["best_objective"] = best["objective"]
        history.append(record)

        _finish_epoch(config, nets, index, shards_root, run_dir, epoch, device, rank, record, history,
                      best, improved)


def _all_reduce_means(sums: dict[str, float], steps: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    names = sorted(sums)
    values = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        world = dist.get_world_size()
    return {n: float(v) / (steps * world) for n, v in zip(names, values.tolist())}


def _finish_epoch(config: Config, nets: Networks, index: dict[str, Any], shards_root: str, run_dir: str,
                  epoch: int, device: torch.device, rank: int, record: dict[str, Any],
                  history: list[dict[str, Any]], best: dict[str, Any], improved: bool) -> None:
    """Write the run folder (rank 0) and report the epoch (every rank, exactly once)."""
    generator = Networks.unwrap(nets.generator)
    discriminator = Networks.unwrap(nets.discriminator)
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if rank != 0:
        ray.train.report(metrics)
        return

    if improved:
        model_state = {
            "format_version": 1,
            "epoch": epoch,
            "config": to_dict(config),
            "generator": generator.state_dict(),
            "discriminator": discriminator.state_dict(),
            "threshold": best["threshold"],
            "selection": {"metric": best["metric"], "value": best["value"]},
            "shard_image_size": int(index["image_size"]),
        }
        save_to_url(model_state, storage.join(run_dir, MODEL_FILE))
    _write_history(run_dir, history)
    _grid(config, nets, index, shards_root, run_dir, epoch, device)
    log.info("epoch %d/%d: %s", epoch + 1, config.train.epochs,
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch",)))

    state = training_state(config, generator, discriminator, nets.opt_g, nets.opt_d, epoch,
                           {"history": history, "best": best})
    with tempfile.TemporaryDirectory() as folder:
        save_atomic(state, Path(folder) / TRAINING_STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
