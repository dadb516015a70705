"""Benchmark the rate of training batches read from shards, for several data.loader_workers.

    python -m bench.bench_loader --output bench/results/loader/loader.json [--workers 0,1,2] \
        [--image-size 256] [--data ../shared/data/car_damage]

Builds shards of the car photos at --image-size if they are missing, then reads
one pass of the train split with ``train_batches`` (batch 32, one rank) for each
loader worker count and reports images per second. No model runs. With a step
of 0 ms the numbers are the most a training process could be fed. A step of N ms
sleeps after each batch, as the CPU waits for a GPU step, and shows how much of
the decoding the worker processes hide behind that wait. The shuffle buffer is
off by default: the 734 train photos make passes so short that refilling it at
the start of each pass would dominate, which a large split amortises.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from anomaly.data.stream import read_index, train_batches
from bench.car_shards import DEFAULT_DATA, build_car_shards

BATCH = 32


def images_per_second(shards: Path, image_size: int, loader_workers: int, step_ms: float,
                      shuffle_buffer: int) -> tuple[float, int]:
    """Read one pass of the train split and return the images per second and the image count.

    ``step_ms`` sleeps after each batch, standing in for a GPU step that leaves the CPU free.
    """
    index = read_index(str(shards))
    steps = index["splits"]["train"]["count"] // BATCH
    started = time.perf_counter()
    images = 0
    for batch, _, _ in train_batches(index, str(shards), rank=0, world_size=1, image_size=image_size,
                                     batch_size=BATCH, steps=steps, seed=0, epoch=0, shuffle_buffer=shuffle_buffer,
                                     loader_workers=loader_workers):
        images += batch.shape[0]
        if step_ms:
            time.sleep(step_ms / 1000)
    return images / (time.perf_counter() - started), images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with whole/ and damaged/ photos")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated data.loader_workers values")
    parser.add_argument("--step-ms", default="0,30",
                        help="comma-separated milliseconds to sleep per batch, as a GPU step would take")
    parser.add_argument("--shuffle-buffer", type=int, default=0,
                        help="data.shuffle_buffer; each pass first fills it before the first batch (default 0)")
    args = parser.parse_args(argv)

    shards = args.output.parent / f"shards{args.image_size}"
    build_car_shards(args.data, shards, args.image_size, shard_samples=100)
    for tar in shards.rglob("*.tar"):
        tar.read_bytes()  # into the page cache, so the first setting is not timed on a cold disk
    results = []
    for step_ms in [float(ms) for ms in args.step_ms.split(",")]:
        for workers in [int(w) for w in args.workers.split(",")]:
            rate, images = images_per_second(shards, args.image_size, workers, step_ms, args.shuffle_buffer)
            results.append({"loader_workers": workers, "step_ms": step_ms, "images": images,
                            "images_per_second": rate})
            print(f"step {step_ms:g} ms, data.loader_workers={workers}: {images} images at "
                  f"{args.image_size} px, {rate:.0f} images/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "image_size": args.image_size, "batch_size": BATCH, "shuffle_buffer": args.shuffle_buffer,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
