"""The few lines every evaluation plot shares: matplotlib without a screen, and saving."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig, ax, path: str, title: str, ylabel: str, legend: bool = True) -> str:
    """Title, y label, grid and legend of `ax`; save `fig` to `path`, close it, return path."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def annotated_heatmap(values, labels, xticks: list[str], yticks: list[str], path: str, title: str, xlabel: str,
                      colorbar: str, cmap: str = "viridis", text_color=lambda v: "white") -> str:
    """values [rows, columns] as a heatmap, each cell annotated with labels[i][j]."""
    plt = pyplot()
    rows, cols = len(yticks), len(xticks)
    fig, ax = plt.subplots(figsize=(1.8 + 1.1 * cols, 1.2 + 0.45 * rows), dpi=120)
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color=text_color(values[i][j]))
    ax.set_xticks(range(cols), xticks, fontsize=7, rotation=20)
    ax.set_yticks(range(rows), yticks, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
