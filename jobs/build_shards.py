"""Build webdataset shards of preprocessed images, locally or on a Ray cluster.

Examples:
    python -m jobs.build_shards --source data/car_damage --output shards/ --normal-label whole

    python -m jobs.build_shards --source s3://photos/cars --output s3://photos/shards \\
        --manifest s3://photos/inventory.csv --path-column Key --label-column Dataset \\
        --normal-label Undamaged --set ray.address=auto

Output: ``OUTPUT/{train,val,test}/shard-NNNNNN.tar`` with a sidecar JSON each,
``OUTPUT/rejects.json``, and ``OUTPUT/index.json`` written last. A rerun skips the
shards that are finished. Exit status 0 on success, 1 when too many inputs were
rejected, 2 on invalid options, a missing manifest or a storage error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from anomaly.config import ConfigError, load_config
from anomaly.data.build import BuildOptions, RejectLimitError, build_shards, format_summary
from anomaly.data.sources import ManifestColumns, ManifestError
from anomaly.data.splits import ANOMALY_SPLITS, SPLITS, parse_fractions
from anomaly.data.storage import StorageError
from anomaly.ray_cluster import ClusterResourceError

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--source", required=True, help="folder or s3://bucket/prefix that image paths are relative to")
    add("--output", required=True, help="folder or s3://bucket/prefix that receives the shards")
    add("--manifest", default="",
        help="CSV listing the images (local or s3://). Without it, each sub-folder of --source is a label")
    add("--path-column", default="key", help="manifest column with the image path (default: key)")
    add("--label-column", default="label", help="manifest column with the label (default: label)")
    add("--group-column", default="",
        help="manifest column with a group id. Images of one group never go to different splits")
    add("--path-template", default="",
        help="build the path from manifest columns, for example '{label}/{key}.jpg' "
             "(default: the path column as it is)")
    add("--normal-label", default="whole", help="label of normal images. All other labels are anomalous")
    add("--normal-split", default="0.8,0.1,0.1", help="train,val,test fractions of normal images")
    add("--anomaly-split", default="0.3,0.7", help="val,test fractions of anomalous images")
    add("--seed", type=int, default=None,
        help="seed of the split and shard assignment (default: train.seed of the config)")
    add("--image-size", type=int, default=None,
        help="side of the square output images in pixels (default: model.image_size of the config)")
    add("--shard-samples", type=int, default=1000, help="images per shard (default: 1000)")
    add("--min-side", type=int, default=32,
        help="reject images whose shorter side is below this many pixels (default: 32)")
    add("--max-reject-fraction", type=float, default=None,
        help="fail when a larger fraction of rows is rejected "
             "(default: data.max_reject_fraction of the config)")
    add("--workers", type=int, default=0,
        help="maximum shard tasks at once, or 0 for one per CPU of the Ray cluster (default: 0)")
    add("--config", default=None, help="YAML config file")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override such as ray.address=auto or ray.num_cpus=4 (repeatable)")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """Combine the command-line options with the config's defaults.

    Raises:
        ConfigError: If the config or an option value is invalid.
    """
    config = load_config(args.config, args.overrides)
    try:
        normal_split = parse_fractions(args.normal_split, SPLITS, "--normal-split")
        anomaly_split = parse_fractions(args.anomaly_split, ANOMALY_SPLITS, "--anomaly-split")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = BuildOptions(
        source=args.source,
        output=args.output,
        manifest=args.manifest,
        columns=ManifestColumns(args.path_column, args.label_column, args.group_column, args.path_template),
        normal_label=args.normal_label,
        normal_split=normal_split,  # type: ignore[arg-type]
        anomaly_split=anomaly_split,  # type: ignore[arg-type]
        seed=config.train.seed if args.seed is None else args.seed,
        image_size=config.model.image_size if args.image_size is None else args.image_size,
        shard_samples=args.shard_samples,
        min_side=args.min_side,
        max_reject_fraction=(
            config.data.max_reject_fraction if args.max_reject_fraction is None else args.max_reject_fraction
        ),
        workers=args.workers,
        ray_address=config.ray.address,
        num_cpus=config.ray.num_cpus,
    )
    minimums = (
        ("--image-size", options.image_size, 1),
        ("--shard-samples", options.shard_samples, 1),
        ("--min-side", options.min_side, 1),
        ("--workers", options.workers, 0),
    )
    for name, value, low in minimums:
        if value < low:
            raise ConfigError(f"invalid {name} {value}: expected {low} or more")
    if not 0.0 <= options.max_reject_fraction <= 1.0:
        raise ConfigError(f"invalid --max-reject-fraction {options.max_reject_fraction}: expected 0 to 1")
    return options


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = options_from_args(args)
        report = build_shards(options)
    except RejectLimitError as exc:
        print(format_summary(exc.index))
        logger.error("%s", exc)
        return 1
    except (ConfigError, ManifestError, StorageError, ClusterResourceError) as exc:
        logger.error("%s", exc)
        return 2

    print(format_summary(report.index))
    if report.built == 0:
        print(f"nothing to do: all {report.skipped} shards were already built")
    else:
        print(f"built {report.built} shards, skipped {report.skipped} finished ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
