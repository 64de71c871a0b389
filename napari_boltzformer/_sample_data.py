"""napari sample data: the procedural phantoms of boltzformer.synth.sample with their ground truth.

Each sample is an image layer (HU for CT, arbitrary units for MR, physical geometry) and a
labels layer with the lesions the phantom was built with.
"""

from __future__ import annotations

import functools

import numpy as np

from ._layers import GEOMETRY_KEY, GROUND_TRUTH_COLOR, GROUND_TRUTH_PREFIX, ROLE_KEY, image_layer_data, mask_colormap

# Display window of each CT sample (lesions are easiest to see in it); None: percentiles (MR).
SAMPLE_WINDOWS = {"chest_ct": "lung", "brain_mri": None}
SAMPLE_NAMES = {"chest_ct": "synthetic chest CT", "brain_mri": "synthetic brain MRI"}
SAMPLE_SEQUENCES = {"brain_mri": "FLAIR"}  # the MR sequence a sample imitates (shown with its intensities)


def chest_ct():
    return sample_layers("chest_ct")


def brain_mri():
    return sample_layers("brain_mri")


def sample_layers(key: str) -> list[tuple]:
    """[image layer data, ground-truth labels layer data] of sample `key`.

    The labels layer is named after the sample's prompt and drawn in green (masks made by the
    panel never are); the panel shows it as an outline, above its own layers.
    """
    case = _case(key)
    volume = case.volume().with_array(case.image.copy())  # the layers own their arrays: the cache stays clean
    image = image_layer_data(volume, name=SAMPLE_NAMES.get(key, key), window=SAMPLE_WINDOWS.get(key))
    if key in SAMPLE_SEQUENCES:
        image[1]["metadata"][GEOMETRY_KEY]["sequence"] = SAMPLE_SEQUENCES[key]
    truth = ground_truth(case)
    labels = (
        truth,
        {
            "name": f"{GROUND_TRUTH_PREFIX}{case.prompt}",
            "metadata": {GEOMETRY_KEY: volume.geometry_dict(), ROLE_KEY: "ground truth"},
            "colormap": mask_colormap(GROUND_TRUTH_COLOR),
            "opacity": 1.0,  # the panel draws it as an outline (napari takes `contour` only after creation)
            "axis_labels": ("z", "y", "x"),
            "units": "mm",
            **volume.napari_transform(),
        },
        "labels",
    )
    return [image, labels]


def ground_truth(case) -> np.ndarray:
    """uint8 (z, y, x) mask of what the sample's prompt asks for (its target), a copy of its own."""
    return np.array(case.mask_volume().array, dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _case(key: str):
    """Sample `key`, built once per session: the chest phantom takes 1.3 s to build, on the main
    thread, each time the sample was opened."""
    from boltzformer.synth.sample import SAMPLES

    return SAMPLES[key]()
