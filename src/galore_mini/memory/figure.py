"""The paper's Figure 1 from estimates: stacked bars of weights, gradients, optimizer state (and activations)."""

from __future__ import annotations

from pathlib import Path

from galore_mini import methods
from galore_mini.errors import UsageError
from galore_mini.memory.estimate import DTYPE_BYTES, MemoryEstimate


def check_path(path: str, what: str = "path") -> None:
    """A `UsageError` naming `what` unless `path` can be written: its folder must exist."""
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                         "or write the figure elsewhere")


def plot(estimates: list[MemoryEstimate], path: str, title: str | None = None,
         budget_gib: float | None = 24.0) -> str:
    """Stacked bars per method (GiB) with a dashed line at `budget_gib`; writes `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not estimates:
        raise UsageError("plot: no estimates to draw")
    check_path(path)
    labels = [methods.get(e.method).short_label for e in estimates]
    series = [("weights", [e.weights_bytes for e in estimates], "#4C72B0"),
              ("gradients", [e.gradient_bytes for e in estimates], "#DD8452"),
              ("optimizer state", [e.optimizer_bytes for e in estimates], "#55A868")]
    if any(e.activation_bytes for e in estimates):
        series.append(("activations", [e.activation_bytes or 0 for e in estimates], "#8172B3"))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.05 * len(estimates) + 2), 4.8))
    bottom = [0.0] * len(estimates)
    for name, values, color in series:
        gib = [v / 2 ** 30 for v in values]
        ax.bar(labels, gib, bottom=bottom, label=name, color=color, width=0.65)
        bottom = [b + g for b, g in zip(bottom, gib)]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    if budget_gib:
        ax.axhline(budget_gib, color="0.3", linestyle="--", linewidth=1, label=f"{budget_gib:g} GiB (RTX 4090)")
    first = estimates[0]
    rank = next((e.rank for e in estimates if e.rank is not None), None)
    extras = [f"{first.dtype} weights"] + ([f"rank {rank}"] if rank else [])
    if first.world_size > 1:
        extras.append(f"per rank, FSDP2 at {first.world_size} ranks")
    if any(e.layerwise for e in estimates):
        extras.append("layer-wise updates")
    if any(e.activation_bytes for e in estimates):
        extras.append(f"batch {first.batch_size} × seq {first.seq_len}")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title or f"{first.model}: training memory by method ({', '.join(extras)})", fontsize=10)
    ours = sorted({e.state_dtype for e in estimates if e.state_dtype in DTYPE_BYTES}) or ["fp32"]
    torch_adamw = ", ".join(m.short_label for m in methods.REGISTRY.values() if m.optimizer == "AdamW")
    fig.text(0.01, 0.01, f"as allocated: torch AdamW's state ({torch_adamw}) in its parameters' "
             f"dtype ({first.dtype}; peft's LoRA adapters fp32); the other optimizers' state {'/'.join(ours)}, "
             "8-bit moments where named", fontsize=7, color="0.35")
    ax.set_ylim(0, max(bottom + [budget_gib or 0]) * 1.2)  # headroom for the legend row
    ax.legend(loc="upper center", fontsize=8, ncol=len(series) + (1 if budget_gib else 0), frameon=False)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
