"""Learned 3D false-positive reduction: is this candidate a nodule or a vessel?

The slice-wise model marks a nodule and, in a real chest CT, a hundred vessel cross-sections and
airway walls with it. Hand-written 3D measures (boltzformer.fp_filter) keep candidates that lie
in the lung but cannot tell a nodule touching a vessel from the vessel. Nodule-detection systems
settle this with a second stage, a small 3D network that looks at a cube of CT around each
candidate; this module is that stage.

Each candidate is cut out as a patch on a fixed physical grid, whatever the scan's spacing. The
bundled filter's network reads COARSE patches: PATCH_SHAPE = 16 x 32 x 32 voxels (z, y, x) of
PATCH_SPACING_MM = 2 x 1.25 x 1.25 mm, i.e. 32 x 40 x 40 mm (its first layer then pools to about
2 mm voxels), centred on the candidate's thickest point (the voxel deepest inside it, in mm):
a nodule that the slice model merged with the vessels it touches is one large component whose
centroid can lie anywhere along the vessels, but its thickest point is the nodule. Channel 0 is the CT in a lung window
(HU_RANGE mapped to [0, 1]), channel 1 the candidate's own component (which object is meant,
when a patch holds several). CandidateNet maps 2 x 16 x 32 x 32 to one logit: nodule vs not.
A FINE network (arch "fine") reads 24 x 24 x 24 voxels of 1.25 mm (30 mm a side) and keeps that
resolution through its first two layers: a 3 mm nodule is 1.5 voxels across at 2 mm, about 2.4 at
1.25 mm. Which one a weights file holds, and so its patch geometry, is stored next to it.

Training (boltzformer.training.train_fp) uses candidates of the bundled slice model on 3D phantom chests
(boltzformer.synth.lung3d), never the evaluation phantoms or any real scan. The decision
threshold lives next to the weights (resources/fp-classifier.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from . import postprocess
from .devices import fast_layout
from .parallel import thread_map

PATCH_SHAPE = (16, 32, 32)  # z, y, x voxels
PATCH_SPACING_MM = (2.0, 1.25, 1.25)  # z, y, x
HU_RANGE = (-1000.0, 400.0)
WEIGHTS_NAME = "fp-classifier.safetensors"
PATCH_EXTENT_Z_MM = PATCH_SHAPE[0] * PATCH_SPACING_MM[0]  # 32 mm


@dataclass(frozen=True)
class PatchGeometry:
    """The physical grid a CandidateNet reads: shape_zyx voxels of spacing_mm_zyx."""

    shape_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]


COARSE = PatchGeometry(PATCH_SHAPE, PATCH_SPACING_MM)  # the bundled 3D filter's
FINE = PatchGeometry((24, 24, 24), (1.25, 1.25, 1.25))
GEOMETRIES = {"coarse": COARSE, "fine": FINE}  # by CandidateNet arch


def covers(shape_zyx, spacing_xyz) -> bool:
    """Whether a scan is deep enough to score its candidates: it must span the patch's z extent
    (PATCH_EXTENT_Z_MM, the COARSE one; FINE patches span 30 mm, so this serves both). In a
    single slice or a thin stack most of every patch lies outside the scan and reads as air,
    which the network never saw in training: it then calls every nodule a flat disc, not a nodule
    (on the 2D synthetic validation slices it dropped all 52 nodules)."""
    return shape_zyx[0] * float(spacing_xyz[2]) >= PATCH_EXTENT_Z_MM


def too_shallow(shape_zyx, spacing_xyz) -> str | None:
    """Why a scan is too thin for a CandidateNet (see `covers`), as the end of a sentence, or
    None when it is deep enough. The 3D filter and the 3D nodule detector both say it."""
    if covers(shape_zyx, spacing_xyz):
        return None
    return f"the scan spans {shape_zyx[0] * float(spacing_xyz[2]):g} mm along z, less than the {PATCH_EXTENT_Z_MM:g} mm"


class CandidateNet(nn.Module):
    """B x 2 x D x H x W (its `geometry`) -> B logits (nodule vs not). About 0.2 M parameters.

    arch "coarse": 16 x 32 x 32 patches, pooled in-plane at once to about 2 mm voxels;
    "fine": 24 x 24 x 24 patches of 1.25 mm, two convolutions at that resolution before pooling.
    Both cost about 0.16 G multiply-adds per patch (0.156 and 0.167)."""

    def __init__(self, width: int = 16, arch: str = "coarse"):
        super().__init__()
        if arch not in GEOMETRIES:
            raise ValueError(f"unknown CandidateNet arch {arch!r} (known: {', '.join(GEOMETRIES)})")
        self.arch = arch
        self.geometry = GEOMETRIES[arch]

        def conv(c_in, c_out):
            return [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]

        w = width
        if arch == "coarse":
            # One convolution at the two fine scales, two at the coarsest: a CPU trains it in minutes.
            self.features = nn.Sequential(
                *conv(2, w), nn.MaxPool3d((1, 2, 2)),  # 16 x 16 x 16: voxels of about 2 mm in every axis
                *conv(w, 2 * w), nn.MaxPool3d(2),  # 8 x 8 x 8
                *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.MaxPool3d(2),  # 4 x 4 x 4
            )
        else:
            self.features = nn.Sequential(
                *conv(2, w), *conv(w, w), nn.MaxPool3d(2),  # 12 x 12 x 12: 2.5 mm voxels
                *conv(w, 2 * w), nn.MaxPool3d(2),  # 6 x 6 x 6
                *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.MaxPool3d(2),  # 3 x 3 x 3
            )
        # Pooled to 2 x 2 x 2: where in the cube still counts (centre vs edge), little else.
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 8, 64),
                                  nn.ReLU(inplace=True), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))[:, 0]


def extract_patches(hu: np.ndarray, labels: np.ndarray | None, centroids_zyx, spacing_xyz, lesion_ids,
                    mask_of=None, geometry: PatchGeometry = COARSE) -> np.ndarray:
    """Patches around candidates -> N x 2 x D x H x W float32 (`geometry`'s shape).

    hu: (z, y, x) Hounsfield units on an axial grid; labels: int (z, y, x) components;
    centroids_zyx: N voxel positions; spacing_xyz: the grid's (x, y, z) spacing in mm (the
    Volume convention); lesion_ids: the component of each candidate. Trilinear for the CT,
    nearest for the component mask; outside the volume the CT reads as air.
    mask_of: instead of `labels`, a function (candidate index, box of the scan) -> the candidate's
    bool mask in that box, for masks that exist only around each candidate.
    """
    grid = patch_grid(spacing_xyz, geometry)
    out = np.zeros((len(lesion_ids), 2, *geometry.shape_zyx), np.float32)

    def fill(i_c_lid):
        i, c, lid = i_c_lid
        mask = None if mask_of is None else (lambda box: mask_of(i, box))
        fill_patch(out[i], hu, labels, c, lid, grid, mask)

    thread_map(fill, [(i, c, lid) for i, (c, lid) in enumerate(zip(centroids_zyx, lesion_ids))])
    return out


def patch_grid(spacing_xyz, geometry: PatchGeometry = COARSE) -> np.ndarray:
    """3 x D x H x W offsets (z, y, x scan voxels) of a patch's voxels from its centre."""
    sx, sy, sz = spacing_xyz
    step = np.array(geometry.spacing_mm_zyx) / np.array([sz, sy, sx])  # patch voxel in scan voxels
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(geometry.shape_zyx, step)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def fill_patch(out: np.ndarray, hu: np.ndarray, labels: np.ndarray | None, centre_zyx, lesion_id: int,
               grid: np.ndarray, mask_in=None) -> None:
    """One candidate's patch into `out` (2 x D x H x W, zeros, the grid's shape): the CT around `centre_zyx`
    (a voxel position) and its component. grid: `patch_grid`; mask_in: instead of `labels`,
    a function (box of the scan) -> the candidate's bool mask in that box."""
    lo, hi = HU_RANGE
    coords = grid + np.asarray(centre_zyx, dtype=np.float64)[:, None, None, None]
    # Read only the box the patch covers: map_coordinates on the whole volume would copy it.
    box = tuple(slice(max(0, int(np.floor(coords[a].min())) - 1), min(hu.shape[a], int(np.ceil(coords[a].max())) + 2))
                for a in range(3))
    if any(b.start >= b.stop for b in box):
        return
    local = coords - np.array([b.start for b in box], dtype=np.float64)[:, None, None, None]
    ct = ndimage.map_coordinates(hu[box].astype(np.float32), local, order=1, mode="constant", cval=lo)
    out[0] = np.clip((ct - lo) / (hi - lo), 0.0, 1.0)
    mask = labels[box] == lesion_id if mask_in is None else mask_in(box)
    out[1] = ndimage.map_coordinates(mask.astype(np.float32), local, order=0, mode="constant", cval=0.0)


def candidate_centres(labels: np.ndarray, lesion_ids, spacing_xyz, boxes=None) -> list[tuple[float, float, float]]:
    """The thickest point of each component (`candidate_centre`). labels: int (z, y, x).
    boxes: the labels' `postprocess.find_objects`, when the caller has them already."""
    boxes = postprocess.find_objects(labels) if boxes is None else boxes
    return thread_map(lambda lid: candidate_centre(labels, lid, boxes[lid - 1], spacing_xyz), lesion_ids)


def candidate_centre(labels: np.ndarray, lesion_id: int, box, spacing_xyz) -> tuple[float, float, float]:
    """The thickest point of a component: argmax of its Euclidean distance transform (in mm,
    anisotropic spacing honoured), as a (z, y, x) voxel position. box: its find_objects box."""
    sx, sy, sz = spacing_xyz
    padded = np.pad(labels[box] == lesion_id, 1)  # the box edge is outside the component
    depth = ndimage.distance_transform_edt(padded, sampling=(sz, sy, sx))
    k = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return tuple(float(k[a] - 1 + box[a].start) for a in range(3))


@dataclass
class Classifier:
    net: CandidateNet
    threshold: float  # keep a candidate whose nodule probability is at least this
    info: dict

    @property
    def geometry(self) -> PatchGeometry:
        """The patches its network reads."""
        return self.net.geometry

    @torch.no_grad()
    def probabilities(self, patches: np.ndarray, batch: int = 32) -> np.ndarray:
        """N x 2 x D x H x W (its `geometry`) -> N nodule probabilities (CPU)."""
        self.net.eval()
        out = [torch.sigmoid(self.net(torch.from_numpy(patches[i : i + batch]))).numpy()
               for i in range(0, len(patches), batch)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, hu: np.ndarray, labels: np.ndarray, rows: list[dict], spacing_xyz, boxes=None) -> np.ndarray:
        """Nodule probability of each candidate row (rows of postprocess.lesion_table on this grid).
        boxes: the labels' `postprocess.find_objects`, when the caller has them already."""
        if not rows:
            return np.zeros(0, np.float32)
        ids = [r["lesion_id"] for r in rows]
        patches = extract_patches(hu, labels, candidate_centres(labels, ids, spacing_xyz, boxes), spacing_xyz, ids,
                                  geometry=self.geometry)
        return self.probabilities(patches)


def save(net: CandidateNet, threshold: float, info: dict, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WEIGHTS_NAME
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    (folder / WEIGHTS_NAME.replace(".safetensors", ".json")).write_text(
        json.dumps({"threshold": threshold, **info}, indent=2) + "\n")
    return path


def load(path: str | Path) -> Classifier:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    net = CandidateNet(width=int(meta.get("width", 16)), arch=str(meta.get("arch", "coarse")))
    net.load_state_dict(load_file(str(path)))
    fast_layout(net, "cpu")  # it always runs on the CPU
    net.eval()
    return Classifier(net, float(meta["threshold"]), meta)


_BUNDLED: dict[str, Classifier] = {}  # weights file name -> classifier, loaded once


def bundled(name: str = WEIGHTS_NAME) -> Classifier | None:
    """A CandidateNet shipped in boltzformer.resources (loaded once), or None if it is absent.
    name: its weights file: this filter's (default) or the 3D nodule detector's."""
    if name not in _BUNDLED:
        from .weights import bundled_dir

        path = bundled_dir() / name
        if not path.is_file():
            return None
        try:
            _BUNDLED[name] = load(path)
        except Exception as exc:  # noqa: BLE001 - truncated or edited: one line naming the file
            from .errors import WeightsError

            detail = (str(exc).splitlines() or [""])[0]
            raise WeightsError(f"{path}: the bundled 3D classifier cannot be read ({type(exc).__name__}: {detail}); "
                               "reinstall napari-boltzformer") from None
    return _BUNDLED[name]


def bundled_sha256(name: str = WEIGHTS_NAME) -> str | None:
    """sha256 of a bundled CandidateNet's weights (see `bundled`), or None when there are none."""
    from .weights import bundled_dir, sha256

    path = bundled_dir() / name
    return sha256(path) if path.is_file() else None
