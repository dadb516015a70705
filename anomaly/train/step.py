"""One adversarial training step: the generator first, then the discriminator.

The order and the detach matter under DistributedDataParallel. The generator
step runs the discriminator without its DDP wrapper: its gradients there are
thrown away by ``opt_d.zero_grad`` anyway, and with feature matching the
discriminator's last conv gets no gradient at all, which DDP would reject at
the next forward. The discriminator step receives the generated batch detached, so
no graph is reused across the two steps; reusing one silently lets generator
weights drift apart between ranks with gloo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from anomaly.config import Config
from anomaly.losses import discriminator_loss, generator_loss
from anomaly.masking import apply_mask, random_holes
from anomaly.models import init_weights


@dataclass
class Networks:
    """The two networks as the training step uses them (possibly DDP-wrapped) and their optimizers."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        return getattr(module, "module", module)


def build_optimizers(config: Config, generator: nn.Module, discriminator: nn.Module
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    betas = (config.optim.beta1, config.optim.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.optim.lr_g, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.optim.lr_d, betas=betas)
    return opt_g, opt_d


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def reinitialise_discriminator(discriminator: nn.Module, seed: int) -> None:
    """Re-draw the discriminator's weights identically on every rank."""
    bare = Networks.unwrap(discriminator)
    devices = [p.device for p in bare.parameters()]
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"][:1]):
        torch.manual_seed(seed)
        bare.apply(init_weights)
    if dist.is_available() and dist.is_initialized():
        # Belt and braces: the same seed gives the same weights, but broadcast
        # anyway so a device-specific RNG can never split the ranks.
        for tensor in list(bare.parameters()) + list(bare.buffers()):
            dist.broadcast(tensor.data, src=0)


def _autocast(config: Config, device: torch.device) -> torch.autocast:
    # bfloat16 has float32's exponent range, so no gradient scaling is needed.
    # The losses stay float32: autocast runs MSE and BCE-with-logits in float32, and
    # the L1 term subtracts from a float32 target.
    # NOTE: bf16 training has run on CPU only. Its speed and stability on CUDA are unmeasured.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16")


def train_step(config: Config, nets: Networks, x: torch.Tensor, noise_std: float,
               rng: torch.Generator, step_seed: int) -> dict[str, float]:
    """Run one generator and one discriminator update on the batch ``x`` [B, C, H, W].

    Returns per-step scalars; ``d_reinit`` is 1.0 when the discriminator loss fell
    below ``loss.d_reinit_threshold`` and the discriminator was re-initialised.
    """
    holes = None
    seen = x
    if config.model.method == 5:
        holes = random_holes(x.shape[0], x.shape[-1], config.mask.num_masks, config.mask_size, x.device, rng)
        seen = apply_mask(x, holes, config.mask.mask_fill)

    # Generator step
    with _autocast(config, x.device):
        out = nets.generator(seen)
        loss_g, parts_g = generator_loss(config, seen, x, out, Networks.unwrap(nets.discriminator),
                                         noise_std, holes)
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    nets.opt_g.step()

    # Discriminator step
    with _autocast(config, x.device):
        loss_d, parts_d = discriminator_loss(config, x, out.x_hat, nets.discriminator, noise_std, rng)
    nets.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    nets.opt_d.step()

    metrics = {"loss_g": float(loss_g.detach().item()), "loss_d": _mean_across_ranks(loss_d)}
    for name, value in {**parts_g, **parts_d}.items():
        metrics[name] = float(value.detach().item())
    if not (math.isfinite(metrics["loss_g"]) and math.isfinite(metrics["loss_d"])):
        raise FloatingPointError(
            f"non-finite loss (loss_g={metrics['loss_g']}, loss_d={metrics['loss_d']}): training diverged; "
            "lower optim.lr_g / optim.lr_d or check the input images"
        )
    metrics["d_reinit"] = 0.0
    if metrics["loss_d"] < config.loss.d_reinit_threshold:
        # The mean across ranks decides, so every rank takes the same branch.
        reinitialise_discriminator(nets.discriminator, step_seed)
        metrics["d_reinit"] = 1.0
    return metrics
