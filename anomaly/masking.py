"""Square holes for training Skip-GANomaly as an image completion network (method 5)."""

from __future__ import annotations

import torch


def random_holes(
    batch: int,
    image_size: int,
    num_masks: int,
    mask_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num_masks`` square holes per image at uniformly random positions.

    Each hole lies wholly inside the image; holes of the same image may overlap.

    Args:
        batch: Number of images.
        image_size: Side of the square images in pixels.
        num_masks: Holes per image.
        mask_size: Side of each hole in pixels, at most ``image_size``.
        device: Device of the returned mask.
        generator: Random generator for the positions; torch's global one when None.
            Positions are drawn on the generator's device and then moved to ``device``.

    Returns:
        Boolean mask ``[batch, 1, image_size, image_size]``, True inside a hole.

    Raises:
        ValueError: If ``mask_size`` is not between 1 and ``image_size`` or ``num_masks`` is negative.
    """
    if not 0 < mask_size <= image_size:
        raise ValueError(
            f"invalid mask_size {mask_size}: expected 1 to image_size ({image_size}); set mask.mask_size"
        )
    if num_masks < 0:
        raise ValueError(f"invalid num_masks {num_masks}: expected 0 or more; set mask.num_masks")

    draw_device = generator.device if generator is not None else torch.device(device)
    # randint's upper bound is exclusive, so corners run from 0 to image_size - mask_size inclusive.
    corners = torch.randint(
        0, image_size - mask_size + 1, (batch, num_masks, 2), generator=generator, device=draw_device
    ).to(device)
    top = corners[..., 0, None]  # [B, M, 1]
    left = corners[..., 1, None]
    pixels = torch.arange(image_size, device=device)
    rows = (pixels >= top) & (pixels < top + mask_size)  # [B, M, H]
    cols = (pixels >= left) & (pixels < left + mask_size)  # [B, M, W]
    holes = rows[..., :, None] & cols[..., None, :]  # [B, M, H, W]
    return holes.any(dim=1, keepdim=True)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """Return a copy of ``x`` with the pixels where ``mask`` is True set to ``fill``.

    Args:
        x: Images ``[B, C, H, W]``.
        mask: Boolean mask ``[B, 1, H, W]``, or any shape that broadcasts to ``x``.
        fill: Value written into the holes, in the units of ``x`` (0 is mid-grey in [-1, 1]).

    Raises:
        ValueError: If ``mask`` is not boolean or does not broadcast to the shape of ``x``.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"invalid mask dtype {mask.dtype}: expected torch.bool (True inside a hole)")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not broadcast to image shape {tuple(x.shape)}"
        ) from exc
    if shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} would enlarge image shape {tuple(x.shape)}")
    return torch.where(mask, torch.as_tensor(fill, dtype=x.dtype, device=x.device), x)
