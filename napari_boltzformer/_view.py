"""What the canvas tells a reader besides the layers: patient orientation letters at the four
edges, the slice position in mm, and the heatmap's legend beside its colour bar.

World coordinates of the layers this plugin places are LPS millimetres in napari's (z, y, x)
order (see _layers), so world axis z runs to the patient's head (S), y to the back (P) and x
to the patient's left (L). napari draws the second displayed axis to the right and the first
downwards unless the camera is flipped; the letters follow both. Layers placed by other
readers carry no such promise, and get no letters.

No tensor math here.
"""

from __future__ import annotations

import numpy as np

from ._layers import FILE_GEOMETRY, GEOMETRY_KEY, ROLE_KEY, data_to_world_matrix, geometry_volume, is_shown_flat

# world axis (z, y, x) -> (letter at its negative end, letter at its positive end), LPS
LPS_ENDS = (("I", "S"), ("A", "P"), ("R", "L"))
PLANE_OF_AXIS = ("axial", "coronal", "sagittal")  # the plane a slice across world axis z / y / x shows
EDGES = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left", "right": "middle_right"}
SLICE_KEY = "boltzformer_slice"
LEGEND_KEY = "boltzformer_heat_legend"
# Jump to a lesion: a field of view this many times its longest diameter, never less than this.
ZOOM_FOV_FACTOR = 5.0
MIN_FOV_MM = 30.0


def lps_axis(world_axis: int, ndim: int, spatial: int = 3) -> int | None:
    """Which of z, y, x (0, 1, 2) world axis `world_axis` of `ndim` is, when the last `spatial`
    axes are the image's (3, or 2 for a single axial slice: y, x); None for a leading axis such
    as the decoder layer."""
    index = world_axis - (ndim - spatial)
    return None if index < 0 else index + 3 - spatial


def orientation_letters(displayed: tuple[int, int], ndim: int, orientation2d=("down", "right"),
                        spatial: int = 3, ends=LPS_ENDS) -> dict | None:
    """{'top', 'bottom', 'left', 'right'} -> patient direction letter for a 2D view of world
    axes `displayed` (vertical, horizontal) of `ndim`; None when one is not a spatial axis.
    `ends`: the letters at each end of world z, y, x (`flat_axes` for a slice shown flat)."""
    vertical, horizontal = (lps_axis(a, ndim, spatial) for a in displayed)
    if vertical is None or horizontal is None:
        return None
    down, right = (str(getattr(o, "value", o)) for o in orientation2d)
    v_neg, v_pos = ends[vertical]
    h_neg, h_pos = ends[horizontal]
    top, bottom = (v_neg, v_pos) if down == "down" else (v_pos, v_neg)
    left, right_letter = (h_neg, h_pos) if right == "right" else (h_pos, h_neg)
    return {"top": top, "bottom": bottom, "left": left, "right": right_letter}


def slice_text(axis: int, ndim: int, position_mm: float, index: int | None, count: int | None,
               spatial: int = 3, across: int | None = None) -> str:
    """'axial 17 of 0–47\n12.5 mm S': the plane, the slice of the image and, on a line of its own (the
    top corner of a narrow canvas also holds an orientation letter), its world position. The slice
    is 0-based, as napari's slider and the lesion table's slices count it. `across`: the LPS world
    axis (z, y, x as 0, 1, 2) the slices cross when it is not world `axis` (a slice shown flat)."""
    lps = lps_axis(axis, ndim, spatial)
    if lps is None:
        return ""
    lps = lps if across is None else across
    neg, pos = LPS_ENDS[lps]
    where = f"{abs(position_mm):.1f} mm {pos if position_mm >= 0 else neg}"
    if index is None or count is None:
        return f"{PLANE_OF_AXIS[lps]}\n{where}"
    return f"{PLANE_OF_AXIS[lps]} {index} of 0–{count - 1}\n{where}"


def flat_axes(file_geom: dict) -> tuple[tuple, int, float]:
    """For a single sagittal or coronal slice shown flat (`_layers.shown_flat`): the letters at
    each end of the screen's z, y, x axes (the file's slice normal, its image y and x axes),
    the LPS world axis (z, y, x as 0, 1, 2) the slice crosses, and its position along it (mm)."""
    volume = geometry_volume(file_geom)
    ends = []
    for image_axis in (2, 1, 0):  # the direction's columns are the image's x, y, z in LPS x, y, z
        v = np.asarray(volume.direction, float)[:, image_axis]
        c = int(np.argmax(np.abs(v)))
        neg, pos = LPS_ENDS[2 - c]
        ends.append((neg, pos) if v[c] > 0 else (pos, neg))
    normal = int(np.argmax(np.abs(np.asarray(volume.direction, float)[:, 2])))
    return tuple(ends), 2 - normal, float(volume.origin_mm[normal])


class CanvasLabels:
    """Orientation letters, slice position and heatmap legend as canvas text overlays, kept in
    step with the dims, the camera and the layers."""

    def __init__(self, viewer):
        from napari.components.overlays import TextOverlay

        self.viewer = viewer
        overlays = viewer.canvas.overlays
        for edge, position in EDGES.items():
            overlays[_edge_key(edge)] = TextOverlay(text="", position=position, font_size=14, visible=False,
                                                    color="#ffd24d")
        overlays[SLICE_KEY] = TextOverlay(text="", position="top_left", font_size=11, visible=False)
        overlays[LEGEND_KEY] = TextOverlay(text="", position="bottom_right", font_size=10, visible=False)
        viewer.dims.events.current_step.connect(self.update)
        viewer.dims.events.order.connect(self.update)
        viewer.dims.events.ndisplay.connect(self.update)
        viewer.dims.events.order.connect(self.keep_leading_axes_hidden)
        viewer.dims.events.ndisplay.connect(self.keep_leading_axes_hidden)
        _camera(viewer).events.orientation.connect(self.update)
        viewer.layers.events.inserted.connect(self.update)
        viewer.layers.events.removed.connect(self.update)
        self.update()

    def disconnect(self):
        viewer = self.viewer
        for signal in (viewer.dims.events.current_step, viewer.dims.events.order, viewer.dims.events.ndisplay,
                       _camera(viewer).events.orientation, viewer.layers.events.inserted,
                       viewer.layers.events.removed):
            signal.disconnect(self.update)
        for signal in (viewer.dims.events.order, viewer.dims.events.ndisplay):
            signal.disconnect(self.keep_leading_axes_hidden)
        for key in [*(_edge_key(e) for e in EDGES), SLICE_KEY, LEGEND_KEY]:
            if key in viewer.canvas.overlays:
                viewer.canvas.overlays[key].visible = False

    def text(self, key: str) -> str:
        """The text an overlay shows ('' when hidden): 'top', 'bottom', 'left', 'right', 'slice', 'legend'."""
        name = {"slice": SLICE_KEY, "legend": LEGEND_KEY}.get(key, _edge_key(key))
        overlay = self.viewer.canvas.overlays[name]
        return overlay.text if overlay.visible else ""

    def image_layer(self):
        """The bottom-most image layer this plugin placed (LPS world coordinates); when the image
        was closed, a mask, probability, ground-truth or opened label-map layer on its grid; else None. (Heatmaps
        have an extra leading axis, the decoder layer, and are not used.)"""
        placed = [layer for layer in self.viewer.layers if GEOMETRY_KEY in (layer.metadata or {})]
        for roles in (("image",), ("mask", "probability", "uncertainty", "ground truth", "label map")):
            for layer in placed:
                if layer.metadata.get(ROLE_KEY) in roles:
                    return layer
        return None

    def keep_leading_axes_hidden(self, event=None):
        """Rolling the axes (Ctrl-E) or transposing rolls the heatmap's "decoder layer" axis
        along with the image's, and the canvas then showed decoder layer against slice. The
        leading axes stay first (never displayed); the image's axes keep the order asked for."""
        image = self.image_layer()
        dims = self.viewer.dims
        leading = dims.ndim - image.ndim if image is not None else 0
        if leading <= 0 or not any(a < leading for a in dims.displayed):
            return
        order = list(dims.order)
        dims.order = tuple(a for a in order if a < leading) + tuple(a for a in order if a >= leading)

    def update(self, event=None):
        viewer = self.viewer
        overlays = viewer.canvas.overlays
        dims = viewer.dims
        image = self.image_layer()
        letters = None
        spatial = image.ndim if image is not None else 3
        flat = image is not None and is_shown_flat(image.metadata[GEOMETRY_KEY])
        ends, across, flat_mm = flat_axes(image.metadata[GEOMETRY_KEY][FILE_GEOMETRY]) if flat else (LPS_ENDS, None, 0)
        if image is not None and dims.ndisplay == 2:
            letters = orientation_letters(tuple(dims.displayed), dims.ndim, _camera(viewer).orientation2d, spatial,
                                          ends)
        # a file that gave no orientation: the letters are our assumption (the reader warned)
        doubt = "?" if image is not None and image.metadata[GEOMETRY_KEY].get("orientation_unknown") else ""
        for edge in EDGES:
            overlay = overlays[_edge_key(edge)]
            overlay.text = letters[edge] + doubt if letters else ""
            overlay.visible = letters is not None
        text = ""
        if image is not None and dims.ndisplay == 2 and spatial == 3:  # a 2D image has no slices
            offset = dims.ndim - image.ndim
            hidden = [a for a in range(offset, dims.ndim) if a not in dims.displayed]
            if hidden:
                axis = hidden[0]
                data_axis = axis - offset
                shape = image.data[0].shape if getattr(image, "multiscale", False) else image.data.shape
                count = int(shape[data_axis])
                position = image.world_to_data(dims.point[offset:])
                index = min(max(int(round(float(position[data_axis]))), 0), count - 1)
                if flat and data_axis == 0:  # the one slice: named and placed by the file's geometry
                    text = slice_text(axis, dims.ndim, flat_mm, index, count, across=across)
                elif not flat:
                    text = slice_text(axis, dims.ndim, float(dims.point[axis]), index, count)
        overlays[SLICE_KEY].text = text
        overlays[SLICE_KEY].visible = bool(text)

    def show_legend(self, text: str | None):
        overlay = self.viewer.canvas.overlays[LEGEND_KEY]
        overlay.text = text or ""
        overlay.visible = bool(text)


def _edge_key(edge: str) -> str:
    return f"boltzformer_orientation_{edge}"


def _camera(viewer):
    """viewer.scene.camera (napari >= 0.9), else the older viewer.camera."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def pointed_position(viewer) -> tuple:
    """The world position a key press on the canvas means: under the mouse pointer when it is on
    the canvas, else the centre of the view (the shown slice, the camera's centre in plane),
    which a reader without a mouse reaches by jumping, zooming and stepping slices."""
    if getattr(viewer, "mouse_over_canvas", False):
        return tuple(viewer.cursor.position)
    point = list(viewer.dims.point)
    displayed = list(viewer.dims.displayed)
    for axis, value in zip(displayed, tuple(_camera(viewer).center)[-len(displayed):]):
        point[axis] = float(value)
    return tuple(point)


class SavedView:
    """The camera (centre, zoom) and the 2D or 3D display of before the first jump to a lesion,
    for Restore view. It is put back in the display it was kept in only: a 2D camera's centre
    put into the 3D camera sent it to (0, 0, 0), and back in 2D to an edge slice."""

    def __init__(self, viewer):
        self._viewer = viewer
        self._kept: tuple | None = None

    @property
    def kept(self) -> bool:
        return self._kept is not None

    def keep(self) -> float:
        """Keep the view shown now, unless one is kept; -> the kept zoom (jumps never zoom out of it)."""
        if self._kept is None:
            camera = _camera(self._viewer)
            self._kept = (tuple(camera.center), float(camera.zoom), self._viewer.dims.ndisplay)
        return self._kept[1]

    def restore(self, forget: bool = False) -> str | None:
        """Put the kept view back and forget it; -> why not (kept in the other display, then kept
        on unless `forget`), else None."""
        center, zoom, ndisplay = self._kept
        if self._viewer.dims.ndisplay != ndisplay:
            if forget:
                self._kept = None
            return f"the view was kept in {ndisplay}D; switch to {ndisplay}D and press it again"
        camera = _camera(self._viewer)
        camera.center = center
        camera.zoom = zoom
        self._kept = None
        return None


def zoom_to(viewer, layer, lesion: dict, min_zoom: float):
    """Show a lesion of `layer` (a dict with centroid_voxel_zyx, longest_axial_diameter_mm): its
    centroid slice, the camera centred on it, a field of view ZOOM_FOV_FACTOR times its longest
    diameter and at least MIN_FOV_MM, zoomed in at least to `min_zoom` (a structure too big for
    that field of view does not zoom out)."""
    centroid = np.asarray(lesion["centroid_voxel_zyx"], float)
    if layer.ndim == 2:
        centroid = centroid[1:]
    world = world_of_shown_voxel(viewer, layer, centroid)
    dims = viewer.dims
    camera = _camera(viewer)
    offset = dims.ndim - layer.ndim
    point = list(dims.point)
    for i, value in enumerate(world):
        point[offset + i] = float(value)
    displayed = list(dims.displayed)
    for axis in range(offset, dims.ndim):
        if axis not in displayed:
            dims.set_point(axis, point[axis])
    camera.center = tuple(point[axis] for axis in displayed)
    diameter = float(lesion.get("longest_axial_diameter_mm") or 0.0)
    fov_mm = max(ZOOM_FOV_FACTOR * diameter, MIN_FOV_MM)
    camera.zoom = max(min(_canvas_size_px(viewer)) / fov_mm, min_zoom)


# napari draws a layer whose axes are oblique to the view as if they were not: the slice comes
# from the axes off the screen alone, the in-plane position from the axes on it (its warning:
# "non-orthogonal slicing ... without an out-of-slice rotation"). A click and a jump must use
# that mapping, not the layer's full 3D transform, or on a tilted scan they land tens of mm away.
def _split_axes(viewer, layer) -> tuple[list[int], list[int]]:
    """The layer's (displayed, not displayed) axes, in its own numbering."""
    offset = viewer.dims.ndim - layer.ndim
    shown = [axis - offset for axis in viewer.dims.displayed if axis >= offset]
    return shown, [axis for axis in range(layer.ndim) if axis not in shown]


def slicing_axes(viewer, layer) -> list[int]:
    """The layer's axes (its own numbering) that the 2D view slices through: [0] for an axial view
    of a (z, y, x) volume."""
    return _split_axes(viewer, layer)[1]


def shown_voxel(viewer, layer, world_position) -> np.ndarray:
    """(layer.ndim,) data coordinates of what napari draws at a canvas position (world
    coordinates of the viewer); layer.world_to_data for a layer square to the view."""
    matrix, n = data_to_world_matrix(layer), layer.ndim
    world = np.asarray(world_position, float)[-n:]
    shown, hidden = _split_axes(viewer, layer)
    out = np.empty(n)
    if hidden:  # napari's slice: the inverse transform restricted to the hidden axes
        inverse = np.linalg.inv(matrix)
        out[hidden] = inverse[np.ix_(hidden, hidden)] @ world[hidden] + inverse[hidden, n]
    out[shown] = np.linalg.solve(matrix[np.ix_(shown, shown)], world[shown] - matrix[shown, n])
    return out


def world_of_shown_voxel(viewer, layer, data_point) -> np.ndarray:
    """(layer.ndim,) world position at which napari draws voxel `data_point`: the inverse of
    `shown_voxel`."""
    matrix, n = data_to_world_matrix(layer), layer.ndim
    data = np.asarray(data_point, float)
    shown, hidden = _split_axes(viewer, layer)
    world = np.empty(n)
    world[shown] = matrix[np.ix_(shown, shown)] @ data[shown] + matrix[shown, n]
    if hidden:
        inverse = np.linalg.inv(matrix)
        world[hidden] = np.linalg.solve(inverse[np.ix_(hidden, hidden)], data[hidden] - inverse[hidden, n])
    return world


def _canvas_size_px(viewer) -> tuple[int, int]:
    """(height, width) of the canvas in screen pixels."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None) if canvas is not None and not callable(getattr(canvas, "size", None)) else None
    if size is None:
        size = getattr(viewer, "_canvas_size", (600, 800))
    return int(size[0]), int(size[1])
