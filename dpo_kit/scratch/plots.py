"""Figures for notebooks/00_dpo_from_scratch: training curves side by side, and what beta does.

Kept out of the notebook so its cells stay free of function definitions. matplotlib is imported
inside the functions so `import dpo_kit.scratch.plots` costs nothing until a figure is drawn.
"""

from __future__ import annotations

import math
from itertools import cycle
from pathlib import Path

import torch

from dpo_kit.scratch.loss import dpo_loss


def plot_training_curves(
    histories: dict[str, list[dict]],
    path: str | Path | None = None,
    metrics: tuple[str, ...] = ("loss", "rewards/margins"),
):
    """One panel per metric, one line per run (label -> per-step history); saved to `path` as PNG."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        # The styles repeat: zipped against the four of them, a fifth run was dropped from the figure without a word.
        for (label, history), style in zip(histories.items(), cycle(("-o", "--x", ":s", "-.^"))):
            ax.plot([entry["step"] for entry in history], [entry[metric] for entry in history],
                    style, markersize=3, label=label)
        ax.set(title=metric, xlabel="optimizer step")
        if metric == "loss" and any(history and abs(history[0]["loss"] - math.log(2)) < 1e-3 for history in histories.values()):
            # Where a sigmoid or robust run starts (policy == reference); a curve parked here is not learning.
            # IPO and hinge start elsewhere ((1/(2 beta))^2 and 1), where this line would mark nothing.
            ax.axhline(math.log(2), color="gray", linewidth=0.8, linestyle=":", label="ln 2")
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_beta_effect(
    sweep: list[dict[str, float]],
    mean_log_ratio: float,
    path: str | Path | None = None,
):
    """Left: the implicit-reward margin of fixed log-probs at each beta (it is beta * h, a line).
    Right: the sigmoid loss -log sigma(beta h) against h for each beta, with the observed mean h marked:
    a large beta saturates after a small log-ratio gain, a small beta keeps pushing pi away from pi_ref.
    """
    import matplotlib.pyplot as plt

    betas = [row["beta"] for row in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(betas, [row["rewards/margins"] for row in sweep], "-o")
    left.set(title="implicit reward margin  beta * h", xlabel="beta", ylabel="rewards/margins")

    half_width = 1.5 * abs(mean_log_ratio) + 5  # wide enough to show the trained h and both tails
    h = torch.linspace(-half_width, half_width, 400)
    zeros = torch.zeros_like(h)
    for beta in betas:
        losses, _, _ = dpo_loss(h, zeros, zeros, zeros, beta=beta)
        right.plot(h.tolist(), losses.tolist(), label=f"beta = {beta}")
    right.axvline(mean_log_ratio, color="gray", linestyle=":", label=f"trained h = {mean_log_ratio:.1f}")
    right.set(title="sigmoid DPO loss  -log sigma(beta h)", xlabel="h = log-ratio gain over the reference (nats)")
    right.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
