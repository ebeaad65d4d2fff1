"""Plots written during training (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_drop_rates(entry: dict, path: str | Path) -> Path:
    """Per-layer drop rates of the attention and MLP branches, and their sensitivities (the paper's Fig. 6a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_gpt.utils import atomic_path

    rates = entry["drop_rates"]
    layers = list(range(len(rates) // 2))
    sensitivities = entry.get("sensitivities")
    rows = 2 if sensitivities else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.25 * len(layers) + 3), 3.2 * rows), squeeze=False)
    width = 0.4
    ax = axes[0][0]
    ax.bar([l - width / 2 for l in layers], rates[0::2], width, label="attention")
    ax.bar([l + width / 2 for l in layers], rates[1::2], width, label="MLP")
    ax.axhline(entry["target_drop_rate"], color="gray", linestyle="--", linewidth=1, label="target")
    ax.set(ylabel="drop rate", ylim=(0, 1), title=f"DropBP drop rates at step {entry['step']} ({entry['allocator']})")
    ax.legend(loc="upper right", fontsize=8)
    if sensitivities:
        ax = axes[1][0]
        ax.bar([l - width / 2 for l in layers], sensitivities[0::2], width, label="attention")
        ax.bar([l + width / 2 for l in layers], sensitivities[1::2], width, label="MLP")
        ax.set(ylabel=f"sensitivity ({entry['metric']})", yscale="log")
        ax.legend(loc="upper right", fontsize=8)
    for row in axes:
        row[0].set_xticks(layers[:: max(1, len(layers) // 16)])
    axes[-1][0].set_xlabel("layer")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
