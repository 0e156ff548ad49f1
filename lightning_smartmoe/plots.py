"""Figures of a run, drawn off-screen with matplotlib (no pyplot, no global backend): the expert-load heatmap and the
end-of-run training curves."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_smartmoe.placement import Placement

DPI = 100
HEATMAP_WIDTH_IN = 8.0


def heatmap_size_px(num_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of `expert_load_figure` for `num_layers` MoE layers."""
    return round(HEATMAP_WIDTH_IN * DPI), round((2.0 + 0.5 * num_layers) * DPI)


def expert_load_figure(load: torch.Tensor, placements: Sequence[Placement], step: int) -> Figure:
    """MoE layers x expert slots: each cell is the share of its layer's routed tokens that the slot's expert
    computes (a replicated expert's load split evenly over its replicas), labelled with the expert it holds; empty
    slots are grey. Slots are grouped by rank, with the current placement's rank boundaries drawn as red lines.
    Each row label gives the layer's rank imbalance (busiest rank's tokens over the mean rank's).

    Args:
        load: [layers, max experts] token counts.
        placements: each layer's current placement (the same ep and slots per rank for all).
    """
    layers = len(placements)
    spr, ep = placements[0].slots_per_rank, placements[0].ep
    share = np.full((layers, ep * spr), np.nan)
    labels = []
    for i, placement in enumerate(placements):
        row = load[i, : placement.num_experts].double()
        total = float(row.sum()) or 1.0
        replicas = placement.num_replicas.double()
        for slot, expert in enumerate(placement.slot_expert):
            if expert >= 0:
                share[i, slot] = float(row[expert] / replicas[expert]) / total
        labels.append(f"layer {i}\nimbalance {placement.rank_imbalance(row):.2f}")
    width, height = heatmap_size_px(layers)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0.16, 0.22, 0.68, 0.62))
    cmap = colormaps["viridis"].with_extremes(bad="0.85")  # empty slots light grey
    image = ax.imshow(np.ma.masked_invalid(share), aspect="auto", cmap=cmap, vmin=0.0)
    top_share = np.nanmax(share) if np.isfinite(share).any() else 1.0
    if layers * ep * spr <= 512:
        for (i, slot), value in np.ndenumerate(share):
            if not math.isnan(value):
                color = "black" if value > 0.6 * top_share else "white"
                ax.text(slot, i, str(placements[i].slot_expert[slot]), ha="center", va="center", fontsize=7, color=color)
    for r in range(1, ep):
        ax.axvline(r * spr - 0.5, color="red", linewidth=2.5)
    ax.set_yticks(range(layers), labels, fontsize=7)
    ax.set_xticks(range(ep * spr), [str(s % spr) for s in range(ep * spr)], fontsize=7)
    ax.set_xlabel("expert slot within its rank (number: expert held; red lines: rank boundaries; grey: empty)", fontsize=8)
    ax.set_ylabel("MoE layer", fontsize=8)
    top = ax.secondary_xaxis("top")
    top.set_xticks([r * spr + (spr - 1) / 2 for r in range(ep)], [f"rank {r}" for r in range(ep)], fontsize=8)
    ax.set_title(f"expert load at step {step}", fontsize=10, pad=18)
    bar = fig.colorbar(image, cax=fig.add_axes((0.87, 0.22, 0.025, 0.62)))
    bar.set_label("share of the layer's routed tokens", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def training_curves_figure(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]],
    imbalance: Sequence[tuple[int, Sequence[float]]],
    switches: Sequence[int],
) -> Figure:
    """Left: training and validation loss over steps. Right: each MoE layer's rank imbalance over steps, with the
    steps at which a placement switch happened marked.

    Args:
        train, val: (step, loss) pairs.
        imbalance: (step, [one value per layer]) pairs.
        switches: steps with at least one placement switch.
    """
    fig = Figure(figsize=(11, 4), dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, imb_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot(*zip(*train), label="train/loss", linewidth=1)
    if val:
        loss_ax.plot(*zip(*val), "o-", label="val/loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy (nats)")
    loss_ax.set_title("loss over the global batch")
    loss_ax.legend()
    if imbalance:
        steps = [s for s, _ in imbalance]
        values = np.array([v for _, v in imbalance])
        for layer in range(values.shape[1]):
            imb_ax.plot(steps, values[:, layer], linewidth=1, label=f"layer {layer}")
        imb_ax.legend(fontsize=7)
    for i, step in enumerate(switches):
        imb_ax.axvline(step, color="grey", linestyle=":", label="placement switch" if i == 0 else None)
    imb_ax.set_xlabel("step")
    imb_ax.set_ylabel("busiest rank's tokens / mean rank's")
    imb_ax.set_title("rank imbalance per MoE layer (dotted: switches)")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at its own pixel size, via a temporary name, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas = FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.print_png(str(tmp))
    tmp.replace(path)
    return path


def rgb(fig: Figure) -> np.ndarray:
    """[height, width, 3] uint8 pixels of `fig` (for TensorBoard's add_image with dataformats="HWC")."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
