"""Tests of anomaly scores, reconstructions and method 5's completion maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomaly.config import Config, from_dict
from anomaly.models import GeneratorOutput, build_models
from anomaly.scoring import (
    anomaly_maps,
    anomaly_scores,
    complete_by_cells,
    gaussian_blur,
    reconstruct,
    reconstruction_error,
    top_fraction_mean,
)

METHODS = (1, 2, 3, 4, 5)


def make_config(method: int, image_size: int = 32, **sections: dict) -> Config:
    tree: dict = {"model": {"method": method, "image_size": image_size, "base_channels": 8}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return from_dict(tree)


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def trained_looking_models(config: Config) -> tuple[nn.Module, nn.Module]:
    """Build models and move their BatchNorm statistics off the defaults, then switch to eval mode."""
    torch.manual_seed(0)
    generator, discriminator = build_models(config)
    with torch.no_grad():
        for seed in range(3):
            x = images(8, config.model.image_size, seed=100 + seed)
            discriminator(generator(x).x_hat)
            discriminator(x)
    return generator.eval(), discriminator.eval()


@pytest.mark.parametrize("method", METHODS)
def test_scores_independent_of_batch_and_order(method: int) -> None:
    config = make_config(method)
    generator, discriminator = trained_looking_models(config)
    x = images(6)

    together = anomaly_scores(config, generator, discriminator, x)
    assert together.shape == (6,)
    assert torch.isfinite(together).all()
    assert together.min() >= 0
    assert len(set(together.tolist())) == 6  # distinct images get distinct scores

    one_by_one = torch.cat([anomaly_scores(config, generator, discriminator, x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=0.0)

    order = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = anomaly_scores(config, generator, discriminator, x[order])
    torch.testing.assert_close(shuffled, together[order], rtol=1e-5, atol=0.0)

    pairs = torch.cat([anomaly_scores(config, generator, discriminator, x[i : i + 2]) for i in (0, 2, 4)])
    torch.testing.assert_close(pairs, together, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("method", METHODS)
def test_scoring_rejects_training_mode(method: int) -> None:
    config = make_config(method)
    generator, discriminator = trained_looking_models(config)
    generator.train()
    with pytest.raises(RuntimeError, match=r"generator.eval\(\)"):
        anomaly_scores(config, generator, discriminator, images(2))
    with pytest.raises(RuntimeError, match=r"generator.eval\(\)"):
        reconstruct(config, generator, images(2))
    generator.eval()
    # A single submodule left in training mode is caught too.
    next(m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)).train()
    with pytest.raises(RuntimeError, match="training mode"):
        anomaly_scores(config, generator, discriminator, images(2))


def test_method_four_rejects_training_discriminator() -> None:
    config = make_config(4)
    generator, discriminator = trained_looking_models(config)
    discriminator.train()
    with pytest.raises(RuntimeError, match=r"discriminator.eval\(\)"):
        anomaly_scores(config, generator, discriminator, images(2))
    with pytest.raises(ValueError, match="discriminator is None"):
        anomaly_scores(config, generator, None, images(2))


def test_wrong_image_shape_rejected() -> None:
    config = make_config(1)
    generator, discriminator = trained_looking_models(config)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        anomaly_scores(config, generator, discriminator, images(2, 64))


@pytest.mark.parametrize("method", (1, 2, 3))
def test_ganomaly_score_is_latent_error(method: int) -> None:
    config = make_config(method)
    generator, discriminator = trained_looking_models(config)
    x = images(4)
    scores = anomaly_scores(config, generator, discriminator, x)
    with torch.no_grad():
        out = generator(x)
    expected = ((out.z - out.z_hat) ** 2).sum(dim=1) / config.model.latent_dim
    # Scores near 1e-4 at random initialisation need a purely relative tolerance.
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("skip_lambda", (0.9, 0.25, 0.0, 1.0))
def test_skip_score_formula(skip_lambda: float) -> None:
    config = make_config(4, score={"skip_lambda": skip_lambda})
    generator, discriminator = trained_looking_models(config)
    x = images(3)
    scores = anomaly_scores(config, generator, discriminator, x)
    with torch.no_grad():
        x_hat = generator(x).x_hat
        real, fake = discriminator(x).features, discriminator(x_hat).features
    rec = ((x - x_hat) ** 2).sum(dim=(1, 2, 3)) / x[0].numel()
    lat = ((real - fake) ** 2).sum(dim=(1, 2, 3)) / real[0].numel()
    assert (lat > 0).all()
    assert (rec > 0).all()
    # At random initialisation lat is about 1e-6 against rec near 0.3, so lambda 0 checks the latent
    # term on its own, and the tolerance must be relative only.
    torch.testing.assert_close(scores, skip_lambda * rec + (1 - skip_lambda) * lat, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("method", (1, 4, 5))
def test_reconstruction_error(method: int) -> None:
    config = make_config(method)
    generator, _ = trained_looking_models(config)
    x = images(3)
    x_hat = reconstruct(config, generator, x)
    assert x_hat.shape == x.shape
    if method == 5:
        torch.testing.assert_close(x_hat, complete_by_cells(config, generator, x))
    else:
        with torch.no_grad():
            torch.testing.assert_close(x_hat, generator(x).x_hat)
    errors = reconstruction_error(config, generator, x)
    torch.testing.assert_close(errors, ((x - x_hat) ** 2).mean(dim=(1, 2, 3)))


class PassIdGenerator(nn.Module):
    """Probe for completion: records each input and outputs a constant image holding the pass number."""

    step = 0.001

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.eval()

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        self.inputs.append(x.clone())
        return GeneratorOutput(torch.full_like(x, len(self.inputs) * self.step), None, None)


@pytest.mark.parametrize(
    ("image_size", "mask_size", "projection_steps"), [(32, 0, 0), (32, 0, 1), (32, 8, 2), (64, 16, 1)]
)
def test_completion_predicts_unseen_pixels(image_size: int, mask_size: int, projection_steps: int) -> None:
    fill = -0.77  # a value that no probe output or test pixel takes
    config = make_config(
        5, image_size, mask={"mask_size": mask_size, "mask_fill": fill, "projection_steps": projection_steps}
    )
    cell = config.mask_size
    cells = (image_size // cell) ** 2
    probe = PassIdGenerator()
    x = images(2, image_size) * 0.5 + 0.5  # in [0, 1], far from the fill value

    completion = complete_by_cells(config, probe, x)

    rounds = 1 + projection_steps
    assert len(probe.inputs) == rounds * cells
    pass_ids = torch.round(completion / PassIdGenerator.step).long() - 1  # [B, C, H, W], 0-based
    last_round = range((rounds - 1) * cells, rounds * cells)
    assert pass_ids.min() >= last_round.start
    assert pass_ids.max() < last_round.stop
    for pass_id in last_round:
        chosen = pass_ids == pass_id
        seen = probe.inputs[pass_id]
        # The pixels this pass supplied were hidden from it, and it supplied one whole cell.
        assert torch.all(seen[chosen] == fill), pass_id
        assert chosen.sum() == 2 * 3 * cell * cell
        # Each pass hides exactly one cell and receives the rest of its source image.
        assert (seen == fill).sum() == 2 * 3 * cell * cell

    # Round 0 receives the input, and each later round the previous round's stitched result.
    first = probe.inputs[0]
    visible = first != fill
    assert torch.equal(first[visible], x[visible])
    for round_index in range(1, rounds):
        previous_ids = torch.arange((round_index - 1) * cells, round_index * cells)
        seen = probe.inputs[round_index * cells]
        values = torch.round(seen[seen != fill] / PassIdGenerator.step).long() - 1
        assert torch.isin(values, previous_ids).all()


def test_completion_requires_method_five() -> None:
    config = make_config(4)
    generator, _ = trained_looking_models(config)
    with pytest.raises(ValueError, match="method 5"):
        complete_by_cells(config, generator, images(1))
    with pytest.raises(ValueError, match="method 5"):
        anomaly_maps(config, generator, images(1))


class ZeroGenerator(nn.Module):
    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        return GeneratorOutput(torch.zeros_like(x), None, None)


def test_anomaly_map_without_smoothing() -> None:
    config = make_config(5, mask={"map_sigma": 0.0, "top_fraction": 0.01})
    x = images(2)
    scores, maps = anomaly_maps(config, ZeroGenerator().eval(), x)
    assert maps.shape == (2, 32, 32)
    expected_maps = x.abs().mean(dim=1)
    torch.testing.assert_close(maps, expected_maps)
    top = math.ceil(0.01 * 32 * 32)  # 11 pixels
    expected = expected_maps.flatten(1).sort(dim=1, descending=True).values[:, :top].mean(dim=1)
    torch.testing.assert_close(scores, expected)

    bumped = x.clone()
    bumped[0, :, 10:14, 10:14] = 1.0
    bumped_scores, bumped_maps = anomaly_maps(config, ZeroGenerator().eval(), bumped)
    assert bumped_maps[0, 10:14, 10:14].min() == 1.0
    assert bumped_scores[0] > scores[0]
    assert bumped_scores[1] == scores[1]


def test_anomaly_map_smoothed_with_default_sigma() -> None:
    config = make_config(5)
    assert config.mask.map_sigma == 4.0
    assert config.mask.top_fraction == 0.01
    x = images(2)
    scores, maps = anomaly_maps(config, ZeroGenerator().eval(), x)
    expected_maps = gaussian_blur(x.abs().mean(dim=1), 4.0)
    torch.testing.assert_close(maps, expected_maps)
    torch.testing.assert_close(scores, top_fraction_mean(expected_maps, 0.01))


def _reference_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with one 2-D kernel over a reflect-padded map, built independently of the separable version."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(offsets, offsets, indexing="ij")
    kernel = torch.exp(-(grid_y**2 + grid_x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    padded = F.pad(maps.unsqueeze(1), (radius,) * 4, mode="reflect")
    return F.conv2d(padded, kernel[None, None]).squeeze(1)


@pytest.mark.parametrize("sigma", (0.5, 1.0, 4.0))
def test_gaussian_blur(sigma: float) -> None:
    maps = torch.rand(2, 32, 40, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(maps, sigma)
    assert blurred.shape == maps.shape
    torch.testing.assert_close(blurred, _reference_blur(maps, sigma), rtol=1e-5, atol=1e-6)

    constant = torch.full((1, 32, 32), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, sigma), constant)

    impulse = torch.zeros(1, 33, 33)
    impulse[0, 16, 16] = 1.0
    response = gaussian_blur(impulse, sigma)
    assert response.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert response[0, 16, 16] == response.max()
    torch.testing.assert_close(response, response.flip(-1))
    torch.testing.assert_close(response, response.transpose(-1, -2))
    radius = math.ceil(3 * sigma)
    assert response[0, 16, 16 + radius] > 0
    if 16 + radius + 1 < 33:
        assert response[0, 16, 16 + radius + 1] == 0


def test_gaussian_blur_rejects_large_sigma() -> None:
    with pytest.raises(ValueError, match="mask.map_sigma"):
        gaussian_blur(torch.zeros(1, 16, 16), 6.0)
    assert torch.equal(gaussian_blur(torch.ones(1, 16, 16), 0.0), torch.ones(1, 16, 16))


def test_top_fraction_mean_counts() -> None:
    maps = torch.arange(10000, dtype=torch.float32).view(1, 100, 100)
    # 1% of 10,000 pixels is exactly 100, the values 9900 to 9999.
    assert top_fraction_mean(maps, 0.01).item() == pytest.approx(9949.5)
    assert top_fraction_mean(maps, 1.0).item() == pytest.approx(4999.5)
    assert top_fraction_mean(maps, 1e-9).item() == 9999.0
