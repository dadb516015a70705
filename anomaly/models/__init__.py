"""Generators and discriminators of the five methods, and their weight initialisation.

Methods 1 to 3 use GANomaly's networks and methods 4 and 5 use Skip-GANomaly's. At run time
every module here imports only torch, so the networks can be used without the rest of the suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from anomaly.models.blocks import DiscriminatorOutput, GeneratorOutput
from anomaly.models.ganomaly import GanomalyDiscriminator, GanomalyGenerator
from anomaly.models.skip_ganomaly import SkipGanomalyDiscriminator, UNetGenerator, unet_widths

if TYPE_CHECKING:
    from anomaly.config import Config

# Power iterations that refresh a spectral-norm estimate after new weights are drawn.
# torch runs the same number when it registers the parametrization.
_SPECTRAL_NORM_REFRESH_ITERATIONS = 15


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """Draw DCGAN initial weights for one module; pass it to ``nn.Module.apply``.

    Convolution weights come from N(0, 0.02) and their biases are set to 0. BatchNorm
    weights come from N(1, 0.02) and their biases are set to 0. For a convolution with a
    spectral-norm parametrization the unnormalised weight is redrawn, and the power
    iteration vectors are refreshed so that the normalisation fits the new weight.
    Other modules are left unchanged, so re-initialising a trained network keeps every
    parameter object and an optimizer built on them stays valid.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        if parametrize.is_parametrized(module, "weight"):
            original = module.parametrizations.weight.original
            original.normal_(0.0, 0.02)
            _refresh_parametrizations(module, original)
        else:
            module.weight.normal_(0.0, 0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.BatchNorm2d):
        module.weight.normal_(1.0, 0.02)
        module.bias.zero_()


def _refresh_parametrizations(module: nn.Module, original: torch.Tensor) -> None:
    """Run the weight parametrizations in training mode, which makes spectral norm iterate."""
    for parametrization in module.parametrizations.weight:
        was_training = parametrization.training
        parametrization.train()
        for _ in range(_SPECTRAL_NORM_REFRESH_ITERATIONS):
            parametrization(original)
        parametrization.train(was_training)


def build_models(config: Config) -> tuple[nn.Module, nn.Module]:
    """Build and initialise the generator and discriminator that ``config.model`` describes.

    Returns:
        ``(generator, discriminator)``: GANomaly networks for methods 1 to 3 and
        Skip-GANomaly networks for methods 4 and 5, with weights drawn by :func:`init_weights`
        from torch's global random generator.
    """
    model = config.model
    generator: nn.Module
    discriminator: nn.Module
    if config.architecture == "ganomaly":
        generator = GanomalyGenerator(
            model.image_size, model.channels, model.latent_dim, model.base_channels, model.kernel_size
        )
        discriminator = GanomalyDiscriminator(
            model.image_size, model.channels, model.base_channels, model.kernel_size, model.spectral_norm
        )
    else:
        generator = UNetGenerator(model.image_size, model.channels, model.base_channels, model.kernel_size)
        discriminator = SkipGanomalyDiscriminator(
            model.image_size, model.channels, model.latent_dim, model.base_channels, model.kernel_size,
            model.spectral_norm,
        )
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


__all__ = [
    "DiscriminatorOutput",
    "GanomalyDiscriminator",
    "GanomalyGenerator",
    "GeneratorOutput",
    "SkipGanomalyDiscriminator",
    "UNetGenerator",
    "build_models",
    "init_weights",
    "unet_widths",
]
