"""Reading shards back: rank plans, DataLoader worker processes, skipped samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from anomaly.config import ConfigError, load_config
from anomaly.data.samples import SkipCounter, iterate_samples
from anomaly.data.stream import plan_for_rank, read_index, train_batches


def _train_keys(shards: str) -> list[str]:
    plan = plan_for_rank(read_index(shards), shards, "train", 0, 1)
    return [key for _, _, key in iterate_samples(plan, 32)]


def _one_pass(shards: str, loader_workers: int, epoch: int = 0, skipped: SkipCounter | None = None,
              steps: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """One rank, batch size 1, so a pass of ``count`` steps yields every readable sample once."""
    index = read_index(shards)
    steps = steps or index["splits"]["train"]["count"]
    out = []
    for images, _, keys in train_batches(index, shards, rank=0, world_size=1, image_size=32, batch_size=1,
                                         steps=steps, seed=5, epoch=epoch, shuffle_buffer=8,
                                         skipped=skipped, loader_workers=loader_workers):
        assert images.shape == (1, 3, 32, 32)
        out.append((keys[0], images[0]))
    return out


def test_loader_workers_decode_same_samples(car_shards: str) -> None:
    in_process = dict(_one_pass(car_shards, loader_workers=0))
    in_workers = _one_pass(car_shards, loader_workers=2)
    keys = [key for key, _ in in_workers]
    assert len(keys) == len(set(keys))
    assert len(keys) == read_index(car_shards)["splits"]["train"]["count"]
    assert set(keys) == set(in_process)
    assert set(keys) == set(_train_keys(car_shards))
    for key, image in in_workers:
        assert torch.equal(image, in_process[key]), key


def test_loader_worker_order_is_seeded(car_shards: str) -> None:
    first = [key for key, _ in _one_pass(car_shards, loader_workers=2)]
    again = [key for key, _ in _one_pass(car_shards, loader_workers=2)]
    other_epoch = [key for key, _ in _one_pass(car_shards, loader_workers=2, epoch=1)]
    assert first == again
    assert first != other_epoch
    assert sorted(first) == sorted(other_epoch)


def test_loader_workers_cycle_to_fill_steps(car_shards: str) -> None:
    count = read_index(car_shards)["splits"]["train"]["count"]
    keys = [key for key, _ in _one_pass(car_shards, loader_workers=2, steps=count + 5)]
    assert len(keys) == count + 5
    assert set(keys) == set(_train_keys(car_shards))


def test_ranks_disjoint_with_fewer_shards(car_shards: str) -> None:
    index = read_index(car_shards)
    shard_count = len(index["splits"]["train"]["shards"])
    world = shard_count + 2
    seen: list[str] = []
    for rank in range(world):
        plan = plan_for_rank(index, car_shards, "train", rank, world)
        assert plan.stride == world
        # Each rank orders the shards with its own seed, as training does.
        seen += [key for _, _, key in iterate_samples(plan, 32, shuffle_seed=100 + rank, shuffle_buffer=4)]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(_train_keys(car_shards))


def _corrupt_one_image(shards: str, dest: Path) -> str:
    """Copy the shard folder and overwrite the first JPEG of the first train shard with text.

    Returns the key of the damaged sample.
    """
    shutil.copytree(shards, dest)
    shard = dest / read_index(shards)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    stem = victim[: -len(".jpg")]
    meta = next(data for m, data in members if m.name == stem + ".json")
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == victim:
                data = b"this is not a jpeg"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return json.loads(meta)["key"]


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_unreadable_image_skipped_and_counted(car_shards: str, tmp_path: Path, loader_workers: int) -> None:
    broken = tmp_path / "shards"
    victim = _corrupt_one_image(car_shards, broken)
    count = read_index(car_shards)["splits"]["train"]["count"]
    skipped = SkipCounter()
    keys = [key for key, _ in _one_pass(str(broken), loader_workers, skipped=skipped, steps=count - 1)]
    assert skipped.count == 1
    assert len(set(keys)) == count - 1
    assert victim not in keys


def test_negative_loader_workers_rejected() -> None:
    with pytest.raises(ConfigError, match="data.loader_workers=-1"):
        load_config(None, ["data.loader_workers=-1"])
