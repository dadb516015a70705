"""Plan a shard build on the driver, run the shards as Ray tasks, and write index.json.

Steps of :func:`build_shards`:

1. Read the rows from the manifest or the label folders and screen them.
2. Assign splits and cut them into shards (a pure function of rows and seed).
3. Skip shards whose sidecar matches the plan, and build the rest, one Ray task each.
4. Write ``rejects.json``, fail if the reject fraction is over the limit, and
   otherwise write ``index.json`` last, so its presence marks a complete build.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import tqdm

from anomaly.data import storage
from anomaly.data.shards import ShardResult, ShardSettings, build_shard, read_finished, sidecar_name
from anomaly.data.sources import (
    ManifestColumns,
    Reject,
    assign_sample_keys,
    list_label_folders,
    read_manifest,
    screen_rows,
)
from anomaly.data.splits import SPLITS, PlannedSample, ShardPlan, assign_splits, plan_shards

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1


class RejectLimitError(RuntimeError):
    """Error for a build that rejected more inputs than allowed. rejects.json lists them.

    Attributes:
        index: The index that was not written, for the summary.
    """

    def __init__(self, message: str, index: dict[str, Any]) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class BuildOptions:
    """Settings of a shard build, as described by ``python -m jobs.build_shards --help``."""

    source: str
    output: str
    manifest: str = ""
    columns: ManifestColumns = field(default_factory=ManifestColumns)
    normal_label: str = "whole"
    normal_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    anomaly_split: tuple[float, float] = (0.3, 0.7)
    seed: int = 0
    image_size: int = 256
    shard_samples: int = 1000
    min_side: int = 32
    max_reject_fraction: float = 0.01
    workers: int = 0
    ray_address: str = ""
    num_cpus: int = 0


@dataclass
class BuildReport:
    """The written index and how many shards this run built and skipped."""

    index: dict[str, Any]
    built: int
    skipped: int


def plan_build(options: BuildOptions) -> tuple[list[ShardPlan], list[Reject], int, list[str]]:
    """Read and screen the input rows, then plan the shards.

    Returns:
        The shard plans, the rejects found before reading any image, the number of
        input rows, and the sorted labels seen.
    """
    if options.manifest:
        rows, rejects = read_manifest(options.manifest, options.columns)
    else:
        rows, rejects = list_label_folders(options.source), []
    row_count = len(rows) + len(rejects)
    labels = sorted({row.label for row in rows})

    accepted, screened_out = screen_rows(rows)
    rejects += screened_out
    if options.normal_label not in labels:
        logger.warning(
            "no input has the normal label %r (labels found: %s), so the train split will be empty",
            options.normal_label, ", ".join(labels) or "none",
        )

    sample_keys = assign_sample_keys(accepted)
    splits = assign_splits(
        accepted, options.normal_label, options.normal_split, options.anomaly_split, options.seed
    )
    samples = [
        PlannedSample(key, row.key, row.path, row.label, row.label != options.normal_label, row.group)
        for key, row in zip(sample_keys, accepted)
    ]
    plans = plan_shards(samples, splits, options.shard_samples, options.seed)
    return plans, rejects, row_count, labels


def build_shards(options: BuildOptions) -> BuildReport:
    """Build all shards, resuming from finished ones, and write index.json.

    Raises:
        RejectLimitError: If the rejected fraction of rows exceeds
            ``options.max_reject_fraction``. rejects.json is written first.
        anomaly.data.storage.StorageAccessError: On a permanent storage error.
        anomaly.data.sources.ManifestError: If the manifest cannot be read.
    """
    plans, rejects, row_count, labels = plan_build(options)
    settings = ShardSettings(options.source, options.output, options.image_size, options.min_side)
    logger.info(
        "planned %d rows into %d shards (%d rejected before reading images)",
        row_count, len(plans), len(rejects),
    )

    index_url = storage.join(options.output, "index.json")
    results = _find_finished(plans, settings)
    todo = [plan for plan in plans if plan.name not in results]
    if todo:
        # An index left by an earlier build must not describe shards that this build
        # is about to replace, or outlive this build if it fails.
        storage.delete(index_url)
        logger.info("%d of %d shards are finished already, building %d", len(results), len(plans), len(todo))
        results.update(_run_tasks(todo, settings, options))
    else:
        logger.info("all %d shards are up to date, so no shard needs building", len(plans))

    _warn_about_strays(options.output, plans)
    ordered = [results[plan.name] for plan in plans]
    for result in ordered:
        rejects += [Reject(item["key"], item["reason"]) for item in result.rejects]
    rejects.sort(key=lambda reject: (reject.key, reject.reason))
    index = make_index(options, ordered, rejects, row_count, labels)

    rejects_json = json.dumps({"rejects": index["rejects"], "totals": index["totals"]}, indent=1).encode()
    storage.write_bytes(storage.join(options.output, "rejects.json"), rejects_json)
    fraction = len(rejects) / max(row_count, 1)
    if fraction > options.max_reject_fraction:
        storage.delete(index_url)
        raise RejectLimitError(
            f"{len(rejects)} of {row_count} rows were rejected ({fraction:.1%}), over the limit of "
            f"{options.max_reject_fraction:.1%}, so index.json was not written. Read "
            f"{storage.join(options.output, 'rejects.json')} for the reasons, fix the inputs, or raise "
            "--max-reject-fraction",
            index,
        )

    _write_index(options.output, index)
    built = sum(not result.skipped for result in ordered)
    return BuildReport(index=index, built=built, skipped=len(ordered) - built)


def _find_finished(plans: list[ShardPlan], settings: ShardSettings) -> dict[str, ShardResult]:
    """Read the sidecars of all planned shards concurrently and keep those that match."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        found = pool.map(lambda plan: read_finished(plan, settings), plans)
        return {plan.name: result for plan, result in zip(plans, found) if result is not None}


def _warn_about_strays(output: str, plans: list[ShardPlan]) -> None:
    """Warn about files in the split folders that this build did not plan, leaving them in place."""
    planned = {plan.name for plan in plans} | {sidecar_name(plan.name) for plan in plans}
    strays = []
    for split in SPLITS:
        try:
            strays += [f"{split}/{name}" for name in storage.list_files(storage.join(output, split))]
        except storage.ObjectNotFoundError:
            continue
    strays = [name for name in strays if name not in planned]
    if strays:
        logger.warning(
            "%d files in %s are not part of this build, for example %s. An earlier build with "
            "other settings or an interrupted write left them. index.json does not list them, so "
            "they can be deleted",
            len(strays), output, strays[0],
        )


def _run_tasks(
    plans: list[ShardPlan], settings: ShardSettings, options: BuildOptions
) -> dict[str, ShardResult]:
    """Build shards as Ray tasks with a bounded number in flight, showing progress."""
    import ray

    from anomaly.ray_cluster import check_resources, init_ray

    # The build needs neither the State API nor Tune, and on a small machine the
    # dashboard's background work costs several percent of a core.
    init_ray(options.ray_address, options.num_cpus, include_dashboard=False)
    check_resources({"CPU": 1}, "a shard task")
    if options.workers:
        max_in_flight = options.workers
    else:
        # One queued task per CPU beside each running one, so that a worker finishing
        # a shard starts the next without waiting for the driver to submit it.
        max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote_build = ray.remote(num_cpus=1)(build_shard)

    results: dict[str, ShardResult] = {}
    queue = collections.deque(plans)
    in_flight: dict[ray.ObjectRef, ShardPlan] = {}
    images = sum(len(plan.samples) for plan in plans)
    started = time.monotonic()
    with tqdm.tqdm(total=images, unit="img", desc="building shards", smoothing=0.1) as progress:
        try:
            while queue or in_flight:
                while queue and len(in_flight) < max_in_flight:
                    plan = queue.popleft()
                    in_flight[remote_build.remote(plan, settings)] = plan
                done, _ = ray.wait(list(in_flight), num_returns=1)
                plan = in_flight.pop(done[0])
                results[plan.name] = _get_result(done[0], plan)
                progress.update(len(plan.samples))
        finally:
            for ref in in_flight:
                ray.cancel(ref)
    elapsed = time.monotonic() - started
    logger.info(
        "built %d shards (%d images) in %.1f s, %.1f images/s", len(plans), images, elapsed, images / elapsed
    )
    return results


def _get_result(ref: Any, plan: ShardPlan) -> ShardResult:
    """Return a task's result, re-raising a task's own exception without Ray's wrapper."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, storage.StorageError):
            raise cause from None
        raise RuntimeError(f"building shard {plan.name} failed: {exc}") from exc


def make_index(
    options: BuildOptions,
    results: list[ShardResult],
    rejects: list[Reject],
    row_count: int,
    labels: list[str],
) -> dict[str, Any]:
    """Assemble index.json. The training reader depends on exactly this schema."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = [result for result in results if result.name.startswith(f"{split}/")]
        split_labels: collections.Counter[str] = collections.Counter()
        for shard in shards:
            split_labels.update(shard.labels)
        splits[split] = {
            "shards": [
                {"name": s.name, "count": s.count, "labels": s.labels, "sha256": s.sha256, "bytes": s.bytes}
                for s in shards
            ],
            "count": sum(shard.count for shard in shards),
            "labels": dict(sorted(split_labels.items())),
        }
    written = sum(split["count"] for split in splits.values())
    assert written + len(rejects) == row_count, "every row must end in exactly one shard or in rejects"
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "image_size": options.image_size,
        "seed": options.seed,
        "normal_label": options.normal_label,
        "labels": labels,
        "splits": splits,
        "rejects": [{"key": reject.key, "reason": reject.reason} for reject in rejects],
        "totals": {"rows": row_count, "written": written, "rejected": len(rejects)},
        "source": options.source,
    }


def _write_index(output: str, index: dict[str, Any]) -> None:
    url = storage.join(output, "index.json")
    data = json.dumps(index, indent=1).encode()
    try:
        unchanged = storage.read_bytes(url) == data
    except storage.ObjectNotFoundError:
        unchanged = False
    if unchanged:
        logger.info("index.json is up to date: %s", url)
        return
    storage.write_bytes(url, data)
    logger.info("wrote %s", url)


def format_summary(index: dict[str, Any]) -> str:
    """Format a table of images per split and label, followed by the reject reasons."""
    labels = index["labels"]
    width = max([len(label) for label in labels] + [7])
    header = " ".join(f"{label:>{width}}" for label in labels)
    lines = [f"{'split':<6} {header} {'total':>{width}} {'shards':>6}"]
    for split in SPLITS:
        entry = index["splits"][split]
        counts = " ".join(f"{entry['labels'].get(label, 0):>{width}}" for label in labels)
        lines.append(f"{split:<6} {counts} {entry['count']:>{width}} {len(entry['shards']):>6}")
    totals = index["totals"]
    lines.append(f"rows {totals['rows']}, written {totals['written']}, rejected {totals['rejected']}")
    reasons = collections.Counter(reject["reason"].split(":")[0] for reject in index["rejects"])
    for reason, count in reasons.most_common():
        lines.append(f"  rejected {count:>6}: {reason}")
    return "\n".join(lines)
