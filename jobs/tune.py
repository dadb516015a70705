"""Search hyperparameters over the methods with Ray Tune; rerunning the same command resumes.

    python -m jobs.tune --config jobs/configs/tune.yaml --shards DST --output TUNE_DIR \
        [--set key=value ...]

Writes TUNE_DIR/results.csv, best.yaml (train it with python -m jobs.train --config
TUNE_DIR/best.yaml), val_by_trial.png and best_test/ (the best trial on the test split).
"""

from __future__ import annotations

import argparse
import logging
import sys

from anomaly.config import ConfigError
from anomaly.logs import setup_logging
from anomaly.tune_space import load_tune_config

log = logging.getLogger("jobs.tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="tune YAML, e.g. jobs/configs/tune.yaml")
    parser.add_argument("--shards", required=True,
                        help="shard folder or s3://bucket/prefix that contains index.json")
    parser.add_argument("--output", required=True,
                        help="search folder or s3:// URL; an existing one is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set train.epochs=2 or --set search.num_samples=4 "
                             "(repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        spec = load_tune_config(args.config, args.overrides)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2

    from anomaly.data.stream import ShardIndexError
    from anomaly.ray_cluster import ClusterResourceError
    from anomaly.tune import run_search

    try:
        outcome = run_search(spec, args.shards, args.output)
    except (ConfigError, ClusterResourceError, ShardIndexError) as exc:
        log.error("%s", exc)
        return 2

    counts: dict[str, int] = {}
    for record in outcome.records:
        counts[record.status] = counts.get(record.status, 0) + 1
    log.info("search done: %d trials (%s) in %.0f s", len(outcome.records),
             ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), outcome.wall_seconds)
    if outcome.best is None or outcome.test_metrics is None:
        return 1
    log.info("best trial %s: config %s/best.yaml, test report %s/best_test (test AUROC %.4f)",
             outcome.best.trial_id, args.output, args.output, outcome.test_metrics["auroc"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
