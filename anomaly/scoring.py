"""Anomaly scores, reconstructions and anomaly maps of trained networks.

Every function runs under ``torch.no_grad()`` and requires the networks it uses to be in
eval mode, so that BatchNorm uses its running statistics and an image's score does not
depend on the batch it is in. Scores are raw, higher means more anomalous, and nothing
here rescales them over a set of images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from anomaly.config import Config
from anomaly.masking import apply_mask


def _require_eval(name: str, module: nn.Module) -> None:
    training = [sub_name or "(top level)" for sub_name, sub in module.named_modules() if sub.training]
    if training:
        raise RuntimeError(
            f"{name} has modules in training mode ({training[0]}); call {name}.eval() before scoring, "
            "because training-mode BatchNorm makes each score depend on the rest of the batch"
        )


def _check_images(config: Config, x: torch.Tensor) -> None:
    size, channels = config.model.image_size, config.model.channels
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"invalid image batch shape {tuple(x.shape)}: expected [B, {channels}, {size}, {size}] "
            "from model.channels and model.image_size"
        )


def _require_completion(config: Config) -> None:
    if config.model.method != 5:
        raise ValueError(
            f"completion scoring is defined for method 5 only, but model.method is {config.model.method}"
        )


@torch.no_grad()
def anomaly_scores(
    config: Config, generator: nn.Module, discriminator: nn.Module | None, x: torch.Tensor
) -> torch.Tensor:
    """Score each image; higher means more anomalous.

    Methods 1 to 3: the mean over latent dimensions of ``(z - z_hat) ** 2``.
    Method 4: ``skip_lambda * mean((x - x_hat) ** 2) + (1 - skip_lambda) * mean((f(x) - f(x_hat)) ** 2)``.
    Method 5: the mean of the top ``mask.top_fraction`` of the completion anomaly map
    (see :func:`anomaly_maps`).

    Args:
        config: Run configuration.
        generator: Generator in eval mode.
        discriminator: Discriminator in eval mode; only method 4 uses it, and the others accept None.
        x: Images ``[B, C, H, W]`` in [-1, 1].

    Returns:
        Raw scores ``[B]``.

    Raises:
        RuntimeError: If a network that is used is in training mode.
        ValueError: If ``x`` does not match the configured image shape, or method 4 gets no discriminator.
    """
    _check_images(config, x)
    _require_eval("generator", generator)
    method = config.model.method

    if method == 5:
        return anomaly_maps(config, generator, x)[0]

    out = generator(x)
    if method <= 3:
        return (out.z - out.z_hat).pow(2).mean(dim=1)

    if discriminator is None:
        raise ValueError("method 4 scores need the discriminator's features, but discriminator is None")
    _require_eval("discriminator", discriminator)
    rec = (x - out.x_hat).pow(2).flatten(1).mean(dim=1)
    lat = (discriminator(x).features - discriminator(out.x_hat).features).pow(2).flatten(1).mean(dim=1)
    weight = config.score.skip_lambda
    return weight * rec + (1.0 - weight) * lat


@torch.no_grad()
def reconstruct(config: Config, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the generator's reconstruction ``[B, C, H, W]`` of ``x``, for image grids.

    Method 5 returns the stitched completion of :func:`complete_by_cells`; the others
    return ``x_hat`` of one forward pass.
    """
    _check_images(config, x)
    _require_eval("generator", generator)
    if config.model.method == 5:
        return complete_by_cells(config, generator, x)
    return generator(x).x_hat


@torch.no_grad()
def reconstruction_error(config: Config, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the mean squared error ``[B]`` between each image and :func:`reconstruct`'s output.

    This is the validation objective when the validation split contains normal images only.
    """
    return (x - reconstruct(config, generator, x)).pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def complete_by_cells(config: Config, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rebuild ``x`` so that every pixel is predicted by a pass in which it was hidden.

    The image is tiled into square cells of side ``config.mask_size``. For each cell, the
    cell is filled with ``mask.mask_fill``, the generator completes the image, and the
    completed cell is copied into the result. Each of the ``mask.projection_steps`` further
    rounds repeats this on the previous round's result, which pulls the image further
    towards what the generator learned as normal.

    Args:
        config: Run configuration of method 5.
        generator: Completion generator in eval mode.
        x: Images ``[B, C, H, W]`` in [-1, 1].

    Returns:
        The stitched completion ``[B, C, H, W]``.
    """
    _require_completion(config)
    _check_images(config, x)
    _require_eval("generator", generator)
    size, cell = config.model.image_size, config.mask_size
    cells_per_side = size // cell

    completion = x
    for _ in range(1 + config.mask.projection_steps):
        source = completion
        completion = torch.empty_like(x)
        for row in range(cells_per_side):
            rows = slice(row * cell, (row + 1) * cell)
            for col in range(cells_per_side):
                cols = slice(col * cell, (col + 1) * cell)
                hole = torch.zeros(1, 1, size, size, dtype=torch.bool, device=x.device)
                hole[..., rows, cols] = True
                completed = generator(apply_mask(source, hole, config.mask.mask_fill)).x_hat
                completion[..., rows, cols] = completed[..., rows, cols]
    return completion


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth ``[B, H, W]`` maps with a Gaussian of ``sigma`` pixels.

    The kernel has radius ``ceil(3 * sigma)`` and is applied as two 1-D convolutions with
    reflect padding, so borders are not darkened. A sigma of 0 returns the maps unchanged.

    Raises:
        ValueError: If ``sigma`` is negative or the radius is not smaller than both map sides,
            which reflect padding requires.
    """
    if sigma < 0:
        raise ValueError(f"invalid mask.map_sigma {sigma}: expected 0 or more")
    if sigma == 0:
        return maps
    radius = math.ceil(3 * sigma)
    height, width = maps.shape[-2:]
    if radius >= min(height, width):
        raise ValueError(
            f"mask.map_sigma {sigma} needs a kernel radius of {radius} px, which must be smaller than the "
            f"map size {height}x{width}; lower mask.map_sigma below {min(height, width) / 3:.2f}"
        )
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    smoothed = maps.unsqueeze(1)  # [B, 1, H, W]
    smoothed = F.conv2d(F.pad(smoothed, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    smoothed = F.conv2d(F.pad(smoothed, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return smoothed.squeeze(1)


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Return the mean ``[B]`` of the largest ``fraction`` of each ``[B, H, W]`` map, at least one pixel."""
    pixels = maps.shape[-2] * maps.shape[-1]
    # Rounding first keeps 0.01 * 10000 from becoming 100.00000000000001 and so 101 pixels.
    count = min(pixels, max(1, math.ceil(round(fraction * pixels, 6))))
    return maps.flatten(1).topk(count, dim=1).values.mean(dim=1)


@torch.no_grad()
def anomaly_maps(config: Config, generator: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute method 5's per-pixel anomaly maps and the image scores derived from them.

    The map is ``|x - x_tilde|`` averaged over channels, where ``x_tilde`` comes from
    :func:`complete_by_cells`, smoothed with a Gaussian of ``mask.map_sigma`` pixels. The
    score is the mean of the top ``mask.top_fraction`` of the map.

    Returns:
        ``(scores [B], maps [B, H, W])``.
    """
    completion = complete_by_cells(config, generator, x)
    maps = gaussian_blur((x - completion).abs().mean(dim=1), config.mask.map_sigma)
    return top_fraction_mean(maps, config.mask.top_fraction), maps
