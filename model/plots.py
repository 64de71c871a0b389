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
