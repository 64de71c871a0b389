"""boltzformer: the headless core of napari-boltzformer.

Text-prompted segmentation of small lesions in CT and MRI volumes with a BoltzFormer network
(Boltzmann-sampled sparse attention, CVPR 2025). This package never imports Qt.

Typical use::

    from boltzformer import Segmenter, read_volume
    volume = read_volume("chest.nii.gz")
    result = Segmenter.from_pretrained().segment_volume(volume, "lung nodule")
    result.mask  # uint8 (z, y, x), same geometry as `volume`
"""

from ._version import __version__

__all__ = ["__version__", "Segmenter", "read_volume", "write_volume", "Volume"]


def __getattr__(name):  # lazy imports keep `import boltzformer` cheap (no torch until needed)
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    if name in ("read_volume", "write_volume", "Volume"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'boltzformer' has no attribute {name!r}")
