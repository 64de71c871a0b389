"""Reviewing a segmentation: accept or reject each lesion, edit it by hand, look here, undo; the
rule that keeps those decisions when the threshold moves; the record a review leaves.

Arrays are on the input volume's grid, (z, y, x). Decisions are kept per voxel in one uint8 map,
`Review.state` (lesion ids change with every threshold; voxels do not). Its low 3 bits are the
decision, its high bits flags saying where the voxel came from:

    AUTO      0   follows the threshold, the size and the 3D filters (the result's own labels)
    ACCEPTED  1   shown at any threshold, exactly these voxels
    PENDING   2   shown at any threshold, not yet accepted or rejected: a lesion edited by hand,
                  or a "look here" candidate
    REJECTED  3   hidden at any threshold: the footprint of a rejected lesion
    ERASED    4   hidden at any threshold: voxels erased by hand
    flags     EDITED 8 (painted or erased by hand), LOOK_HERE 16, DRAWN 32 (painted from nothing)

THE MERGE RULE (what is shown at threshold t):

    shown(t) = ACCEPTED and PENDING voxels
             ∪ every component of the thresholded result that touches no decided voxel

A component of the thresholded mask that overlaps or touches (26-neighbourhood) a voxel with a
decision is the finding the reader decided on, and the decision stands for it: an accepted or
hand-edited lesion keeps exactly its voxels (it neither grows nor shrinks with the threshold),
a rejected lesion stays away even where a lower threshold makes it larger, erased voxels stay
empty. Components nobody touched follow the threshold. So every shown component is wholly
decided or wholly automatic; a model candidate that grows into a decided lesion at a lower
threshold is absorbed by that decision.

Edits: the components of the edited mask that touch a painted or erased voxel are hand-edited:
their voxels are frozen (PENDING, or ACCEPTED when any of them was accepted, or when the whole
component was painted from nothing: a reader does not draw a lesion they reject). Painted
voxels win over a rejected footprint; erased voxels become ERASED.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import postprocess

AUTO, ACCEPTED, PENDING, REJECTED, ERASED = 0, 1, 2, 3, 4
DECISION = 7
EDITED, LOOK_HERE, DRAWN = 8, 16, 32
STATUSES = ("unreviewed", "accepted", "rejected")
SIDECAR_FORMAT = "boltzformer-review/1"
MAX_UNDO = 500
# the keys lesion_rows measures itself; a row's other keys (the 3D filter's scores) are carried over
_MEASURED = {"lesion_id", "voxels", "volume_mm3", "longest_axial_diameter_mm", "short_axis_diameter_mm",
             "mean_axial_diameter_mm", "centroid_voxel_zyx", "centroid_world_mm", "slice_start", "slice_end",
             "mean_intensity", "mean_probability", "max_probability", "status", "origin"}
_FLAG_NAMES = ((LOOK_HERE, "look here"), (DRAWN, "drawn"), (EDITED, "edited"))
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26 neighbours, as label_components
MERGE_RULE = ("accepted and hand-edited lesions keep exactly their voxels at any threshold; rejected lesions "
              "and erased voxels stay empty at any threshold; a thresholded component touching any decided "
              "voxel is replaced by that decision; the other components follow the threshold")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Change:
    """One undoable action: the voxels it changed and what they held before."""

    indices: np.ndarray  # int64 flat indices into the state map
    before: np.ndarray  # uint8, their previous states
    scores_before: dict  # flat index -> previous look-here probability (None: had none)
    log_index: int


@dataclass
class ReviewView:
    """Every lesion of a result under a review, at the result's current threshold.

    rows: dicts with the lesion_table keys plus `status` (unreviewed | accepted | rejected),
      `origin` (model, edited, look here, drawn, joined with ' + ') and `_ref` (which labels
      map holds it), largest first, `lesion_id` numbering them 1..n in that order.
    auto_labels: the result's labels (int, (z, y, x)); kept_labels / rejected_labels: int32
      (z, y, x) components of the kept (accepted or pending) and of the rejected voxels, or None.
    """

    rows: list[dict]
    auto_labels: np.ndarray | None
    kept_labels: np.ndarray | None
    rejected_labels: np.ndarray | None
    threshold: float
    version: tuple = ()

    def _map(self, kind: str) -> np.ndarray:
        return {"auto": self.auto_labels, "kept": self.kept_labels, "rejected": self.rejected_labels}[kind]

    def voxels(self, row: dict) -> np.ndarray:
        """Flat indices (int64) of a row's voxels."""
        kind, label = row["_ref"]
        labels = self._map(kind)
        start, end = row["slice_start"], row["slice_end"]
        if labels is None:
            return np.zeros(0, np.int64)
        lo, hi = min(start, end), max(start, end) + 1  # rows carry their z range on the input grid
        local = np.flatnonzero(labels[lo:hi] == label)
        return local + lo * int(np.prod(labels.shape[1:]))

    def mask(self, rows=None) -> np.ndarray:
        """uint8 (z, y, x): the voxels of `rows` (default: every row) that are shown; rejected rows
        add nothing."""
        rows = self.rows if rows is None else rows
        shape = next(m.shape for m in (self.auto_labels, self.kept_labels, self.rejected_labels) if m is not None)
        out = np.zeros(shape, np.uint8)
        shown = [r for r in rows if r["_ref"][0] in ("auto", "kept")]
        per_slice = int(np.prod(shape[1:]))
        if sum((abs(r["slice_end"] - r["slice_start"]) + 1) * per_slice for r in shown) <= out.size:
            flat = out.reshape(-1)  # a few lesions: their slices scanned, not the whole volume twice
            for row in shown:      # (0.45 s of each accept or reject on a 224 x 512² CT)
                flat[self.voxels(row)] = 1
            return out
        for kind in ("auto", "kept"):
            ids = [r["_ref"][1] for r in rows if r["_ref"][0] == kind]
            if ids:
                out |= postprocess.select_labels(self._map(kind), ids)
        return out

    def counts(self, rows=None) -> dict:
        """{'total', 'reviewed', 'accepted', 'rejected', 'unreviewed'} over `rows` (default all)."""
        rows = self.rows if rows is None else rows
        out = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        return {"total": len(rows), "reviewed": out["accepted"] + out["rejected"], **out}


@dataclass
class Review:
    """The decisions of a reader on one result (see the module docstring).

    shape: the input volume's (z, y, x). Every action returns its log entry (a dict that goes into
    the sidecar's `actions`) and can be undone; `version` changes with every action.
    """

    shape: tuple
    state: np.ndarray = None
    scores: dict = field(default_factory=dict)  # flat index -> look-here probability at a candidate voxel
    # first voxel (flat index) of a decided model lesion -> (its voxel count, the row's other scores, e.g.
    # the 3D filter's): a decided lesion keeps them while its voxels are those it was decided with
    extras: dict = field(default_factory=dict)
    actions: list = field(default_factory=list)
    version: int = 0
    _undo: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.shape = tuple(int(v) for v in self.shape)
        if self.state is None:
            self.state = np.zeros(self.shape, np.uint8)

    @property
    def has_decisions(self) -> bool:
        return bool((self.state & DECISION).any())

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    # -- what a result looks like under the review --------------------------------------------------
    def view(self, result) -> ReviewView:
        """The rows and maps of `result` (a SegmentationResult on the same grid) under this review."""
        labels = result.labels
        if labels is None or tuple(labels.shape) != self.shape:
            raise ValueError(f"the result's labels {None if labels is None else labels.shape} are not on "
                             f"the review's grid {self.shape}")
        # The decided voxels are few: they are handled as flat indices, never as whole-volume masks
        # (whole-volume labelling made each accept or reject take 1-2 s on a 224 x 512² CT).
        decided = np.flatnonzero(self.state.reshape(-1) & DECISION)
        key = (self.version, id(labels), result.threshold)
        if decided.size == 0:  # nothing decided: the result as it is
            rows = [{**r, "status": "unreviewed", "origin": "model", "_ref": ("auto", r["lesion_id"])}
                    for r in result.lesions]
            return ReviewView(_numbered(rows), labels, None, None, result.threshold, key)
        decision = self.state.reshape(-1)[decided] & DECISION
        claimed = _labels_touching(labels, decided)
        rows = [{**r, "status": "unreviewed", "origin": "model", "_ref": ("auto", r["lesion_id"])}
                for r in result.lesions if r["lesion_id"] not in claimed]
        kept_labels, kept_rows = self._components(decided[(decision == ACCEPTED) | (decision == PENDING)], result,
                                                  "kept")
        for row in kept_rows:
            row["status"] = "accepted" if row.pop("_accepted") else "unreviewed"
        rejected_labels, rejected_rows = self._components(decided[decision == REJECTED], result, "rejected")
        for row in rejected_rows:
            row["status"] = "rejected"
            row.pop("_accepted")
        return ReviewView(_numbered(rows + kept_rows + rejected_rows), labels, kept_labels, rejected_labels,
                          result.threshold, key)

    def _components(self, voxels: np.ndarray, result, kind: str) -> tuple[np.ndarray | None, list[dict]]:
        """Components (26-connected) of `voxels` (sorted flat indices), measured like the result's
        own lesions; each row gets `_ref` (kind, label), `origin` and `_accepted` (any voxel accepted)."""
        if voxels.size == 0:
            return None, []
        inside, n = _label_indices(voxels, self.shape)
        labels = np.zeros(self.shape, np.int32)
        labels.reshape(-1)[voxels] = inside
        rows = lesion_rows(labels, result, scores=self.scores)
        states = self.state.reshape(-1)[voxels]
        accepted = np.bincount(inside, weights=(states & DECISION) == ACCEPTED, minlength=n + 1) > 0
        flags = {f: np.bincount(inside, weights=(states & f) > 0, minlength=n + 1) > 0 for f, _ in _FLAG_NAMES}
        anchors = {}
        if self.extras:
            index = np.fromiter(self.extras, np.int64, len(self.extras))
            owner = labels.reshape(-1)[index]
            anchors = {int(o): int(i) for o, i in zip(owner, index) if o}
        for row in rows:
            i = row["lesion_id"]
            row["_ref"] = (kind, i)
            row["_accepted"] = bool(accepted[i])
            row["origin"] = " + ".join(name for f, name in _FLAG_NAMES if flags[f][i]) or "model"
            if i in anchors and self.extras[anchors[i]][0] == row["voxels"]:
                row.update(self.extras[anchors[i]][1])
        return labels, rows

    # -- actions --------------------------------------------------------------------------------------
    def decide(self, view: ReviewView, row: dict, status: str) -> dict:
        """Accept or reject one row of `view` (status 'accepted' | 'rejected'); its current voxels
        become frozen (accepted) or its footprint stays empty (rejected) at any threshold."""
        if status not in ("accepted", "rejected"):
            raise ValueError(f"status must be 'accepted' or 'rejected', not {status!r}")
        indices = view.voxels(row)
        if indices.size == 0:
            raise ValueError(f"lesion {row.get('lesion_id')} has no voxels in this view")
        code = ACCEPTED if status == "accepted" else REJECTED
        other = {k: v for k, v in row.items() if k not in _MEASURED and not k.startswith("_")}
        if other:
            self.extras[int(indices.min())] = (int(indices.size), other)
        flat = self.state.reshape(-1)
        new = (flat[indices] & ~np.uint8(DECISION)) | np.uint8(code)
        entry = {"action": "accept" if status == "accepted" else "reject", "status_before": row["status"],
                 "lesion": lesion_summary(row), "threshold": view.threshold}
        return self._apply(indices, new, entry)

    def apply_edit(self, before: np.ndarray, after: np.ndarray, threshold: float | None = None) -> dict | None:
        """The reader painted or erased: `before` is the mask that was shown, `after` the mask now
        (both (z, y, x), non-zero = lesion). Returns the log entry, or None when nothing changed."""
        before, after = np.asarray(before) != 0, np.asarray(after) != 0
        if before.shape != self.shape or after.shape != self.shape:
            raise ValueError(f"edited mask shape {after.shape} differs from the review's {self.shape}")
        # flat indices throughout: a mask's voxels are few (whole-volume labelling took 0.8 s a stroke)
        shown, now = np.flatnonzero(before), np.flatnonzero(after)
        painted, erased = np.setdiff1d(now, shown, assume_unique=True), np.setdiff1d(shown, now, assume_unique=True)
        if painted.size == 0 and erased.size == 0:
            return None
        components, _ = _label_indices(now, self.shape)  # the label of each voxel of `now`
        edited = _labels_at(now, components, np.concatenate([painted, erased]), self.shape)
        flat_state = self.state.reshape(-1)
        indices, values = [erased], []
        values.append((flat_state[erased] & ~np.uint8(DECISION)) | np.uint8(ERASED | EDITED))
        for label in sorted(edited):
            voxels = now[components == label]
            old = flat_state[voxels]
            drawn = not before.reshape(-1)[voxels].any()
            accepted = drawn or bool(((old & DECISION) == ACCEPTED).any())
            flags = (old & ~np.uint8(DECISION)) | np.uint8(EDITED | (DRAWN if drawn else 0))
            indices.append(voxels)
            values.append(flags | np.uint8(ACCEPTED if accepted else PENDING))
        entry = {"action": "edit", "painted_voxels": int(painted.size), "erased_voxels": int(erased.size),
                 "lesions_edited": len(edited), "threshold": threshold}
        return self._apply(np.concatenate(indices), np.concatenate(values).astype(np.uint8), entry)

    def add_candidate(self, indices: np.ndarray, probabilities: np.ndarray | None = None, *,
                      point_zyx=None, row: dict | None = None, threshold: float | None = None) -> dict | None:
        """A look-here candidate: its voxels (flat indices) are shown as an unreviewed lesion at any
        threshold until accepted or rejected. Only voxels nobody decided on, and touching none
        that was decided, are added: a lesion kept, rejected or erased stays as the reader left
        it (the merge rule would otherwise grow an accepted lesion, or bring a rejected one back
        as unreviewed), and the candidate stays a finding of its own.
        probabilities: the re-run's probability at each voxel (the lesion's score).
        Returns the log entry, or None when no voxel is left to add (nothing is logged)."""
        indices = np.asarray(indices, np.int64)
        if indices.size == 0:
            raise ValueError("a look-here candidate needs at least one voxel")
        free = ~self._near_decided(indices)
        indices = indices[free]
        if indices.size == 0:
            return None
        old = self.state.reshape(-1)[indices]
        scores = {} if probabilities is None else dict(zip(indices.tolist(), np.asarray(probabilities)[free].tolist()))
        new = (old & ~np.uint8(DECISION)) | np.uint8(PENDING | LOOK_HERE)
        entry = {"action": "look here", "point_zyx": None if point_zyx is None else [round(float(v), 2) for v in point_zyx],
                 "lesion": None if row is None else lesion_summary(row), "threshold": threshold}
        return self._apply(indices, new, entry, scores)

    def _near_decided(self, indices: np.ndarray) -> np.ndarray:
        """For each flat index: whether it, or a 26-neighbour, carries a decision (computed in
        the candidate's bounding box, one voxel wider)."""
        zyx = np.unravel_index(indices, self.shape)
        lo = [max(int(c.min()) - 1, 0) for c in zyx]
        hi = [min(int(c.max()) + 2, n) for c, n in zip(zyx, self.shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        near = ndimage.binary_dilation((self.state[box] & DECISION) != AUTO, structure=_CONNECTIVITY)
        return near[tuple(c - a for c, a in zip(zyx, lo))]

    def undo(self) -> dict | None:
        """Take the last action back; returns the 'undo' log entry, or None when there is none."""
        if not self._undo:
            return None
        change = self._undo.pop()
        self.state.reshape(-1)[change.indices] = change.before
        for index, score in change.scores_before.items():
            if score is None:
                self.scores.pop(index, None)
            else:
                self.scores[index] = score
        undone = self.actions[change.log_index]
        undone["undone"] = True
        entry = {"action": "undo", "undoes": change.log_index, "undone_action": undone["action"], "time": _now()}
        self.actions.append(entry)
        self.version += 1
        return entry

    def _apply(self, indices, new, entry: dict, scores: dict | None = None) -> dict:
        flat = self.state.reshape(-1)
        scores = scores or {}
        change = _Change(indices, flat[indices].copy(), {i: self.scores.get(i) for i in scores}, len(self.actions))
        flat[indices] = new
        self.scores.update(scores)
        entry = {"time": _now(), **entry}
        self.actions.append(entry)
        self._undo.append(change)
        del self._undo[:-MAX_UNDO]
        self.version += 1
        return entry

    # -- the record -----------------------------------------------------------------------------------
    def sidecar(self, result, rows: list[dict], *, settings: dict | None = None, files: dict | None = None,
                include_unreviewed: bool = True) -> dict:
        """The JSON sidecar of an export: what was run (prompt, weights, threshold and the other
        settings), what the exported mask holds, every lesion with its status, and every action.

        rows: the lesions exported (a ReviewView's rows, filtered as shown); settings: e.g.
        {'weights_sha256': ..., 'seed': ...}; files: {'mask': path, 'table': path}."""
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        return {
            "format": SIDECAR_FORMAT,
            "written": _now(),
            "prompt": result.prompt,
            **(settings or {}),
            "threshold": float(result.threshold),
            "min_lesion_mm3": float(result.min_lesion_mm3),
            "fp_filter": bool(result.fp_reduction),
            "nodule_detector": bool(result.fp_reduction and result.nodule_detector),
            "slices_processed": [int(result.slices[0]), int(result.slices[1])],
            "runs": int(result.runs),
            "mirror": bool(result.mirror),
            "planes": result.planes,
            "window": result.window,
            "modality": result.modality,
            "mask_holds": "accepted and unreviewed lesions" if include_unreviewed else "accepted lesions only",
            "merge_rule": MERGE_RULE,
            "files": {k: str(v) for k, v in (files or {}).items()},
            "counts": counts,
            "lesions": [{"lesion_id": r["lesion_id"], "status": r["status"], "origin": r["origin"],
                         **lesion_summary(r)} for r in rows],
            "actions": self.actions,
        }


def sidecar_path(path) -> Path:
    """Where the sidecar of an exported file goes: 'mask.nii.gz' -> 'mask.review.json', beside it."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".csv", ".json"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(name + ".review.json")


def record_summary(mask_path) -> str | None:
    """One sentence on the review record beside an exported mask ('x.nii.gz' -> 'x.review.json':
    the prompt, threshold, statuses and what the mask holds), or None when there is none for it."""
    side = sidecar_path(mask_path)
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
        mask = Path(str(record["files"]["mask"]))
        counts = {s: int(record["counts"][s]) for s in STATUSES}
        said = f"'{record['prompt']}' at threshold {float(record['threshold']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable or not ours
        return None
    if record.get("format") != SIDECAR_FORMAT or mask.name != Path(mask_path).name:
        return None
    return (f"{side.name} records its review of {said}: {counts['accepted']} accepted, {counts['rejected']} "
            f"rejected, {counts['unreviewed']} unreviewed; the mask holds {record.get('mask_holds', 'its lesions')}")


def sidecar_owner(path) -> str | None:
    """Another existing file that the sidecar `path` would be written for already records
    (a mask 'x.nii.gz' and a table 'x.csv' share 'x.review.json'), else None.

    Writing it for `path` would silently drop that file's record, so exports refuse instead."""
    path = Path(path)
    side = sidecar_path(path)
    try:
        files = json.loads(side.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):  # none, unreadable or not ours: nothing to keep
        return None
    for kind, other in (files.items() if isinstance(files, dict) else ()):
        if kind != "sidecar" and Path(other) != path and Path(other).is_file():
            return str(other)
    return None


def sidecar_bytes(sidecar: dict) -> bytes:
    """A sidecar (Review.sidecar) as UTF-8 JSON, numpy values as plain numbers."""
    return (json.dumps(postprocess._jsonable(sidecar), indent=1) + "\n").encode("utf-8")


def lesion_summary(row: dict) -> dict:
    """The few numbers that identify a lesion in a log: centroid, size, slices, score."""
    keys = ("centroid_voxel_zyx", "centroid_world_mm", "volume_mm3", "mean_axial_diameter_mm",
            "longest_axial_diameter_mm", "slice_start", "slice_end", "mean_probability")
    out = {}
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        out[k] = [round(float(x), 3) for x in v] if isinstance(v, (tuple, list)) else (
            round(float(v), 4) if isinstance(v, (float, np.floating)) else v)
    return out


def lesion_rows(labels: np.ndarray, result, scores: dict | None = None) -> list[dict]:
    """postprocess.lesion_table of `labels` (int (z, y, x) on the input grid) as the result's own
    rows are made: measured on the canonical axial frame (axial diameters are axial whatever the
    stored orientation), centroids and slice ranges given on the input grid. scores: flat index ->
    probability overriding the result's at those voxels (look-here candidates)."""
    from .orientation import IDENTITY
    from .results import rows_to_input

    frame = result.frame if result.frame is not None else result.volume
    reo = result.reorientation or IDENTITY
    probabilities = result.probabilities
    rows = postprocess.lesion_table(reo.to_canonical(labels), frame, probabilities=reo.to_canonical(probabilities))
    rows_to_input(rows, labels, reo, frame.shape)
    if scores:
        _patch_scores(rows, labels, probabilities, scores)
    return rows


def _patch_scores(rows, labels, probabilities, scores: dict) -> None:
    """Mean and highest probability of rows holding look-here voxels, with the re-run's values."""
    index = np.fromiter(scores.keys(), np.int64, len(scores))
    value = np.fromiter(scores.values(), np.float64, len(scores))
    owner = labels.reshape(-1)[index]
    for row in rows:
        mine = owner == row["lesion_id"]
        if not mine.any():
            continue
        voxels = np.flatnonzero(labels.reshape(-1) == row["lesion_id"])
        p = probabilities.reshape(-1)[voxels].astype(np.float64)
        position = np.searchsorted(voxels, index[mine])
        p[position] = value[mine]
        row["mean_probability"], row["max_probability"] = float(p.mean()), float(p.max())


# the 13 neighbours of a voxel that come after it in raster order (26-connectivity), and all 26 and itself
_FORWARD = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) > (0, 0, 0)]
_AROUND = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _shifted(coords: tuple, shape: tuple, offset: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(which of the voxels at `coords` (np.unravel_index of flat indices in `shape`) have a
    neighbour at `offset` inside `shape`, its flat index)."""
    moved = [c + d for c, d in zip(coords, offset)]
    inside = np.ones(coords[0].size, bool)
    for m, n in zip(moved, shape):
        inside &= (m >= 0) & (m < n)
    return inside, np.ravel_multi_index([m[inside] for m in moved], shape)


def _found_in(flat: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which of the flat indices `wanted` are among the sorted flat indices `flat`, their positions
    there; a position is meaningful only where found)."""
    at = np.searchsorted(flat, wanted)
    found = at < flat.size
    found[found] = flat[at[found]] == wanted[found]
    return found, at


def _label_indices(flat: np.ndarray, shape: tuple) -> tuple[np.ndarray, int]:
    """26-connected components of the voxels at sorted flat indices `flat`: (their labels 1..n, n),
    numbered in raster order of each component's first voxel, as ndimage.label numbers them; the
    cost grows with the voxels, not with the volume."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    source, target = [], []
    coords = np.unravel_index(flat, shape)
    for offset in _FORWARD:
        inside, neighbour = _shifted(coords, shape, offset)
        found, at = _found_in(flat, neighbour)
        source.append(np.flatnonzero(inside)[found])
        target.append(at[found])
    source, target = np.concatenate(source), np.concatenate(target)
    graph = coo_matrix((np.ones(source.size, bool), (source, target)), shape=(flat.size, flat.size))
    n, component = connected_components(graph, directed=False)
    first = np.full(n, flat.size)
    np.minimum.at(first, component, np.arange(flat.size))
    rank = np.empty(n, np.int64)
    rank[np.argsort(first)] = np.arange(1, n + 1)
    return rank[component].astype(np.int32), int(n)


def _labels_at(flat: np.ndarray, labels: np.ndarray, near: np.ndarray, shape: tuple) -> set:
    """The labels (`labels`, one per sorted flat index of `flat`) of the voxels of `flat` at or next to
    (26-neighbourhood) the flat indices `near`."""
    found = set()
    if near.size == 0 or flat.size == 0:
        return found
    coords = np.unravel_index(near, shape)
    for offset in _AROUND:
        _, neighbour = _shifted(coords, shape, offset)
        hit, at = _found_in(flat, neighbour)
        found.update(np.unique(labels[at[hit]]).tolist())
    return {int(v) for v in found}


def _labels_touching(labels: np.ndarray, flat: np.ndarray) -> set:
    """Labels (non-zero) of `labels` at or next to (26-neighbourhood) the voxels at flat indices `flat`."""
    found = set()
    values = labels.reshape(-1)
    coords = np.unravel_index(flat, labels.shape)
    for offset in _AROUND:
        _, neighbour = _shifted(coords, labels.shape, offset)
        found.update(np.unique(values[neighbour]).tolist())
    found.discard(0)
    return {int(v) for v in found}


def _numbered(rows: list[dict]) -> list[dict]:
    """Rows largest first, numbered 1..n (the table's ids)."""
    rows = sorted(rows, key=lambda r: -r["volume_mm3"])
    for i, row in enumerate(rows, 1):
        row["lesion_id"] = i
    return rows
