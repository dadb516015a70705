"""GANomaly networks (methods 1 to 3).

Paper: S. Akcay, A. Atapour-Abarghouei, T. P. Breckon, "GANomaly: Semi-Supervised
Anomaly Detection via Adversarial Training", ACCV 2018, https://arxiv.org/abs/1805.06725.

The generator is an encoder-decoder-encoder: E1 maps x to z, the decoder maps z to x_hat
and E2 maps x_hat to z_hat. The discriminator is a DCGAN encoder with one output channel.

Deviations from the paper and its reference code:
- The discriminator returns logits, not sigmoid probabilities. The losses apply
  BCE-with-logits, which equals sigmoid followed by BCE but does not saturate in float32.
- Convolutions without a BatchNorm after them have a bias; the reference code has none anywhere.
- ``kernel_size`` 5 (method 2) widens every stride-2 convolution and transposed convolution;
  the 4x4 convolutions between the 4x4 map and the 1x1 code keep 4x4 kernels.
- ``spectral_norm`` (method 3) puts a spectral-norm parametrization on every discriminator
  convolution, the final one included, and removes the discriminator's BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from anomaly.models.blocks import Decoder, DiscriminatorOutput, Encoder, GeneratorOutput, check_input


class GanomalyGenerator(nn.Module):
    """Encoder-decoder-encoder generator.

    Args:
        image_size: Side of the square images; a power of two of at least 16.
        channels: Image channels, 1 or 3.
        latent_dim: Size of z and z_hat.
        base_channels: Width of the first encoder level and of the last decoder level.
        kernel_size: Kernel of the stride-2 convolutions, 4 or 5.
    """

    def __init__(
        self, image_size: int, channels: int, latent_dim: int, base_channels: int, kernel_size: int = 4
    ) -> None:
        super().__init__()
        self.encoder = Encoder(image_size, channels, latent_dim, base_channels, kernel_size)
        self.decoder = Decoder(image_size, latent_dim, channels, base_channels, kernel_size)
        self.encoder_hat = Encoder(image_size, channels, latent_dim, base_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        """Reconstruct ``x`` ``[B, C, S, S]`` and return x_hat with both latent codes ``[B, latent_dim]``."""
        z = self.encoder(x)  # [B, latent_dim, 1, 1]
        x_hat = self.decoder(z)
        z_hat = self.encoder_hat(x_hat)
        return GeneratorOutput(x_hat, z.flatten(1), z_hat.flatten(1))


class GanomalyDiscriminator(nn.Module):
    """DCGAN discriminator that also returns its last 4x4 feature map.

    Args:
        image_size: Side of the square images; a power of two of at least 16.
        channels: Image channels, 1 or 3.
        base_channels: Width of the first level.
        kernel_size: Kernel of the stride-2 convolutions, 4 or 5.
        spectral_norm: Whether to add spectral normalisation to every convolution and drop BatchNorm.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        base_channels: int,
        kernel_size: int = 4,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            image_size, channels, 1, base_channels, kernel_size,
            batch_norm=not spectral_norm, spectral_norm=spectral_norm,
        )

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        """Return logits ``[B]`` and the 4x4 features ``[B, base_channels * S / 8, 4, 4]`` of ``x``."""
        check_input(x, self.encoder.in_channels, self.encoder.image_size)
        features = self.encoder.features(x)
        logits = self.encoder.final(features)  # [B, 1, 1, 1]
        return DiscriminatorOutput(logits.flatten(), features)
