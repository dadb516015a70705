"""Checkpoints: unwrapped state of both networks and optimizers, written atomically.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
it loads with ``torch.load(weights_only=True)``: loading never runs code from
the file. The architecture always comes from the config stored inside it.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly.config import Config, from_dict, to_dict
from anomaly.data import storage

FORMAT_VERSION = 1
TRAINING_STATE = "state.pt"  # inside a Ray Train checkpoint directory
MODEL_FILE = "model.pt"  # the selected model in the run folder


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of an unknown format."""


def training_state(config: Config, generator: nn.Module, discriminator: nn.Module,
                   opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, epoch: int,
                   extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "config": to_dict(config),
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **extra,
    }


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to a local file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_to_url(state: dict[str, Any], url: str) -> None:
    """Write ``state`` to a local path or S3 URL; both appear only when complete."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(url, buffer.getvalue())


def load_state(source: str | Path | bytes) -> dict[str, Any]:
    """Load a checkpoint dict from a path, an S3 URL or raw bytes, safely."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else storage.read_bytes(str(source))
    except storage.ObjectNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {name}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"cannot load checkpoint {name}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {name} has format {found!r}; this code reads format {FORMAT_VERSION}")
    return state


def config_of(state: dict[str, Any]) -> Config:
    return from_dict(state["config"])
