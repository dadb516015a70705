"""Generator and discriminator losses of the five methods, with the method 2 stabilisers.

The discriminators return logits, so every BCE term here is ``binary_cross_entropy_with_logits``.
That equals the papers' sigmoid followed by BCE, but stays finite when the sigmoid saturates.
Both losses add instance noise to every image that goes into a discriminator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly.config import Config, LossConfig

if TYPE_CHECKING:
    from anomaly.models import GeneratorOutput


def label_targets(
    loss_cfg: LossConfig,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the discriminator's BCE targets for one batch of real and one of fake images.

    Targets are hard 1 and 0 unless ``loss_cfg.soft_labels`` is set, in which case they are
    drawn uniformly from ``real_label_range`` and ``fake_label_range``. Afterwards each
    sample's real and fake targets are swapped with probability ``label_flip_prob``.

    Args:
        loss_cfg: Label settings.
        batch_size: Number of targets of each kind.
        device: Device of the returned targets.
        generator: Random generator; torch's global one when None. Values are drawn on the
            generator's device and then moved to ``device``.

    Returns:
        ``(real_targets, fake_targets)``, each float32 ``[batch_size]``.
    """
    draw_device = generator.device if generator is not None else torch.device(device)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator, device=draw_device)

    if loss_cfg.soft_labels:
        real = uniform(*loss_cfg.real_label_range)
        fake = uniform(*loss_cfg.fake_label_range)
    else:
        real = torch.ones(batch_size, device=draw_device)
        fake = torch.zeros(batch_size, device=draw_device)

    if loss_cfg.label_flip_prob > 0:
        # torch.rand is in [0, 1), so a probability of 1 swaps every sample.
        flip = torch.rand(batch_size, generator=generator, device=draw_device) < loss_cfg.label_flip_prob
        real, fake = torch.where(flip, fake, real), torch.where(flip, real, fake)
    return real.to(device), fake.to(device)


def add_instance_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``x`` plus Gaussian noise of standard deviation ``std``, or ``x`` itself when ``std`` is 0.

    Args:
        x: Images in [-1, 1]; the noise is not clipped.
        std: Standard deviation in the units of ``x``.
        generator: Random generator; torch's global one when None.

    Raises:
        ValueError: If ``std`` is negative.
    """
    if std < 0:
        raise ValueError(f"invalid instance noise std {std}: expected 0 or more")
    if std == 0:
        return x
    draw_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)
    return x + std * noise


def instance_noise_std(loss_cfg: LossConfig, epoch: int, epochs: int) -> float:
    """Return the instance noise std for a 0-based ``epoch`` of ``epochs``.

    The std falls linearly from ``loss_cfg.instance_noise_std`` at epoch 0 to 0 at the last
    epoch. A run of one epoch keeps the configured std, so that the setting still has an effect.

    Raises:
        ValueError: If ``epochs`` is below 1 or ``epoch`` is outside ``[0, epochs)``.
    """
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"invalid epoch {epoch} of {epochs}: expected 0 <= epoch < epochs and epochs >= 1")
    if epochs == 1:
        return loss_cfg.instance_noise_std
    return loss_cfg.instance_noise_std * (1.0 - epoch / (epochs - 1))


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"image batches differ in shape: {shapes}")


def _reconstruction_l1(
    config: Config, target: torch.Tensor, x_hat: torch.Tensor, hole_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean absolute error, with hole pixels weighted by ``mask.hole_weight`` when a mask is given."""
    error = (target - x_hat).abs()
    if hole_mask is None:
        return error.mean()
    if config.mask.hole_weight < 0:
        raise ValueError(f"invalid mask.hole_weight {config.mask.hole_weight}: expected 0 or more")
    weights = torch.where(
        hole_mask,
        torch.as_tensor(config.mask.hole_weight, dtype=error.dtype, device=error.device),
        torch.as_tensor(1.0, dtype=error.dtype, device=error.device),
    )
    return (weights * error).mean()


def generator_loss(
    config: Config,
    x: torch.Tensor,
    target: torch.Tensor,
    out: GeneratorOutput,
    discriminator: nn.Module,
    noise_std: float,
    hole_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute the generator's loss for one batch.

    GANomaly (methods 1 to 3):
    ``w_adv * adv + w_con * L1(target, x_hat) + w_enc * MSE(z, z_hat)``.
    Skip-GANomaly (methods 4 and 5):
    ``w_adv * adv + w_con * L1(target, x_hat) + w_lat * MSE(f(target), f(x_hat))``.
    ``adv`` follows ``loss.adversarial_loss``: ``feature_matching`` is ``MSE(f(target), f(x_hat))``
    and ``bce`` is the non-saturating ``BCE(D(x_hat), 1)`` with a hard target of 1.
    Every term is a mean over its elements.

    Both images reach the discriminator with instance noise of std ``noise_std``. The real
    image's features are computed without gradient because the generator cannot change them.
    Backpropagating the returned loss still fills the discriminator's ``.grad`` through
    the fake pass, so the caller must zero them before the discriminator step.

    Args:
        config: Run configuration; reads ``model.method``, ``loss`` and ``mask.hole_weight``.
        x: Images the generator saw ``[B, C, H, W]``, masked for method 5; only its shape is checked.
        target: Clean images ``[B, C, H, W]``.
        out: Generator output for ``x``.
        discriminator: Discriminator returning ``DiscriminatorOutput``, in training mode.
        noise_std: Instance noise std for this epoch, see :func:`instance_noise_std`.
        hole_mask: Boolean ``[B, 1, H, W]``, True inside the holes; weights the L1 term.
        generator: Random generator for the instance noise; torch's global one when None.

    Returns:
        ``(loss, parts)``: the scalar loss with its graph, and detached scalars ``adv``,
        ``con`` and either ``enc`` (GANomaly) or ``lat`` (Skip-GANomaly), before weighting.
    """
    x_hat = out.x_hat
    _check_same_shape(x=x, target=target, x_hat=x_hat)
    loss_cfg = config.loss

    fake = discriminator(add_instance_noise(x_hat, noise_std, generator))
    real_features = None
    if loss_cfg.adversarial_loss == "feature_matching" or config.architecture == "skip":
        with torch.no_grad():
            real_features = discriminator(add_instance_noise(target, noise_std, generator)).features

    if loss_cfg.adversarial_loss == "feature_matching":
        adv = F.mse_loss(fake.features, real_features)
    else:
        adv = F.binary_cross_entropy_with_logits(fake.logits, torch.ones_like(fake.logits))
    con = _reconstruction_l1(config, target, x_hat, hole_mask)
    parts = {"adv": adv.detach(), "con": con.detach()}

    if config.architecture == "ganomaly":
        if out.z is None or out.z_hat is None:
            raise ValueError(
                f"method {config.model.method} needs a generator output with z and z_hat, got None"
            )
        enc = F.mse_loss(out.z_hat, out.z)
        parts["enc"] = enc.detach()
        loss = loss_cfg.w_adv * adv + loss_cfg.w_con * con + loss_cfg.w_enc * enc
    else:
        lat = F.mse_loss(fake.features, real_features)
        parts["lat"] = lat.detach()
        loss = loss_cfg.w_adv * adv + loss_cfg.w_con * con + loss_cfg.w_lat * lat
    return loss, parts


def discriminator_loss(
    config: Config,
    target: torch.Tensor,
    x_hat: torch.Tensor,
    discriminator: nn.Module,
    noise_std: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute the discriminator's BCE loss on a real and a generated batch.

    The loss is the mean of BCE(D(target), real targets) and BCE(D(x_hat), fake targets).
    ``x_hat`` is detached here, so the loss never reaches the generator. Targets come from
    :func:`label_targets` and both inputs get instance noise of std ``noise_std``.

    NOTE: a BCE term cannot fall below the binary entropy of its target. With the default
    soft label ranges that floor averages 0.39, so a re-initialisation threshold of 1e-5
    on this loss never fires for methods 2 and 3.

    Args:
        config: Run configuration; reads ``loss``.
        target: Real images ``[B, C, H, W]``.
        x_hat: Generated images ``[B, C, H, W]``.
        discriminator: Discriminator returning ``DiscriminatorOutput``, in training mode.
        noise_std: Instance noise std for this epoch.
        generator: Random generator for targets and noise; torch's global one when None.

    Returns:
        ``(loss, parts)``: the scalar loss with its graph, and detached scalars ``d_real`` and
        ``d_fake`` (mean sigmoid outputs) and ``d_loss_real`` and ``d_loss_fake`` (the two BCE terms).
    """
    _check_same_shape(target=target, x_hat=x_hat)
    real_targets, fake_targets = label_targets(config.loss, target.shape[0], target.device, generator)

    real_logits = discriminator(add_instance_noise(target, noise_std, generator)).logits
    fake_logits = discriminator(add_instance_noise(x_hat.detach(), noise_std, generator)).logits
    loss_real = F.binary_cross_entropy_with_logits(real_logits, real_targets.to(real_logits.dtype))
    loss_fake = F.binary_cross_entropy_with_logits(fake_logits, fake_targets.to(fake_logits.dtype))
    loss = 0.5 * (loss_real + loss_fake)

    parts = {
        "d_real": torch.sigmoid(real_logits).mean().detach(),
        "d_fake": torch.sigmoid(fake_logits).mean().detach(),
        "d_loss_real": loss_real.detach(),
        "d_loss_fake": loss_fake.detach(),
    }
    return loss, parts
