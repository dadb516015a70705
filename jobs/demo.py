"""Offline demo: the whole chain on Fashion-MNIST, on this machine's CPUs.

One clothing class is "normal", every other class is an anomaly. The demo
writes the images as label folders. Then it runs the same three commands a
user runs on car photos: build shards, train method 1 at 32 px on 2 Ray
workers, and evaluate on test. At the end it prints where the report is.

    python -m jobs.demo [--output demo] [--normal-class 7] [--epochs 4]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly.logs import setup_logging

log = logging.getLogger("jobs.demo")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CLASS_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file and its label file (the MNIST formats, gzip-compressed)."""
    with gzip.open(images_path, "rb") as handle:
        data = handle.read()
    count, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    with gzip.open(labels_path, "rb") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    if labels.shape[0] != count:
        raise ValueError(f"{labels_path} has {labels.shape[0]} labels for {count} images in {images_path}")
    return images, labels


def write_label_folders(raw: Path, normal_class: int, normal_count: int, anomaly_count: int, seed: int) -> None:
    """Write a sample of Fashion-MNIST as PNGs in ``raw/<normal>/`` and ``raw/other/``."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_DIR}; install it with `apt-get install dataset-fashion-mnist` "
            "(make demo does this when it can)"
        )
    images, labels = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz", FASHION_DIR / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(labels == normal_class))[:normal_count]
    other = rng.permutation(np.flatnonzero(labels != normal_class))[:anomaly_count]
    for folder, chosen in ((CLASS_NAMES[normal_class], normal), ("other", other)):
        target = raw / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            Image.fromarray(images[i]).save(target / f"{CLASS_NAMES[labels[i]]}_{i:05d}.png")


def run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo", help="demo folder (default: demo)")
    parser.add_argument("--normal-class", type=int, default=7, choices=range(10),
                        help="Fashion-MNIST class treated as normal (default: 7, sneaker)")
    parser.add_argument("--normal-count", type=int, default=3000, help="normal images to use (default: 3000)")
    parser.add_argument("--anomaly-count", type=int, default=600, help="anomalous images (default: 600)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    args = parser.parse_args(argv)
    setup_logging()

    started = time.time()
    out = Path(args.output)
    raw, shards, run_dir, report = out / "raw", out / "shards", out / "run", out / "report"
    normal_name = CLASS_NAMES[args.normal_class]
    if not (raw / normal_name).exists():
        log.info("writing %d %s and %d other Fashion-MNIST images to %s", args.normal_count, normal_name,
                 args.anomaly_count, raw)
        write_label_folders(raw, args.normal_class, args.normal_count, args.anomaly_count, seed=0)

    python = sys.executable
    run([python, "-m", "jobs.build_shards", "--source", str(raw), "--output", str(shards),
         "--normal-label", normal_name, "--image-size", "32", "--shard-samples", "500", "--min-side", "16"])
    run([python, "-m", "jobs.train", "--config", "jobs/configs/method1.yaml", "--shards", str(shards),
         "--output", str(run_dir), "--set", "model.image_size=32", "--set", f"train.epochs={args.epochs}",
         "--set", f"ray.num_workers={args.workers}", "--set", "ray.num_cpus=2",
         "--set", "train.batch_size_per_worker=64"])
    run([python, "-m", "jobs.evaluate", "--run", str(run_dir), "--shards", str(shards), "--split", "test",
         "--output", str(report)])

    print(f"\nDemo finished in {time.time() - started:.0f} s. Normal class: {normal_name}; anomalies: "
          f"the other nine classes.\n  training metrics: {run_dir}/metrics.jsonl and {run_dir}/grids/\n"
          f"  test report:      {report}/metrics.json, roc.png, score_hist.png, reconstructions.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
