"""Whole 3D chest CT phantoms in Hounsfield units with continuous vessel and airway trees.

`chest_phantom(seed, ...)` renders a (z, y, x) volume in LPS order (x toward the patient's left,
y toward posterior, z toward superior; spacing_mm is (x, y, z)). Unlike `ct.ct_volume`, whose
lung vessels are random dots re-drawn on every slice, the lungs here hold 3D pulmonary artery and
vein trees grown from the hilum into the lung by a volume-filling branching rule (each branch
heads for the centre of mass of the lung region it supplies and stops 40 % of the way there; the
region is then split in two; radii follow Murray's law r^3 = r1^3 + r2^3), bronchi that run beside
the arteries, fissures, and 3D lobulated nodules of five kinds.

The anatomy is described in millimetres in an anatomical frame: X, Y relative to the body centre,
Z = 0 at the top of the right diaphragm dome. A volume is a window of that frame, so the same
anatomy (body, organs, vessel and airway trees, nodule positions) renders at any spacing and
size. The textures are drawn on the voxel grid, so their random draws, and the choices made
after them (whether emphysema or ground glass is present, whether the fissures show), differ
between grids of one seed. Large organs are rendered slice by slice from implicit
shapes; tubes (vessels, airways, aorta) and nodules are rendered into local bounding boxes with
partial-volume occupancy averaged over the slice thickness. Scanner effects (reconstruction blur,
optional sharp kernel, correlated noise, HU offset, breathing blur over the diaphragm) come last.

Modules, in the order `chest_phantom` uses them: `anatomy` (the body in mm, implicit shapes),
`trees` (vessels and airways), `grid` (the voxel grid, tube rendering), `organs` (the background,
slice by slice), `nodules`, `scanner`, and `phantom` (all of it together).
"""

from .nodules import NODULE_KINDS, Nodule
from .phantom import MASK_KEYS, ChestPhantom, chest_phantom

__all__ = ["chest_phantom", "ChestPhantom", "Nodule", "NODULE_KINDS", "MASK_KEYS"]
