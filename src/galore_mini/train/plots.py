"""Figures for a comparison: loss curves of every method, and weights + optimizer memory per method.

matplotlib runs on the ``Agg`` backend (files only, no display needed) and is
imported inside the functions so that ``import galore_mini`` stays light.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from galore_mini.methods import label as registry_label

MIB = 2 ** 20


def label(method: str) -> str:
    """The name the paper's tables use for `method` (from :mod:`galore_mini.methods`)."""
    return registry_label(method)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict[str, Iterable[dict[str, Any]]], path: str, title: str = "") -> None:
    """``loss.png``: training loss (thin) and validation loss (dots) against tokens, one colour per method.

    `curves` maps a method to its ``metrics.jsonl`` records. The right panel zooms on the
    second half of training, where the methods separate.
    """
    plt = _pyplot()
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_tokens = 0
    for i, (method, records) in enumerate(curves.items()):
        records = list(records)
        colour = colours[i % len(colours)]
        train = [(r["tokens"] / 1e6, r["loss"]) for r in records if r.get("kind") == "train"
                 and math.isfinite(r.get("loss", math.nan))]
        val = [(r["tokens"] / 1e6, r["val_loss"]) for r in records if r.get("kind") == "eval"
               and math.isfinite(r.get("val_loss", math.nan))]
        max_tokens = max([max_tokens] + [t for t, _ in train + val])
        for ax in (ax_all, ax_zoom):
            if train:
                ax.plot(*zip(*train), color=colour, alpha=0.35, linewidth=1)
            if val:
                ax.plot(*zip(*val), color=colour, marker="o", markersize=4, linewidth=1.8,
                        label=f"{label(method)} (val {val[-1][1]:.3f})")
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    ax_all.set_title(title or "training (thin) and validation (dots) loss")
    ax_zoom.set_title("second half")
    if max_tokens:
        ax_zoom.set_xlim(max_tokens / 2, max_tokens * 1.02)
        late = [v for method_records in curves.values() for r in method_records
                for v in ([r.get("loss")] if r.get("kind") == "train" else [r.get("val_loss")])
                if r.get("tokens", 0) / 1e6 >= max_tokens / 2 and v is not None and math.isfinite(v)]
        if late:
            low, high = min(late), max(late)
            pad = 0.05 * (high - low or 1.0)
            ax_zoom.set_ylim(low - pad, high + pad)
    ax_zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """``memory.png``: one stacked bar per method, weights below optimizer state, in MiB (measured)."""
    plt = _pyplot()
    methods = [r["method"] for r in results]
    weights = [r["weights_bytes"] / MIB for r in results]
    state = [r["optimizer_bytes"] / MIB for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) + 2), 4.5))
    xs = range(len(methods))
    ax.bar(xs, weights, label="weights", color="#4c72b0")
    ax.bar(xs, state, bottom=weights, label="optimizer state", color="#dd8452")
    for x, w, s in zip(xs, weights, state):
        ax.text(x, w + s, f"{w + s:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [label(m) for m in methods], rotation=20, ha="right")
    ax.set_ylabel("MiB (measured on the live model and optimizer)")
    ax.set_title(title or "weights + optimizer state")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
