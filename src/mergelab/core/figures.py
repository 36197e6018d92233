"""The package's figure helpers: a headless pyplot, atomic PNG writes, an annotated heatmap.

Every PNG mergelab writes (reports, analyses, learned coefficients) goes through :func:`save_figure`, so
a figure is never left half-written.
"""

from __future__ import annotations

import io as _io
import os
from pathlib import Path
from typing import Any

from mergelab.core.io import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` as PNG at ``path`` atomically (folders created), then close it."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def heatmap(ax, matrix: Any, rows, cols, title: str, fmt: str = "{:.2f}", cmap: str = "viridis", **imshow: Any):
    """An annotated heatmap of ``matrix`` (rows x cols) on ``ax``; returns the image (for a colorbar)."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    im = ax.imshow(m, cmap=cmap, **imshow)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    lo, hi = imshow.get("vmin", m.min() if m.size else 0), imshow.get("vmax", m.max() if m.size else 0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < (hi + lo) / 2 else "black")
    ax.set_title(title, fontsize=10)
    return im
