"""Benchmark the hyperparameter search on the car photos at 64 px.

    python -m bench.bench_tune --output bench/results/tune [--data ../shared/data/car_damage] \
        [--set search.num_samples=1 --set train.epochs=2 ...]

Builds 64 px shards from the photos if they are missing and runs jobs/configs/tune.yaml
with the settings below, which took 30 minutes on an idle 2-core machine.
``--set`` changes any key. Prints the best config of each method with its val AUROC,
the best trial's test AUROC and the search overhead, which is the wall time of the
search over the sum of the trials' training time. After the search has finished, the
best trial of each method is evaluated on test (OUTPUT/test_by_method/METHOD/), so the
table can show test AUROC per method. The search itself still reads test only once.
Writes OUTPUT/bench_tune.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from anomaly.evaluate import evaluate_run
from anomaly.logs import setup_logging
from anomaly.tune import run_search
from anomaly.tune_report import best_by_method
from anomaly.tune_space import load_tune_config
from bench.car_shards import DEFAULT_DATA, REPO, build_car_shards

IMAGE_SIZE = 64
# Measured on an idle 2-core machine at 64 px: these 25 trials ran one at a time and
# took 1,800 s. ASHA stopped 19 of them after 2 or 4 epochs.
DEFAULT_SETTINGS = [
    f"model.image_size={IMAGE_SIZE}", "model.base_channels=32", "train.epochs=6",
    "train.batch_size_per_worker=32", "search.num_samples=5", "search.grace_period=2",
    "search.reduction_factor=2", "ray.num_workers=1",
]


def evaluate_best_per_method(outcome, shards: Path, output: Path) -> dict[int, float]:
    """Evaluate each method's best trial on test after the search and return the AUROCs."""
    aurocs = {}
    for method, record in best_by_method(outcome.records).items():
        if record.best_epoch is None:
            continue
        metrics = evaluate_run(record.run_dir, str(shards), "test", str(output / "test_by_method" / str(method)))
        aurocs[method] = metrics["auroc"]
    return aurocs


def summarise(outcome, total_seconds: float) -> dict:
    """Collect the numbers the benchmark reports, as plain data."""
    records = outcome.records
    train_seconds = sum(r.train_seconds for r in records)
    trial_seconds = sum(r.trial_seconds or 0.0 for r in records)
    per_method = {
        method: {"trial_id": r.trial_id, "val_auroc": r.val_auroc, "best_epoch": r.best_epoch,
                 "epochs": r.epochs, "status": r.status, "params": r.params}
        for method, r in best_by_method(records).items()
    }
    return {
        "trials": len(records),
        "statuses": {s: sum(r.status == s for r in records) for s in sorted({r.status for r in records})},
        "best_per_method": per_method,
        "best_trial": None if outcome.best is None else outcome.best.trial_id,
        "best_method": None if outcome.best is None else outcome.best.method,
        "best_val_auroc": None if outcome.best is None else outcome.best.val_auroc,
        "best_test_auroc": None if outcome.test_metrics is None else outcome.test_metrics["auroc"],
        "search_wall_seconds": outcome.wall_seconds,
        "job_wall_seconds": total_seconds,
        "sum_trial_seconds": trial_seconds,
        "sum_train_step_seconds": train_seconds,
        "wall_over_trial_seconds": outcome.wall_seconds / trial_seconds if trial_seconds else None,
        "wall_over_train_step_seconds": outcome.wall_seconds / train_seconds if train_seconds else None,
        "max_concurrent_trials": outcome.max_concurrent_trials,
    }


def print_summary(summary: dict) -> None:
    print(f"\n{summary['trials']} trials: {summary['statuses']}, "
          f"{summary['max_concurrent_trials']} at a time")
    print("\nmethod | trial | val AUROC | test AUROC | best epoch | epochs | status | params")
    for method, row in summary["best_per_method"].items():
        test = row.get("test_auroc")
        test_text = "n/a" if test is None else f"{test:.3f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row["params"].items())
        auroc = "n/a" if row["val_auroc"] is None else f"{row['val_auroc']:.3f}"
        print(f"{method} | {row['trial_id']} | {auroc} | {test_text} | {row['best_epoch']} | {row['epochs']} | "
              f"{row['status']} | {params}")
    if summary["best_trial"] is not None:
        print(f"\nbest trial {summary['best_trial']} (method {summary['best_method']}): "
              f"val AUROC {summary['best_val_auroc']:.3f}, test AUROC {summary['best_test_auroc']:.3f}")
    print(f"search wall time (Tuner.fit) {summary['search_wall_seconds']:.0f} s, whole job "
          f"{summary['job_wall_seconds']:.0f} s")
    if summary["resumed"]:
        print("overhead: not measured, because this run resumed an earlier search in the same --output")
        return
    if summary["wall_over_trial_seconds"] is not None:
        print("overhead: search wall / sum of trial wall times "
              "(Tune's time_total_s, Train start-up included) "
              f"= {summary['search_wall_seconds']:.0f} / {summary['sum_trial_seconds']:.0f} s "
              f"= {summary['wall_over_trial_seconds']:.2f}")
    if summary["wall_over_train_step_seconds"] is not None:
        print(f"overhead: search wall / sum of training-step time (validation and start-up excluded) "
              f"= {summary['search_wall_seconds']:.0f} / {summary['sum_train_step_seconds']:.0f} s "
              f"= {summary['wall_over_train_step_seconds']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="search folder; an existing one is resumed")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with whole/ and damaged/ photos")
    parser.add_argument("--shards", type=Path,
                        help=f"{IMAGE_SIZE} px shard folder (default: OUTPUT/../shards{IMAGE_SIZE})")
    parser.add_argument("--config", type=Path, default=REPO / "jobs" / "configs" / "tune.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key after the benchmark's settings (repeatable)")
    args = parser.parse_args(argv)
    setup_logging()

    output = Path(args.output).resolve()
    shards = (args.shards or output.parent / f"shards{IMAGE_SIZE}").resolve()
    build_car_shards(args.data, shards, IMAGE_SIZE, shard_samples=200)
    spec = load_tune_config(args.config, DEFAULT_SETTINGS + args.overrides)
    resumed = (output / "search").exists()
    started = time.perf_counter()
    outcome = run_search(spec, str(shards), str(output))
    summary = summarise(outcome, time.perf_counter() - started)
    for method, auroc in evaluate_best_per_method(outcome, shards, output).items():
        summary["best_per_method"][method]["test_auroc"] = auroc
    summary["settings"] = DEFAULT_SETTINGS + args.overrides
    summary["resumed"] = resumed
    (output / "bench_tune.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    return 0 if outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
