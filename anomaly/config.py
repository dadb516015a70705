"""Typed, validated run configuration shared by every job.

A config is built in three layers: the dataclass defaults, then the preset of the
chosen method (``METHOD_PRESETS``), then the YAML file, then ``--set key=value``
overrides. Keys are dotted (``model.latent_dim``). An unknown key, a value of the
wrong type or a value out of range raises :class:`ConfigError` naming the key,
the value and what is allowed. The resolved config travels across the Ray
boundary as a plain dict (:func:`to_dict`) and becomes a dataclass again with
:func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    method: int = 1
    image_size: int = 256
    channels: int = 3
    base_channels: int = 64
    latent_dim: int = 100
    kernel_size: int = 4
    spectral_norm: bool = False


@dataclass(frozen=True)
class LossConfig:
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    w_lat: float = 1.0
    adversarial_loss: str = "feature_matching"
    soft_labels: bool = False
    real_label_range: tuple[float, float] = (0.7, 1.0)
    fake_label_range: tuple[float, float] = (0.0, 0.3)
    label_flip_prob: float = 0.0
    instance_noise_std: float = 0.0
    d_reinit_threshold: float = 1e-5


@dataclass(frozen=True)
class MaskConfig:
    """Method 5: training holes and completion scoring."""

    num_masks: int = 2
    mask_size: int = 0  # 0 means half of model.image_size
    mask_fill: float = 0.0
    hole_weight: float = 1.0
    projection_steps: int = 1
    map_sigma: float = 4.0
    top_fraction: float = 0.01


@dataclass(frozen=True)
class ScoreConfig:
    skip_lambda: float = 0.9
    threshold_percentile: float = 95.0


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size_per_worker: int = 64
    global_batch_size: int = 0  # 0 means batch_size_per_worker * ray.num_workers
    seed: int = 0
    selection_metric: str = "auto"  # auto | val_auroc | val_recon_loss
    eval_batch_size: int = 64
    max_val_samples: int = 0  # 0 means the whole val split
    grid_images: int = 8
    # bf16 runs the training forward passes under autocast. Losses and weights stay
    # float32, and validation and scoring run in float32.
    precision: str = "fp32"


@dataclass(frozen=True)
class DataConfig:
    shuffle_buffer: int = 512
    max_reject_fraction: float = 0.01
    # Processes per Ray worker that decode training images, or 0 to decode in the
    # training process. Raise ray.cpus_per_worker by the same number.
    loader_workers: int = 0


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" starts a local cluster; "auto" joins a running one
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    collective_timeout_s: int = 600
    num_cpus: int = 0  # local cluster size; 0 lets Ray count the cores
    # True on clusters whose autoscaler adds nodes on demand: the start-up check
    # then cannot know the final size, so it is skipped and Ray waits for nodes.
    autoscaling: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def architecture(self) -> str:
        """``ganomaly`` for methods 1 to 3, ``skip`` for methods 4 and 5."""
        return "ganomaly" if self.model.method <= 3 else "skip"

    @property
    def mask_size(self) -> int:
        return self.mask.mask_size or self.model.image_size // 2

    @property
    def global_batch_size(self) -> int:
        return self.train.global_batch_size or self.train.batch_size_per_worker * max(1, self.ray.num_workers)


# Method 2 changes seven things at once. Each is its own key, so an ablation can
# switch any one of them back.
_STABILISED = {
    "model": {"latent_dim": 512, "kernel_size": 5},
    "loss": {
        "soft_labels": True,
        "label_flip_prob": 0.05,
        "adversarial_loss": "bce",
        "instance_noise_std": 0.1,
    },
    "optim": {"lr_g": 1e-4, "lr_d": 4e-4},
}

METHOD_PRESETS: dict[int, dict[str, dict[str, Any]]] = {
    1: {},
    2: _STABILISED,
    3: {**_STABILISED, "model": {**_STABILISED["model"], "spectral_norm": True}},
    4: {"loss": {"adversarial_loss": "bce"}},
    5: {"loss": {"adversarial_loss": "bce"}},
}

_CHOICES: dict[str, tuple[Any, ...]] = {
    "model.method": (1, 2, 3, 4, 5),
    "model.kernel_size": (4, 5),
    "model.channels": (1, 3),
    "loss.adversarial_loss": ("feature_matching", "bce"),
    "train.selection_metric": ("auto", "val_auroc", "val_recon_loss"),
    "train.precision": ("fp32", "bf16"),
}

_POSITIVE = {
    "model.latent_dim", "model.base_channels", "train.epochs", "train.batch_size_per_worker",
    "train.eval_batch_size", "mask.num_masks", "ray.cpus_per_worker", "ray.collective_timeout_s",
    "optim.lr_g", "optim.lr_d",
}
_NON_NEGATIVE = {
    "loss.w_adv", "loss.w_con", "loss.w_enc", "loss.w_lat", "loss.instance_noise_std",
    "mask.mask_size", "mask.hole_weight", "mask.projection_steps", "mask.map_sigma", "train.global_batch_size",
    "train.max_val_samples", "train.grid_images", "data.shuffle_buffer", "data.loader_workers",
    "ray.num_workers", "ray.max_failures", "ray.num_cpus", "loss.d_reinit_threshold",
}
_UNIT_INTERVAL = {
    "loss.label_flip_prob", "score.skip_lambda", "optim.beta1", "optim.beta2",
    "data.max_reject_fraction", "mask.top_fraction",
}


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid config value {key}={value!r}: expected {allowed}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting only lossless cases."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise _fail(key, value, "a finite number")
            return float(value)
        raise _fail(key, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, "a string")
    if typing.get_origin(annotation) is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise _fail(key, value, f"a list of {len(item_types)} numbers")
        return tuple(_coerce(key, v, t) for v, t in zip(value, item_types))
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key {name}.{unknown[0]}: allowed keys in '{name}' are "
            + ", ".join(sorted(hints))
        )
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _check_ranges(config: Config) -> None:
    flat = flatten(to_dict(config))
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise _fail(key, flat[key], "one of " + ", ".join(map(str, allowed)))
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise _fail(key, flat[key], "a value above 0")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise _fail(key, flat[key], "a value of 0 or more")
    for key in _UNIT_INTERVAL:
        if not 0.0 <= flat[key] <= 1.0:
            raise _fail(key, flat[key], "a value between 0 and 1")

    size = config.model.image_size
    if size < 16 or size & (size - 1):
        raise _fail("model.image_size", size, "a power of two of at least 16 (16, 32, 64, 128, 256, 512)")
    for key in ("loss.real_label_range", "loss.fake_label_range"):
        low, high = flat[key]
        if not 0.0 <= low <= high <= 1.0:
            raise _fail(key, flat[key], "[low, high] with 0 <= low <= high <= 1")
    if config.mask.mask_size and (config.mask.mask_size > size or size % config.mask.mask_size):
        raise _fail("mask.mask_size", config.mask.mask_size, f"0 or a divisor of model.image_size ({size})")
    if not 0.0 < config.mask.top_fraction:
        raise _fail("mask.top_fraction", config.mask.top_fraction, "a value in (0, 1]")
    if not 0.0 < config.score.threshold_percentile < 100.0:
        raise _fail("score.threshold_percentile", config.score.threshold_percentile, "a value in (0, 100)")

    workers = max(1, config.ray.num_workers)
    if config.train.global_batch_size:
        if config.train.global_batch_size % workers:
            raise _fail(
                "train.global_batch_size", config.train.global_batch_size,
                f"a multiple of ray.num_workers ({workers})",
            )


def _resolve_batch(config: Config) -> Config:
    """Make the per-worker and global batch sizes agree, global taking precedence."""
    workers = max(1, config.ray.num_workers)
    if config.train.global_batch_size:
        per_worker = config.train.global_batch_size // workers
        train = dataclasses.replace(config.train, batch_size_per_worker=per_worker)
    else:
        train = dataclasses.replace(
            config.train, global_batch_size=config.train.batch_size_per_worker * workers
        )
    return dataclasses.replace(config, train=train)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Turn dotted keys back into nested dicts."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {dotted} conflicts with a value set at {part}")
        node[leaf] = value
    return tree


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars or lists."""
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"invalid override {pair!r}: expected key=value, for example model.latent_dim=256")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid override value for {key}: {exc}") from exc
        tree = merge(tree, unflatten({key.strip(): value}))
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file in every error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts, applying the method preset."""
    tree = dict(tree)
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}: allowed sections are {', '.join(sorted(sections))}"
        )
    for name, values in tree.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {values!r}")

    method = tree.get("model", {}).get("method", ModelConfig.method)
    if method not in METHOD_PRESETS:
        raise _fail("model.method", method, "one of 1, 2, 3, 4, 5")
    tree = merge(METHOD_PRESETS[method], tree)

    hints = typing.get_type_hints(Config)
    built = {name: _build_section(name, hints[name], tree.get(name, {})) for name in sections}
    config = Config(**built)
    _check_ranges(config)
    return _resolve_batch(config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and apply ``--set`` overrides."""
    tree = read_yaml(path) if path else {}
    tree = merge(tree, parse_overrides(overrides))
    return from_dict(tree)


def to_dict(config: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain nested dicts (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


__all__ = [
    "Config", "ConfigError", "DataConfig", "LossConfig", "MaskConfig", "METHOD_PRESETS",
    "ModelConfig", "OptimConfig", "RayConfig", "ScoreConfig", "TrainConfig", "dump_yaml",
    "flatten", "from_dict", "load_config", "merge", "parse_overrides", "read_yaml",
    "to_dict", "unflatten",
]

