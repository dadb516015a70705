"""Training end to end on real car photos: 2 Ray workers, evaluation, resume, rank consistency."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.config import load_config
from anomaly.data.stream import read_index
from anomaly.evaluate import evaluate_run
from anomaly.train.checkpoint import load_state
from anomaly.train.launch import read_history, run_training

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.ray


def _config(method: int, epochs: int, workers: int = 2, **extra: str):
    overrides = [
        f"model.method={method}", "model.image_size=32", "model.base_channels=16",
        f"train.epochs={epochs}", "train.batch_size_per_worker=8", f"ray.num_workers={workers}",
        "ray.num_cpus=2", "train.grid_images=4",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def _epochs(history: list[dict]) -> list[dict]:
    return [row for row in history if "event" not in row]


@pytest.mark.parametrize("method", [1, 4])
def test_two_workers_train_and_evaluate(car_shards: str, tmp_path: Path, method: int) -> None:
    run_dir = tmp_path / "run"
    # Method 1 decodes in a DataLoader process forked from each Ray worker. Method 4 decodes
    # in the worker itself and trains under bf16 autocast.
    extra = {"data.loader_workers": "1"} if method == 1 else {"train.precision": "bf16"}
    run_training(_config(method, epochs=2, **extra), car_shards, str(run_dir))

    epochs = _epochs(read_history(str(run_dir)))
    assert [row["epoch"] for row in epochs] == [0, 1]
    for row in epochs:
        assert math.isfinite(row["loss_g"])
        assert math.isfinite(row["loss_d"])
        assert 0.0 <= row["val_auroc"] <= 1.0
        assert row["val_n_anomalous"] > 0
        assert row["val_n_normal"] > 0
        assert row["images_per_second"] > 0
        assert row["selection_metric"] == "val_auroc"
    assert (run_dir / "grids" / "epoch_001.png").read_bytes().startswith(PNG_MAGIC)

    model = load_state(str(run_dir / "model.pt"))
    assert model["config"]["model"]["method"] == method
    assert model["threshold"]["method"] == "val_best_f1"
    assert model["epoch"] == epochs[-1]["best_epoch"]

    report = tmp_path / "report"
    metrics = evaluate_run(str(run_dir), car_shards, "test", str(report))
    index = read_index(car_shards)
    test_labels = index["splits"]["test"]["labels"]
    assert metrics["n_normal"] == test_labels["whole"]
    assert metrics["n_anomalous"] == test_labels["damaged"]
    assert 0.0 <= metrics["auroc"] <= 1.0
    assert metrics["threshold"] == pytest.approx(model["threshold"]["value"])
    for key in ("average_precision", "f1", "precision", "recall"):
        assert 0.0 <= metrics[key] <= 1.0
    rows = (report / "scores.csv").read_text().splitlines()
    assert rows[0] == "key,label,score"
    assert len(rows) - 1 == index["splits"]["test"]["count"]
    assert len({row.split(",")[0] for row in rows[1:]}) == len(rows) - 1
    for name in ("roc.png", "score_hist.png", "reconstructions.png"):
        assert (report / name).read_bytes().startswith(PNG_MAGIC), name
    assert json.loads((report / "metrics.json").read_text())["auroc"] == pytest.approx(metrics["auroc"])


def test_resume_continues_after_finished_epoch(car_shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_training(_config(1, epochs=1), car_shards, str(run_dir))
    first = _epochs(read_history(str(run_dir)))
    assert [row["epoch"] for row in first] == [0]

    run_training(_config(1, epochs=2), car_shards, str(run_dir))
    history = read_history(str(run_dir))
    assert [row["epoch"] for row in _epochs(history)] == [0, 1]
    # The first epoch's record is carried over from the checkpoint, not retrained.
    assert _epochs(history)[0]["loss_g"] == pytest.approx(first[0]["loss_g"])
    assert any(row.get("event") == "resumed" and row["from_epoch"] == 1 for row in history)

    # A finished run does nothing more when rerun.
    run_training(_config(1, epochs=2), car_shards, str(run_dir))
    assert [row["epoch"] for row in _epochs(read_history(str(run_dir)))] == [0, 1]


def test_changed_architecture_is_rejected(car_shards: str, tmp_path: Path) -> None:
    from anomaly.config import ConfigError

    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("model: {method: 4}\n")
    with pytest.raises(ConfigError, match="differ"):
        run_training(_config(1, epochs=1), car_shards, str(run_dir))


def test_image_size_above_shards_is_rejected(car_shards: str, tmp_path: Path) -> None:
    from anomaly.data.stream import ShardIndexError

    with pytest.raises(ShardIndexError, match="larger than the 32 px"):
        run_training(_config(1, epochs=1, **{"model.image_size": "64"}), car_shards, str(tmp_path / "run"))


def _consistency_loop(loop_config: dict) -> None:
    """Train a few steps, then report checksums of every parameter and spectral-norm buffer per rank."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from anomaly.config import from_dict
    from anomaly.data.stream import read_index, steps_per_epoch, train_batches
    from anomaly.models import build_models
    from anomaly.train.step import Networks, build_optimizers, train_step

    config = from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(0)
    generator, discriminator = build_models(config)
    generator = ray.train.torch.prepare_model(generator)
    discriminator = ray.train.torch.prepare_model(discriminator)
    opt_g, opt_d = build_optimizers(config, generator, discriminator)
    nets = Networks(generator, discriminator, opt_g, opt_d)
    index = read_index(loop_config["shards"])
    steps = steps_per_epoch(index, "train", config.global_batch_size)
    rng = torch.Generator().manual_seed(rank)
    for step, (images, _, _) in enumerate(train_batches(
        index, loop_config["shards"], rank=rank, world_size=world, image_size=32,
        batch_size=config.train.batch_size_per_worker, steps=steps, seed=0, epoch=0, shuffle_buffer=8,
    )):
        train_step(config, nets, images, 0.1, rng, step)

    def checksums(module: torch.nn.Module) -> dict[str, float]:
        bare = Networks.unwrap(module)
        sums = {f"param:{n}": float(p.detach().double().sum()) for n, p in bare.named_parameters()}
        sums.update({f"buffer:{n}": float(b.double().sum()) for n, b in bare.named_buffers()
                     if n.endswith("_u") or n.endswith("_v")})
        return sums

    local = {"generator": checksums(generator), "discriminator": checksums(discriminator)}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    if rank == 0:
        Path(loop_config["out"]).write_text(json.dumps(gathered))
    ray.train.report({"steps": steps})


def test_ranks_stay_identical_with_spectral_norm(car_shards: str, tmp_path: Path) -> None:
    """Method 3 on 2 workers: parameters and spectral-norm vectors equal on both ranks after training steps."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from anomaly.config import to_dict
    from anomaly.ray_cluster import init_ray

    config = _config(3, epochs=1)
    init_ray("", 2)
    out = tmp_path / "checksums.json"
    TorchTrainer(
        _consistency_loop,
        train_loop_config={"config": to_dict(config), "shards": car_shards, "out": str(out)},
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="consistency", storage_path=str(tmp_path / "ray")),
    ).fit()
    rank0, rank1 = json.loads(out.read_text())
    for network in ("generator", "discriminator"):
        assert rank0[network].keys() == rank1[network].keys()
        for name, value in rank0[network].items():
            assert np.isclose(value, rank1[network][name], rtol=0, atol=1e-9), f"{network} {name} drifted"
    sn_buffers = [n for n in rank0["discriminator"] if n.startswith("buffer:")]
    assert sn_buffers, "method 3's discriminator has no spectral-norm vectors"
