"""Figures: reconstruction grids, ROC curves, score histograms and anomaly-map overlays.

Every function renders to PNG bytes and writes them through ``storage`` so a
run folder on S3 gets the same files as a local one.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from anomaly.data import storage  # noqa: E402


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] to [B, H, W, 3] uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = array.permute(0, 2, 3, 1).numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def _save_figure(fig: plt.Figure, url: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buffer.getvalue())


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, url: str,
                        captions: Sequence[str] | None = None, columns: int = 8) -> None:
    """Write input, reconstruction and absolute difference rows, in blocks of ``columns`` images."""
    originals = to_uint8(inputs)
    recons = to_uint8(reconstructions)
    diff = np.abs(originals.astype(np.int16) - recons.astype(np.int16)).astype(np.uint8)
    count = originals.shape[0]
    columns = max(1, min(columns, count))
    blocks = -(-count // columns)
    fig, axes = plt.subplots(3 * blocks, columns, figsize=(1.7 * columns, 5.4 * blocks), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for index in range(count):
        block, col = divmod(index, columns)
        for row, (title, images) in enumerate((("input", originals), ("output", recons), ("|diff|", diff))):
            ax = axes[3 * block + row][col]
            ax.imshow(images[index])
            ax.set_frame_on(True)
            if col == 0:
                ax.set_ylabel(title)
        if captions:
            axes[3 * block][col].set_title(captions[index], fontsize=7)
    fig.tight_layout()
    _save_figure(fig, url)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], url: str, title: str = "ROC") -> None:
    """Write ROC curves, one per name, each from (labels, scores)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, url)


def score_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None, url: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    for value, name in ((0, "normal"), (1, "anomalous")):
        chosen = scores[labels == value]
        if chosen.size:
            ax.hist(chosen, bins=bins, alpha=0.6, label=f"{name} ({chosen.size})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label="threshold (fitted on val)")
    ax.set_xlabel("anomaly score (higher is more anomalous)")
    ax.set_ylabel("images")
    ax.legend()
    _save_figure(fig, url)


def overlay_png(image: torch.Tensor, heatmap: torch.Tensor, vmax: float) -> bytes:
    """Blend an anomaly map over its image; ``vmax`` fixes the colour scale across images."""
    base = to_uint8(image.unsqueeze(0))[0].astype(np.float32) / 255.0
    values = np.clip(heatmap.detach().float().cpu().numpy() / max(vmax, 1e-12), 0.0, 1.0)
    colours = plt.get_cmap("jet")(values)[..., :3]
    blended = (0.55 * base + 0.45 * colours) * 255.0
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_grid(images: torch.Tensor, maps: torch.Tensor, captions: Sequence[str], url: str) -> None:
    """Write a grid of images above their anomaly-map overlays, on one shared colour scale."""
    vmax = float(maps.max().item()) if maps.numel() else 1.0
    count = images.shape[0]
    fig, axes = plt.subplots(2, count, figsize=(2.0 * count, 4.4), squeeze=False)
    originals = to_uint8(images)
    for col in range(count):
        overlay = np.array(Image.open(io.BytesIO(overlay_png(images[col], maps[col], vmax))))
        axes[0][col].imshow(originals[col])
        axes[1][col].imshow(overlay)
        axes[0][col].set_title(captions[col], fontsize=7)
        for row in range(2):
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
    _save_figure(fig, url)
