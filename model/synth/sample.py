"""The bundled demo cases, generated on demand (deterministic by seed).

`SAMPLES["chest_ct"]()` is a synthetic chest CT (boltzformer.synth.lung3d: vessel and airway
trees that run through the slices) with four to six lung nodules of 4-20 mm;
`SAMPLES["brain_mri"]()` a synthetic FLAIR brain MRI with MS-like lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import mri
from .lung3d import chest_phantom


@dataclass
class SampleCase:
    name: str
    image: np.ndarray  # (z, y, x): int16 HU for CT, float32 for MR
    masks: dict  # target key -> uint8 (z, y, x)
    spacing_mm: tuple  # (x, y, z)
    origin_mm: tuple
    modality: str
    prompt: str
    target: str  # the mask key that `prompt` asks for

    def volume(self):
        from ..io import Volume

        return Volume(self.image, tuple(self.spacing_mm), tuple(self.origin_mm), np.eye(3), self.modality, None,
                      {"sample": self.name})

    def mask_volume(self, key: str | None = None):
        from ..io import Volume

        m = self.masks.get(key or self.target, np.zeros(self.image.shape, np.uint8))
        return Volume(m.astype(np.uint8), tuple(self.spacing_mm), tuple(self.origin_mm), np.eye(3), self.modality, None,
                      {"sample": self.name, "target": key or self.target})


# Phantom seeds of the demo: in the range never drawn for training (data.RESERVED_PHANTOM_SEEDS)
# and outside the evaluation sets (80000-80019, 90000-90019).
DEMO_PHANTOM_SEED = 99_000


def sample_chest_ct(seed: int = 0) -> SampleCase:
    """The demo chest CT. x and y are centred on the volume; z runs from the top slice at 0 mm
    down to -157.5 mm, so a nodule's world z is its `Nodule.center_mm` z (mm from the volume
    centre) - 78.75 mm."""
    ph = chest_phantom(DEMO_PHANTOM_SEED + seed, shape_zyx=(64, 256, 256), spacing_mm=(1.4, 1.4, 2.5),
                       n_nodules=(4, 6), nodule_diameter_mm=(4.0, 20.0))
    origin = (-1.4 * 127.5, -1.4 * 127.5, -2.5 * 63)
    return SampleCase("chest_ct", ph.image, ph.masks, ph.spacing_mm, origin, "CT", "lung nodule", "lung_nodule")


def sample_brain_mri(seed: int = 0) -> SampleCase:
    v = mri.brain_volume(seed + 5, shape_zyx=(24, 256, 256), spacing_mm=(0.9, 0.9, 3.0), contrast="flair")
    origin = (-0.9 * 127.5, -0.9 * 127.5, -3.0 * 23)
    return SampleCase("brain_mri", v.image, v.masks, v.spacing_mm, origin, "MR", "multiple sclerosis lesion", "ms_lesion")


SAMPLES = {"chest_ct": sample_chest_ct, "brain_mri": sample_brain_mri}
