"""Evaluate a trained run on a split (test by default) and write the report.

    python -m jobs.evaluate --run RUN_DIR --shards DST [--split test] --output EVAL_DIR

Writes metrics.json, scores.csv, roc.png, score_hist.png and reconstructions.png
(plus anomaly_maps.png and maps/ for method 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from anomaly.logs import setup_logging

log = logging.getLogger("jobs.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder (or s3:// URL) written by jobs.train")
    parser.add_argument("--shards", required=True, help="shard folder or s3:// URL holding index.json")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="split to evaluate (default: test)")
    parser.add_argument("--output", required=True, help="report folder or s3:// URL")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from anomaly.evaluate import evaluate_run

    metrics = evaluate_run(args.run, args.shards, args.split, args.output, args.batch_size)
    print(json.dumps(metrics, indent=2))
    log.info("report written to %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
