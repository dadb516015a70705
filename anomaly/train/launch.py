"""Driver side of training: checks, run folder, and the Ray Train ``TorchTrainer``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from anomaly.config import Config, ConfigError, dump_yaml, to_dict
from anomaly.data import storage
from anomaly.data.stream import check_image_size, read_index, steps_per_epoch
from anomaly.ray_cluster import check_resources, init_ray

log = logging.getLogger(__name__)

RUN_NAME = "train"  # Ray Train's experiment folder inside the run folder
# Environment that workers on other nodes need to reach the same S3 endpoint.
# Credentials are deliberately absent: nodes get them from their instance role.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "AWS_EC2_METADATA_DISABLED")


@dataclass(frozen=True)
class TrainingResult:
    run_dir: str
    history: list[dict[str, Any]]
    error: str | None

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return [row for row in self.history if "epoch" in row and "event" not in row]


def worker_resources(config: Config) -> dict[str, float]:
    request = {"CPU": config.ray.cpus_per_worker * config.ray.num_workers}
    if config.ray.use_gpu:
        request["GPU"] = float(config.ray.num_workers)
    return request


def _check_same_model(config: Config, run_dir: str) -> None:
    """Refuse to resume a run folder that was trained with another architecture."""
    url = storage.join(run_dir, "config.yaml")
    if not storage.exists(url):
        return
    previous = yaml.safe_load(storage.read_bytes(url))
    if previous.get("model") != to_dict(config)["model"]:
        raise ConfigError(
            f"{run_dir} contains a run with model settings {previous.get('model')}, which differ from "
            f"{to_dict(config)['model']}; pass a new --output folder to start a separate run"
        )


def storage_for(run_dir: str) -> dict[str, Any]:
    """Ray Train ``RunConfig`` storage arguments for a local folder or an S3 URL."""
    if not storage.is_s3(run_dir):
        return {"storage_path": os.path.abspath(run_dir)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {"storage_path": run_dir}
    import pyarrow.fs

    parsed = urlparse(endpoint)
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc, scheme=parsed.scheme or "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    # With an explicit filesystem, pyarrow wants "bucket/prefix" without the scheme.
    return {"storage_path": run_dir[len("s3://"):].rstrip("/"), "storage_filesystem": filesystem}


def absolute(url: str) -> str:
    return url if storage.is_s3(url) else os.path.abspath(url)


def run_training(config: Config, shards: str, run_dir: str, callbacks: list[Any] | None = None,
                 start_ray: bool = True) -> TrainingResult:
    """Train ``config`` on the shards, resuming from the run folder's last checkpoint if there is one.

    Args:
        callbacks: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` when a trial runs this.
        start_ray: False inside a Tune trial, where Ray is already running and the
            resources were checked for the whole trial.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from anomaly.train.loop import train_loop_per_worker

    # Workers run in other folders (and on other nodes), so local paths must be absolute.
    shards = absolute(shards)
    run_dir = absolute(run_dir)
    index = read_index(shards)
    check_image_size(index, config.model.image_size, shards)
    steps_per_epoch(index, "train", config.global_batch_size)
    _check_same_model(config, run_dir)
    storage.write_bytes(storage.join(run_dir, "config.yaml"), dump_yaml(config).encode())

    if start_ray:
        init_ray(config.ray.address, config.ray.num_cpus)
        if config.ray.autoscaling:
            log.info("ray.autoscaling=true: not checking %s against the nodes up now", worker_resources(config))
        else:
            check_resources(worker_resources(config), f"training with ray.num_workers={config.ray.num_workers}")
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "shards": shards, "run_dir": run_dir},
        torch_config=TorchConfig(
            backend="nccl" if config.ray.use_gpu else "gloo", timeout_s=config.ray.collective_timeout_s
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
            **storage_for(run_dir),
        ),
    )
    log.info("training method %d at %d px on %d worker(s), global batch %d, %d epochs; run folder %s",
             config.model.method, config.model.image_size, config.ray.num_workers,
             config.global_batch_size, config.train.epochs, run_dir)
    trainer.fit()
    return TrainingResult(run_dir, read_history(run_dir), None)


def read_history(run_dir: str) -> list[dict[str, Any]]:
    import json

    url = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
