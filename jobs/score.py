"""Score new photos with a trained run and flag the anomalous ones.

    python -m jobs.score --run RUN_DIR --input DIR_OR_S3_PREFIX --output scores.csv [--maps MAPS_DIR]

Every image under the input (sub-folders included) gets a row: key (its path
relative to the input), score, decision at the threshold stored with the model,
and an error reason for inputs that could not be read. --maps writes an anomaly
map overlay per image (method 5 runs).
"""

from __future__ import annotations

import argparse
import logging
import sys

from anomaly.logs import setup_logging

log = logging.getLogger("jobs.score")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder (or s3:// URL) written by jobs.train")
    parser.add_argument("--input", required=True, help="folder or s3://bucket/prefix of photos")
    parser.add_argument("--output", required=True, help="CSV path or s3:// URL to write")
    parser.add_argument("--maps", help="folder or s3:// URL for anomaly-map overlays (method 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from anomaly.batch_score import score_images

    try:
        summary = score_images(args.run, args.input, args.output, args.maps, args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("scored %d images, %d flagged anomalous, %d unreadable (listed in %s)",
             summary.scored, summary.flagged, summary.unreadable, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
