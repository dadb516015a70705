"""Benchmark the shard builder against a bare preprocessing loop.

Measures, on the car photos:

1. bare loop: read, decode, resize, crop and encode every image in one process;
2. Ray build from a local folder on N CPUs, twice: the first run includes starting
   the Ray worker processes, the second reuses them;
3. Ray build from and to a moto S3 server on 127.0.0.1 (skipped with --skip-s3).

Two rates are reported. The wall-clock rate per core divides images per second by
the CPUs in use (1 for the bare loop). It is only meaningful on an otherwise idle
machine. The CPU rate divides images by the CPU seconds that the run consumed: the
bare loop's own, or those of the driver and every process of the local Ray
cluster (workers, raylet, GCS, dashboard). It does not count the moto server. The
CPU rate stays comparable when other jobs share the machine. Ray start-up and the S3
upload are not timed. Linux only (CPU times come from /proc). Run from the
repository root:

    python -m bench.bench_shards --cpus 2 --output bench/results/shards.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from anomaly.data.build import BuildOptions, build_shards
from anomaly.data.preprocess import encode_jpeg, preprocess
from anomaly.ray_cluster import init_ray

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "car_damage"


def process_cpu_seconds(exclude: set[int]) -> dict[int, float]:
    """Return the CPU seconds (user + system) of this process and all its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in brackets may contain spaces, so split after it.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process exited while the table was read
        parents[int(entry.name)] = int(fields[1])
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks

    tree = {os.getpid()}
    grew = True
    while grew:
        found = {
            pid for pid, parent in parents.items() if parent in tree and pid not in tree | exclude
        }
        tree |= found
        grew = bool(found)
    return {pid: seconds[pid] for pid in tree}


def cpu_used_since(before: dict[int, float], exclude: set[int]) -> float:
    after = process_cpu_seconds(exclude)
    return sum(total - before.get(pid, 0.0) for pid, total in after.items())


def bare_loop(paths: list[Path], size: int) -> tuple[float, float]:
    """Preprocess and encode every image in this process and return the wall and CPU seconds."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    for path in paths:
        encode_jpeg(preprocess(path.read_bytes(), str(path), size))
    return time.perf_counter() - started, time.process_time() - cpu_started


def timed_build(options: BuildOptions, exclude: set[int]) -> tuple[float, float]:
    """Run one build and return its wall seconds and the CPU seconds of the driver and cluster."""
    cpu_before = process_cpu_seconds(exclude)
    started = time.perf_counter()
    report = build_shards(options)
    elapsed = time.perf_counter() - started
    if report.built == 0:
        raise RuntimeError(
            f"{options.output} already held a finished build. The benchmark needs an empty output"
        )
    return elapsed, cpu_used_since(cpu_before, exclude)


def start_s3(data: Path, scratch: Path) -> tuple[Any, str]:
    """Start moto, point boto3 at it, upload the photos, and return the server and source URL."""
    import boto3

    from tests.s3server import MotoServer

    server = MotoServer(log_path=scratch / "moto.log")
    server.start()
    os.environ.update({
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for label in ("whole", "damaged"):
        for path in sorted((data / label).glob("*.jpg")):
            client.upload_file(str(path), "bench", f"photos/{label}/{path.name}")
    return server, "s3://bench/photos"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with whole/ and damaged/")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default: 2)")
    parser.add_argument("--image-size", type=int, default=256, help="output side in pixels (default: 256)")
    parser.add_argument("--shard-samples", type=int, default=100, help="images per shard (default: 100)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--skip-s3", action="store_true", help="skip the S3 build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    paths = sorted((args.data / "whole").glob("*.jpg")) + sorted((args.data / "damaged").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no images found in {args.data}/whole or {args.data}/damaged. Pass --data")
    images = len(paths)

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        server = None
        s3_source = ""
        if not args.skip_s3:
            # Before Ray starts, so that its workers inherit AWS_ENDPOINT_URL.
            server, s3_source = start_s3(args.data, scratch)
        exclude = {server.pid} if server is not None else set()
        try:
            bare_wall, bare_cpu = bare_loop(paths, args.image_size)
            init_ray(num_cpus=args.cpus, include_dashboard=False)
            runs = [("bare loop, 1 process", bare_wall, bare_cpu, 1)]

            def run_build(name: str, source: str, output: str) -> None:
                options = BuildOptions(source=source, output=output, image_size=args.image_size,
                                       shard_samples=args.shard_samples)
                runs.append((name, *timed_build(options, exclude), args.cpus))

            run_build("Ray build, local, cold workers", str(args.data), str(scratch / "a"))
            run_build("Ray build, local, warm workers", str(args.data), str(scratch / "b"))
            if server is not None:
                run_build("Ray build, S3 to S3 (moto)", s3_source, "s3://bench/shards")
        finally:
            if server is not None:
                server.stop()

    bare_per_core = images / bare_wall
    bare_per_cpu_second = images / bare_cpu
    rows = []
    print(f"{'run':<31} {'cpus':>4} {'wall s':>7} {'img/s':>7} {'img/s/core':>10} {'vs bare':>7} "
          f"{'CPU s':>7} {'img/CPU-s':>9} {'vs bare':>7}")
    for name, wall, cpu, cpus in runs:
        per_core = images / wall / cpus
        per_cpu_second = images / cpu
        rows.append({
            "run": name, "images": images, "cpus": cpus, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "images_per_s": round(images / wall, 1), "images_per_s_per_core": round(per_core, 1),
            "wall_fraction_of_bare": round(per_core / bare_per_core, 3),
            "images_per_cpu_s": round(per_cpu_second, 1),
            "cpu_fraction_of_bare": round(per_cpu_second / bare_per_cpu_second, 3),
        })
        print(f"{name:<31} {cpus:>4} {wall:>7.2f} {images / wall:>7.1f} {per_core:>10.1f} "
              f"{per_core / bare_per_core:>7.0%} {cpu:>7.2f} {per_cpu_second:>9.1f} "
              f"{per_cpu_second / bare_per_cpu_second:>7.0%}")
    load = os.getloadavg()[0]
    print(f"1-minute load average after the runs: {load:.1f} on {os.cpu_count()} cores")

    if args.output:
        result = {
            "image_size": args.image_size,
            "shard_samples": args.shard_samples,
            "cpus": args.cpus,
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                        "load_average_1min_after": load},
            "runs": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
