"""napari plugin of boltzformer: the BoltzFormer panel, a reader, a writer and sample data.

Importing this package (and the reader, writer and sample data modules) never imports torch,
so napari starts fast; the model loads the first time the panel runs it.
"""

from boltzformer._version import __version__

__all__ = ["__version__"]
