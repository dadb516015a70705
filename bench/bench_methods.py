"""Train and evaluate methods side by side on one shard set, and tabulate the results.

    python -m bench.bench_methods --methods 1,2,3,4,5 --image-size 64 --epochs 8 \
        --output bench/results/methods [--data ../shared/data/car_damage]

Every method gets the same shards (same split and seed), image size, epoch
budget and worker layout. Model selection uses val only; the test split is read
once per method, by the evaluation. Writes results.json, results.md (a Markdown
table), roc_all.png and, for method 5, anomaly_maps.png from its evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from anomaly.config import load_config
from anomaly.evaluate import evaluate_run
from anomaly.logs import setup_logging
from anomaly.plots import roc_figure
from anomaly.train.launch import run_training
from bench.car_shards import DEFAULT_DATA, REPO, build_car_shards



def run_method(method: int, args: argparse.Namespace, shards: Path, out: Path) -> dict:
    run_dir = out / f"method{method}"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    overrides = [
        f"model.image_size={args.image_size}", f"train.epochs={args.epochs}",
        f"ray.num_workers={args.workers}", f"ray.cpus_per_worker={args.cpus_per_worker}",
        f"ray.num_cpus={args.workers * args.cpus_per_worker}", f"train.batch_size_per_worker={args.batch}",
        f"train.seed={args.seed}",
    ] + list(args.set)
    config = load_config(REPO / "jobs" / "configs" / f"method{method}.yaml", overrides)
    started = time.perf_counter()
    result = run_training(config, str(shards), str(run_dir))
    wall = time.perf_counter() - started
    epochs = result.epochs
    metrics = evaluate_run(str(run_dir), str(shards), "test", str(out / f"method{method}_eval"))
    best = next(row for row in epochs if row["epoch"] == epochs[-1]["best_epoch"])
    return {
        "method": method,
        "test_auroc": metrics["auroc"],
        "test_average_precision": metrics["average_precision"],
        "test_f1": metrics["f1"],
        "best_epoch": best["epoch"],
        "best_val_auroc": best["val_auroc"],
        "epochs": len(epochs),
        "wall_seconds": wall,
        "train_images_per_second": float(np.mean([row["images_per_second"] for row in epochs])),
        "d_reinit_total": int(sum(row["d_reinit_count"] for row in epochs)),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| method | test AUROC | test AP | test F1 | best epoch (val AUROC) | epochs | wall time | "
              "train img/s |\n|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['method']} | {r['test_auroc']:.3f} | {r['test_average_precision']:.3f} | {r['test_f1']:.3f} | "
        f"{r['best_epoch']} ({r['best_val_auroc']:.3f}) | {r['epochs']} | {r['wall_seconds'] / 60:.1f} min | "
        f"{r['train_images_per_second']:.0f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="1,2,3,4,5", help="comma-separated method numbers")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with whole/ and damaged/")
    parser.add_argument("--output", type=Path, required=True, help="results folder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="batch size per worker")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    parser.add_argument("--cpus-per-worker", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep existing run folders and resume them")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every method")
    args = parser.parse_args(argv)
    setup_logging()

    args.output.mkdir(parents=True, exist_ok=True)
    shards = args.output / f"shards_{args.image_size}"
    build_car_shards(args.data, shards, args.image_size, shard_samples=200, seed=args.seed)
    rows = [run_method(int(m), args, shards, args.output) for m in args.methods.split(",")]

    curves = {}
    for row in rows:
        scores_csv = (args.output / f"method{row['method']}_eval" / "scores.csv").read_text().splitlines()[1:]
        labels = np.array([line.split(",")[1] == "anomalous" for line in scores_csv], dtype=int)
        scores = np.array([float(line.split(",")[2]) for line in scores_csv])
        curves[f"method {row['method']} (AUROC {row['test_auroc']:.3f})"] = (labels, scores)
    roc_figure(curves, str(args.output / "roc_all.png"), title=f"Test ROC, car photos at {args.image_size} px")
    (args.output / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (args.output / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
