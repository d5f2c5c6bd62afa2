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
