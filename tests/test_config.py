"""Config loading: presets, overrides, validation messages and the dict round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly.config import ConfigError, from_dict, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("method", [1, 2, 3, 4, 5])
def test_method_files_load(method: int) -> None:
    config = load_config(CONFIGS / f"method{method}.yaml")
    assert config.model.method == method
    assert config.architecture == ("ganomaly" if method <= 3 else "skip")


def test_method2_preset_sets_every_change() -> None:
    config = load_config(None, ["model.method=2"])
    assert config.model.latent_dim == 512
    assert config.model.kernel_size == 5
    assert config.loss.soft_labels is True
    assert config.loss.label_flip_prob == 0.05
    assert config.loss.adversarial_loss == "bce"
    assert config.loss.instance_noise_std == 0.1
    assert (config.optim.lr_g, config.optim.lr_d) == (1e-4, 4e-4)
    assert config.model.spectral_norm is False


def test_method3_adds_spectral_norm_only() -> None:
    two = to_dict(load_config(None, ["model.method=2"]))
    three = to_dict(load_config(None, ["model.method=3"]))
    two["model"].pop("method")
    three["model"].pop("method")
    assert three["model"].pop("spectral_norm") is True
    assert two["model"].pop("spectral_norm") is False
    assert two == three


def test_override_beats_preset_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {method: 2, latent_dim: 256}\nloss: {soft_labels: false}\n")
    config = load_config(path, ["model.latent_dim=128"])
    assert config.model.latent_dim == 128
    assert config.loss.soft_labels is False
    assert config.model.kernel_size == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.image_size=100", "model.image_size=100.*power of two"),
        ("model.image_size=8", "power of two of at least 16"),
        ("model.latnet_dim=5", "unknown config key model.latnet_dim"),
        ("modle.method=1", "unknown config section 'modle'"),
        ("model.method=6", "model.method=6.*one of 1, 2, 3, 4, 5"),
        ("model.kernel_size=3", "model.kernel_size=3"),
        ("train.epochs=ten", "train.epochs='ten'.*an integer"),
        ("loss.soft_labels=1", "loss.soft_labels=1.*true or false"),
        ("optim.lr_g=-1", "optim.lr_g=-1.0.*above 0"),
        ("loss.label_flip_prob=1.5", "between 0 and 1"),
        ("loss.real_label_range=[0.9, 0.7]", "low <= high"),
        ("mask.mask_size=48", "divisor of model.image_size"),
    ],
)
def test_bad_values_name_key_and_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_global_batch_must_split_over_workers() -> None:
    with pytest.raises(ConfigError, match="multiple of ray.num_workers"):
        load_config(None, ["train.global_batch_size=63", "ray.num_workers=2"])
    config = load_config(None, ["train.global_batch_size=64", "ray.num_workers=4"])
    assert config.train.batch_size_per_worker == 16
    assert config.global_batch_size == 64


def test_global_batch_defaults_to_per_worker_times_workers() -> None:
    config = load_config(None, ["train.batch_size_per_worker=8", "ray.num_workers=3"])
    assert config.global_batch_size == 24


def test_dict_round_trip_is_exact() -> None:
    config = load_config(CONFIGS / "method5.yaml", ["mask.mask_size=64", "train.seed=7"])
    assert from_dict(to_dict(config)) == config
    assert config.mask_size == 64


def test_mask_size_defaults_to_half_the_image() -> None:
    assert load_config(None, ["model.method=5", "model.image_size=64"]).mask_size == 32


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model.latent_dim"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
