"""Skip-GANomaly networks (methods 4 and 5).

Paper: S. Akcay, A. Atapour-Abarghouei, T. P. Breckon, "Skip-GANomaly: Skip Connected and
Adversarially Trained Encoder-Decoder Anomaly Detection", IJCNN 2019,
https://arxiv.org/abs/1901.08954.

The generator is a U-Net with log2(image_size) levels that reconstructs the image directly;
there is no second encoder. The discriminator is a DCGAN encoder whose ``latent_dim``-channel
1x1 output is the feature vector, followed by a 3x3 convolution to one channel.

Deviations from the paper and its reference code:
- The discriminator returns logits, not sigmoid probabilities. The losses apply
  BCE-with-logits, which equals sigmoid followed by BCE but does not saturate in float32.
- The reference U-Net applies its LeakyReLU in place on each inner level's input, so its
  skip connections carry the activated input. Here the skips carry the input itself.
- Convolutions without a BatchNorm after them have a bias.
- The generator takes no noise input; the reference code allocates a noise tensor it never fills.
- ``kernel_size`` and ``spectral_norm`` apply as in GANomaly, although methods 4 and 5 leave
  them at 4 and off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from anomaly.models.blocks import (
    LEAKY_SLOPE,
    DiscriminatorOutput,
    Encoder,
    GeneratorOutput,
    check_image_size,
    check_input,
    down_conv,
    up_conv,
)


def unet_widths(image_size: int, base_channels: int) -> list[int]:
    """Return the output channels of each U-Net down level, outermost first.

    The width doubles from ``base_channels`` up to ``8 * base_channels`` and stays there:
    64, 128, 256, 512, 512, ... for the default base of 64.
    """
    levels = check_image_size(image_size)
    return [min(base_channels * 2**level, base_channels * 8) for level in range(levels)]


class UNetGenerator(nn.Module):
    """U-Net generator that halves the image down to 1x1 and back, with a skip at every level.

    Down level i: LeakyReLU 0.2 (except the outermost), a stride-2 convolution, and BatchNorm
    (except the outermost and the innermost). Up level i: ReLU, a stride-2 transposed
    convolution, then BatchNorm, or Tanh at the outermost level. Below the outermost level,
    the up output is concatenated with the input of the matching down level.

    Args:
        image_size: Side of the square images; a power of two of at least 16.
        channels: Image channels, 1 or 3.
        base_channels: Width of the outermost level.
        kernel_size: Kernel of the stride-2 convolutions and transposed convolutions, 4 or 5.
    """

    def __init__(self, image_size: int, channels: int, base_channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        widths = unet_widths(image_size, base_channels)
        levels = len(widths)

        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            outermost, innermost = level == 0, level == levels - 1
            in_channels = channels if outermost else widths[level - 1]
            layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(LEAKY_SLOPE)]
            norm = not (outermost or innermost)
            layers.append(down_conv(in_channels, width, kernel_size, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(width))
            self.down.append(nn.Sequential(*layers))

        self.up = nn.ModuleList()
        for level, width in enumerate(widths):
            outermost, innermost = level == 0, level == levels - 1
            # Every level but the innermost receives the concatenation [skip, up output] from below.
            in_channels = width if innermost else 2 * width
            if outermost:
                layers = [nn.ReLU(), up_conv(in_channels, channels, kernel_size, bias=True), nn.Tanh()]
            else:
                out_channels = widths[level - 1]
                layers = [
                    nn.ReLU(),
                    up_conv(in_channels, out_channels, kernel_size, bias=False),
                    nn.BatchNorm2d(out_channels),
                ]
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        """Reconstruct ``x`` ``[B, C, S, S]``; the latent fields of the output are None."""
        check_input(x, self.channels, self.image_size)
        skips = []
        h = x
        for block in self.down:
            skips.append(h)
            h = block(h)
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
            if level > 0:
                h = torch.cat([skips[level], h], dim=1)
        return GeneratorOutput(h, None, None)


class SkipGanomalyDiscriminator(nn.Module):
    """DCGAN encoder to a ``latent_dim``-channel 1x1 feature vector, then a 3x3 convolution to a logit.

    Args:
        image_size: Side of the square images; a power of two of at least 16.
        channels: Image channels, 1 or 3.
        latent_dim: Channels of the feature vector f(x).
        base_channels: Width of the first encoder level.
        kernel_size: Kernel of the stride-2 convolutions, 4 or 5.
        spectral_norm: Whether to add spectral normalisation to every convolution and drop BatchNorm.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int,
        base_channels: int,
        kernel_size: int = 4,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            image_size, channels, latent_dim, base_channels, kernel_size,
            batch_norm=not spectral_norm, spectral_norm=spectral_norm,
        )
        classifier = nn.Conv2d(latent_dim, 1, 3, stride=1, padding=1, bias=True)
        self.classifier = add_spectral_norm(classifier) if spectral_norm else classifier

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        """Return logits ``[B]`` and the features ``[B, latent_dim, 1, 1]`` of ``x``."""
        features = self.encoder(x)
        logits = self.classifier(features)  # [B, 1, 1, 1]
        return DiscriminatorOutput(logits.flatten(), features)
