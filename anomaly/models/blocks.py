"""DCGAN-style building blocks shared by GANomaly and Skip-GANomaly.

The encoder halves the image with stride-2 convolutions until the feature map is 4x4,
then a 4x4 convolution without padding reduces it to a 1x1 code. The decoder mirrors it
with transposed convolutions. A convolution has a bias only where no BatchNorm follows,
because BatchNorm's own shift makes such a bias redundant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

LEAKY_SLOPE = 0.2


class GeneratorOutput(NamedTuple):
    """Result of a generator's forward pass, the same in train and eval mode.

    Attributes:
        x_hat: Reconstructed image, ``[B, C, H, W]`` in [-1, 1].
        z: Latent code of the input, ``[B, latent_dim]``, or None for Skip-GANomaly.
        z_hat: Latent code of the reconstruction, ``[B, latent_dim]``, or None for Skip-GANomaly.
    """

    x_hat: torch.Tensor
    z: torch.Tensor | None
    z_hat: torch.Tensor | None


class DiscriminatorOutput(NamedTuple):
    """Result of a discriminator's forward pass.

    Attributes:
        logits: Pre-sigmoid real/fake score, ``[B]``.
        features: Feature map that the feature-matching and latent losses compare, ``[B, ...]``.
    """

    logits: torch.Tensor
    features: torch.Tensor


def check_image_size(image_size: int) -> int:
    """Return the number of stride-2 halvings from ``image_size`` down to 1 pixel.

    Raises:
        ValueError: If ``image_size`` is not a power of two of at least 16.
    """
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(
            f"invalid image_size {image_size}: "
            "expected a power of two of at least 16 (16, 32, 64, 128, 256, 512)"
        )
    return image_size.bit_length() - 1


def check_input(x: torch.Tensor, channels: int, image_size: int) -> None:
    """Raise ValueError unless ``x`` is a ``[B, channels, image_size, image_size]`` batch."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, image_size, image_size):
        raise ValueError(
            f"invalid input shape {tuple(x.shape)}: this network expects "
            f"[B, {channels}, {image_size}, {image_size}], so check model.channels and model.image_size "
            "against the data"
        )


def check_kernel_size(kernel_size: int) -> None:
    """Raise ValueError unless ``kernel_size`` is 4 or 5, the two sizes that halve a map exactly."""
    if kernel_size not in (4, 5):
        raise ValueError(f"invalid kernel_size {kernel_size}: expected 4 or 5")


def down_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> nn.Conv2d:
    """Build a stride-2 convolution that halves an even-sized map (k=4 pad 1, or k=5 pad 2)."""
    check_kernel_size(kernel_size)
    padding = 1 if kernel_size == 4 else 2
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=2, padding=padding, bias=bias)


def up_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> nn.ConvTranspose2d:
    """Build a stride-2 transposed convolution that doubles a map.

    k=4 uses padding 1; k=5 uses padding 2 and output_padding 1.
    """
    check_kernel_size(kernel_size)
    padding = 1 if kernel_size == 4 else 2
    output_padding = kernel_size - 4
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size,
        stride=2, padding=padding, output_padding=output_padding, bias=bias,
    )


class Encoder(nn.Module):
    """DCGAN encoder from an image to a ``[B, out_channels, 1, 1]`` code.

    ``features`` maps the image to a 4x4 map with ``base_channels * image_size / 8``
    channels; ``final`` is the 4x4 convolution without padding that gives the 1x1 code.
    Keeping the two apart lets a discriminator read the 4x4 map.

    Args:
        image_size: Side of the square input; a power of two of at least 16.
        in_channels: Channels of the input image.
        out_channels: Channels of the 1x1 code.
        base_channels: Channels after the first convolution; each further level doubles them.
        kernel_size: Kernel of the stride-2 convolutions, 4 or 5. The final 4x4 convolution stays 4x4.
        batch_norm: Whether BatchNorm follows each stride-2 convolution after the first.
        spectral_norm: Whether every convolution, the final one included, gets a spectral-norm
            parametrization.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        kernel_size: int = 4,
        batch_norm: bool = True,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        self.image_size = image_size
        self.in_channels = in_channels

        def wrap(conv: nn.Conv2d) -> nn.Module:
            return add_spectral_norm(conv) if spectral_norm else conv

        layers: list[nn.Module] = [
            wrap(down_conv(in_channels, base_channels, kernel_size, bias=True)),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        channels, size = base_channels, image_size // 2
        while size > 4:
            layers.append(wrap(down_conv(channels, channels * 2, kernel_size, bias=not batch_norm)))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels * 2))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            channels, size = channels * 2, size // 2
        self.features = nn.Sequential(*layers)
        self.feature_channels = channels
        self.final = wrap(nn.Conv2d(channels, out_channels, 4, stride=1, padding=0, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, in_channels, S, S]`` to ``[B, out_channels, 1, 1]``."""
        check_input(x, self.in_channels, self.image_size)
        return self.final(self.features(x))


class Decoder(nn.Module):
    """DCGAN decoder from a ``[B, latent_dim, 1, 1]`` code to an image in [-1, 1].

    The mirror image of :class:`Encoder`: a 4x4 transposed convolution to a 4x4 map, then
    stride-2 transposed convolutions that halve the channels, each with BatchNorm and ReLU,
    and a last transposed convolution to the image channels followed by Tanh.

    Args:
        image_size: Side of the square output; a power of two of at least 16.
        latent_dim: Channels of the input code.
        out_channels: Channels of the output image.
        base_channels: Channels before the last transposed convolution.
        kernel_size: Kernel of the stride-2 transposed convolutions, 4 or 5. The first one, from
            1x1 to 4x4, stays 4x4.
    """

    def __init__(
        self, image_size: int, latent_dim: int, out_channels: int, base_channels: int, kernel_size: int = 4
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        self.latent_dim = latent_dim
        channels = base_channels * image_size // 8
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels, 4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        size = 4
        while size < image_size // 2:
            layers += [
                up_conv(channels, channels // 2, kernel_size, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels, size = channels // 2, size * 2
        layers += [up_conv(channels, out_channels, kernel_size, bias=True), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode ``[B, latent_dim, 1, 1]`` to ``[B, out_channels, S, S]``."""
        return self.main(z)
