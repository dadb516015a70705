"""Train one method data-parallel on Ray; rerunning the same command resumes.

    python -m jobs.train --config jobs/configs/method1.yaml --shards DST --output RUN_DIR \
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from anomaly.config import ConfigError, load_config
from anomaly.logs import setup_logging

log = logging.getLogger("jobs.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config, e.g. jobs/configs/method4.yaml")
    parser.add_argument("--shards", required=True, help="shard folder or s3://bucket/prefix holding index.json")
    parser.add_argument("--output", required=True, help="run folder or s3:// URL; an existing one is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set ray.num_workers=4 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2

    from anomaly.train.launch import run_training

    result = run_training(config, args.shards, args.output)
    epochs = result.epochs
    if not epochs:
        log.warning("no epoch was recorded in %s/metrics.jsonl", args.output)
        return 1
    last = epochs[-1]
    best = next(row for row in epochs if row["epoch"] == last["best_epoch"])
    log.info("done: %d epochs; best epoch %d by %s (val AUROC %s); model at %s/model.pt",
             len(epochs), best["epoch"], best["selection_metric"], best["val_auroc"], args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
