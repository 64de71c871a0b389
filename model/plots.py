"""Figures (the training curves, the benchmark plots) through matplotlib, an optional extra:
``pip install 'napari-boltzformer[plots]'``. Nothing else in the package needs it.
"""

from __future__ import annotations

from .errors import BoltzformerError

MISSING = "this writes a figure and needs matplotlib: pip install 'napari-boltzformer[plots]'"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; BoltzformerError (one line) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise BoltzformerError(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int) -> None:
    """Write `fig` to `path` whole or not at all (a temporary file beside it, then renamed), and
    close it."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
