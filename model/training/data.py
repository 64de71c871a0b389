"""Training and validation examples: synthetic phantoms and a folder of real cases.

An example is one 2D slice at the network size, windowed/normalised exactly as inference
prepares it, a prompt, and the target mask for that prompt (empty when the prompt's target is
absent: the model must learn to say "nothing here").

Real data is read from its folder at run time and never copied into the repository. It is split
by patient/case (the file `REAL_SPLIT`); the held-out part is never trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import intensity
from ..errors import InputError
from ..evaluate import modality_of, read_cases, read_split
from ..synth import prompts as vocab

# Windows a CT slice is shown in during training, besides the target's own: the model must not
# depend on one window, because exported 8-bit images come in whatever window the exporter used.
TRAIN_WINDOWS = ("lung", "mediastinum", "soft_tissue")
# The split of the real cases (by patient / source image, never by slice): case_id,split rows,
# split one of train, heldout, fp_test. Made once from these rules: MSD lung patches: the `test`
# patches held out, `val` patches train. MSD lung slices: by patient id (10006, 10008, 10010 held
# out; `lungjpg_*` share patients with them and follow the same rule). MS FLAIR slices: by the
# first three digits (the patient; 105, 111, 116, 125, 135, 143 held out). MS T1 slices are the
# same patients: msT1_pPP_sSSS is image 1PPSSS, as ms_flair_1PPSSS is (the data's build script);
# the T1 slices of patients whose FLAIR trains (13, 15, 19, 38, 47) are on the train side, the
# others held out (until 2026-11-27 every T1 slice was held out, a leak across the split: the
# bundled weights trained on those patients' FLAIR slices, never on a T1 slice). Open MS 3D
# brains: p19 and p26 held out, p07 trains. Liver slices (one patient each): every fifth patient
# held out. SAM-Med2D: the amos_0006 image (3 prompts) held out. pyradiomics: brain2 held out.
# `ts_chest01*`: fp_test (real chest CT with no nodule annotated), never trained on (they have been a
# pass/fail rule of adoption decisions: MODEL_CARD "How clean the test sets are").
REAL_SPLIT = Path(__file__).with_name("real_split.csv")


def default_real_dir() -> Path | None:
    """$BOLTZFORMER_REAL_DATA when it holds cases.csv, else None (a script passes its own folder)."""
    env = os.environ.get("BOLTZFORMER_REAL_DATA")
    if env and (Path(env) / "cases.csv").is_file():
        return Path(env)
    return None


# -- examples ----------------------------------------------------------------------------------
@dataclass
class ExampleSet:
    """A stack of examples at the network size.

    images: N x S x S uint8 (intensity in [0,1] quantised to 1/255), masks: N x S x S bool,
    prompts: N prompt strings, targets: N target keys, area: N mask area fractions.
    """

    images: np.ndarray
    masks: np.ndarray
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def area(self) -> np.ndarray:
        return self.masks.reshape(len(self), -1).mean(1)

    @staticmethod
    def concat(sets: list["ExampleSet"]) -> "ExampleSet":
        return ExampleSet(
            np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]),
            sum((s.prompts for s in sets), []), sum((s.targets for s in sets), []),
        )

    def save(self, path: Path) -> None:
        np.savez(path, images=self.images, masks=np.packbits(self.masks, axis=-1), prompts=np.array(self.prompts),
                 targets=np.array(self.targets), size=self.images.shape[-1])

    @classmethod
    def load(cls, path: Path) -> "ExampleSet":
        z = np.load(path)
        size = int(z["size"])
        masks = np.unpackbits(z["masks"], axis=-1, count=size).astype(bool)
        return cls(z["images"], masks, [str(p) for p in z["prompts"]], [str(t) for t in z["targets"]])


def jittered(window: intensity.Window, rng: np.random.Generator) -> intensity.Window:
    """A window moved by ~30 HU and widened or narrowed by up to 25 % (exports come in any window)."""
    return intensity.Window(window.center_hu + rng.normal(0, 30), window.width_hu * rng.uniform(0.8, 1.25))


def _target_mask(masks: dict, target: str, shape) -> np.ndarray:
    m = masks.get(target)
    m = np.zeros(shape, bool) if m is None else m.astype(bool)
    if target == "lung_tumor" and "lung_nodule" in masks:  # "lung tumour" asks for every lung lesion
        m = m | masks["lung_nodule"].astype(bool)
    return m


def synthetic_example(rng: np.random.Generator, size: int = 256, negative_fraction: float = 0.15):
    """One synthetic example -> (image01 S x S float32, prompt, mask S x S bool, target)."""
    from ..synth import ct, mri

    if rng.random() < 0.72:
        sl = ct.ct_slice(rng, size=size)
    else:
        sl = mri.brain_slice(rng, size=size)
    modality = sl.modality
    present = [k for k, m in sl.masks.items() if k in vocab.TARGETS and np.any(m)]
    same_modality = [k for k, t in vocab.TARGETS.items() if t.modality == modality]
    absent = [k for k in same_modality if k not in present and not (k == "lung_tumor" and "lung_nodule" in present)]
    if present and (rng.random() >= negative_fraction or not absent):
        weights = np.array([4.0 if k in vocab.LESION_TARGETS else 1.0 for k in present])
        target = present[rng.choice(len(present), p=weights / weights.sum())]
    else:
        lesion_absent = [k for k in absent if k in vocab.LESION_TARGETS] or absent
        target = lesion_absent[rng.integers(len(lesion_absent))]
    spec = vocab.TARGETS[target]
    prompt = spec.prompts[rng.integers(len(spec.prompts))]
    mask = _target_mask(sl.masks, target, sl.image.shape)
    if modality == "CT":
        name = spec.window if rng.random() < 0.5 else TRAIN_WINDOWS[rng.integers(len(TRAIN_WINDOWS))]
        w = intensity.WINDOWS[name]
        image = intensity.apply_window(sl.image, jittered(w, rng))
    else:
        image, _ = intensity.prepare_slices(sl.image[None].astype(np.float32), modality="MR")
        image = image[0]
    return image.astype(np.float32), prompt, mask, target


def _generate_chunk(args):
    seed, count, size, negative_fraction = args
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size), np.uint8)
    masks = np.zeros((count, size, size), bool)
    prompts, targets = [], []
    for i in range(count):
        img, prompt, mask, target = synthetic_example(rng, size, negative_fraction)
        images[i] = np.round(img * 255)
        masks[i] = mask
        prompts.append(prompt)
        targets.append(target)
    return ExampleSet(images, masks, prompts, targets)


# Seeds of the synthetic evaluation slices (`boltzformer testset --seed`): 777 the held-out test
# set, 555 the validation set the stage rules were judged on. A training chunk drawn from one of
# them would be those very slices.
RESERVED_SLICE_SEEDS = (555, 777)


def generate_synthetic(count: int, seed: int, size: int = 256, workers: int = 1, negative_fraction: float = 0.15,
                       chunk: int = 250) -> ExampleSet:
    """`count` synthetic examples, deterministic in (seed, chunk) whatever the number of workers.
    Raises ValueError when a chunk's seed is one of the evaluation sets' (RESERVED_SLICE_SEEDS)."""
    jobs = [(seed * 100_003 + i, min(chunk, count - i * chunk), size, negative_fraction)
            for i in range((count + chunk - 1) // chunk)]
    reserved = [j[0] for j in jobs if j[0] in RESERVED_SLICE_SEEDS]
    if reserved:
        raise ValueError(f"synthetic examples with seed {seed} and {count} examples would draw chunk seed "
                         f"{reserved[0]}, the seed of a synthetic evaluation set: choose another seed or fewer examples")
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            sets = pool.map(_generate_chunk, jobs)
    else:
        sets = [_generate_chunk(j) for j in jobs]
    return ExampleSet.concat(sets)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    big = a.shape[0] > size or a.shape[1] > size
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=big)[0, 0].numpy()


TRAIN_SPLIT, HELDOUT_SPLIT = "train", "heldout"  # the split names training reads (fp_test is never read)


def real_split_rows(folder: Path, split_file=REAL_SPLIT, warn=None) -> dict[str, list[dict]]:
    """{"train": rows, "heldout": rows}: the cases.csv rows of `folder` that `split_file` puts in
    each split, checked before any data is made. InputError when no case is in the train split
    (a user's own folder that the bundled split does not list trained on synthetic data alone,
    without a word); `warn` (text -> None) names the cases left out: not in the split file, in a
    split training does not read, or in the split file but not in cases.csv; and prompts that
    name no known target (trained as new targets, without the absent-target pairs of `real_examples`)."""
    warn = warn or (lambda text: None)
    rows = read_cases(folder)
    splits = read_split(split_file)
    ids = {r["case_id"] for r in rows}
    unlisted = sorted(ids - set(splits))
    chosen = {name: [r for r in rows if splits.get(r["case_id"]) == name] for name in (TRAIN_SPLIT, HELDOUT_SPLIT)}
    if not chosen[TRAIN_SPLIT]:
        names = sorted({v for c, v in splits.items() if c in ids}) or ["none of its cases"]
        raise InputError(split_file, f"puts none of the {len(rows)} cases of {Path(folder) / 'cases.csv'} in the "
                                     f"'{TRAIN_SPLIT}' split (their splits: {', '.join(names)}); give a split file "
                                     f"(split_file) with the columns case_id,split and the splits {TRAIN_SPLIT} and "
                                     f"{HELDOUT_SPLIT}, or set use_real=false")
    if unlisted:
        warn(f"{split_file}: {len(unlisted)} case(s) of {Path(folder) / 'cases.csv'} are in no split and are left "
             f"out: {_first(unlisted)}")
    other = sorted({v for c, v in splits.items() if c in ids} - {TRAIN_SPLIT, HELDOUT_SPLIT, "fp_test"})
    if other:
        warn(f"{split_file}: split(s) {', '.join(repr(v) for v in other)} are not read by training (it reads "
             f"'{TRAIN_SPLIT}' and '{HELDOUT_SPLIT}'); their cases are left out")
    if missing := sorted(c for c, v in splits.items() if v in chosen and c not in ids):
        warn(f"{split_file}: {len(missing)} case(s) are not in {Path(folder) / 'cases.csv'}: {_first(missing)}")
    if not chosen[HELDOUT_SPLIT]:
        warn(f"{split_file}: no case of {Path(folder) / 'cases.csv'} is in the '{HELDOUT_SPLIT}' split: the real "
             "validation Dice (val_real_dice) stays blank")
    unknown = sorted({r["prompt"] for r in chosen[TRAIN_SPLIT] if vocab.target_of_prompt(r["prompt"]) is None})
    if unknown:
        warn(f"{Path(folder) / 'cases.csv'}: prompt(s) {_first([repr(p) for p in unknown])} name no target the "
             "synthetic data knows: each is trained as a target of its own, and is not used as the absent target "
             "of a target it might name (could_name: 'pulmonary nodules' is never 'lung nodule: nothing here')")
    return chosen


_GENERIC_WORDS = frozenset({"lesion", "lesions", "mass", "masses", "tumor", "tumors", "tumour", "tumours", "with",
                            "from", "the"})


def could_name(prompt: str, target: str) -> bool:
    """Whether a prompt that names no known target might still name `target` (a TARGETS key):
    one of its words (4 letters or more, not a generic one such as "lesion") starts like a word
    of the target's prompts ("pulmonary nodules" and "pulmonary nodule"; "kidney cyst" and
    "kidney lesion"). Such a target is not used as the prompt's absent target: its empty mask
    could be a wrong label."""
    def stems(text: str) -> set[str]:
        return {w[:5] for w in text.lower().replace("-", " ").split() if len(w) >= 4 and w not in _GENERIC_WORDS}

    mine = stems(prompt)
    return any(mine & stems(p) for p in vocab.TARGETS[target].prompts)


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def real_examples(folder: Path, split: str, size: int = 256, negatives: bool = True,
                  rng: np.random.Generator | None = None, offsets_mm=(), split_file=REAL_SPLIT,
                  rows: list[dict] | None = None) -> ExampleSet:
    """Slices of the real cases of one split, prepared exactly as inference prepares them.

    Volumes are first brought to the canonical axial orientation (as the Segmenter does), and
    each mask is read on its image's grid (evaluate.mask_on_grid: a mask of another shape or
    placement is refused, naming it). Each lesion-bearing slice gives one positive example;
    volumes also give their lesion-free slices as negatives, and with `negatives` every slice is
    also paired with a prompt of a target that is absent (e.g. a lung CT asked for "multiple
    sclerosis lesion"; for a prompt that names no known target, not a target it `could_name`). With `offsets_mm` the images
    are N x (1 + len) x S x S: the slice and its 2.5D context (a single-slice case repeats
    itself). ``split_file``: the case_id,split CSV (see REAL_SPLIT); ``rows``: the split's rows
    when already chosen (real_split_rows), else read from both files.
    """
    from ..context import context_stack
    from ..evaluate import mask_on_grid
    from ..io import read_volume
    from ..orientation import to_canonical

    rng = rng or np.random.default_rng(0)
    if rows is None:
        splits = read_split(split_file)
        rows = [r for r in read_cases(folder) if splits.get(r["case_id"]) == split]
    images, masks, prompts, targets = [], [], [], []
    for row in rows:
        vol = read_volume(Path(folder) / f"{row['case_id']}_image.nii.gz")
        truth_on_image = mask_on_grid(read_volume(Path(folder) / f"{row['case_id']}_mask.nii.gz"), vol)
        vol, reo, _ = to_canonical(vol)
        truth = np.ascontiguousarray(reo.to_canonical(truth_on_image))
        modality = modality_of(row.get("modality")) or intensity.detect_modality(vol)
        prepared, _ = intensity.prepare_slices(vol.array, modality=modality, prompt=row["prompt"])
        known = vocab.target_of_prompt(row["prompt"])
        target = known or row["prompt"]
        for z in range(vol.shape[0]):
            if not truth[z].any() and truth.shape[0] > 1 and rng.random() > 0.3:
                continue
            if not truth[z].any() and np.ptp(prepared[z]) == 0:
                continue  # a blank slice (outside a registered brain's field of view): nothing to learn
            if offsets_mm:
                stack = context_stack(prepared, [z], vol.spacing_mm[2], offsets_mm)[0]
                images.append(np.stack([_resize(c, size) for c in stack]))
            else:
                images.append(_resize(prepared[z], size))
            masks.append(_resize(truth[z].astype(np.float32), size) > 0.5)
            prompts.append(row["prompt"])
            targets.append(target)
            if negatives:
                others = [k for k, t in vocab.TARGETS.items() if t.modality == modality and k in vocab.LESION_TARGETS
                          and k != target and not (target == "lung_tumor" and k == "lung_nodule")
                          and not (target == "lung_nodule" and k == "lung_tumor")
                          and (known or not could_name(row["prompt"], k))]
                if others:
                    k = others[rng.integers(len(others))]
                    images.append(images[-1])
                    masks.append(np.zeros_like(masks[-1]))
                    prompts.append(vocab.TARGETS[k].prompts[0])
                    targets.append(k)
    channels = (1 + len(offsets_mm),) if offsets_mm else ()
    if not images:
        return ExampleSet(np.zeros((0, *channels, size, size), np.uint8), np.zeros((0, size, size), bool), [], [])
    return ExampleSet(np.round(np.stack(images) * 255).astype(np.uint8), np.stack(masks), prompts, targets)


# -- 3D phantom chests with 2.5D context ----------------------------------------------------------
# Prompts that name nothing in a scan: a model asked for them must answer with an empty mask.
# (Deliberately not the phrases the tests use to check that unknown prompts are refused.)
UNRELATED_PROMPTS = ("kitchen table", "guitar", "mountain lake", "football match", "the moon", "spreadsheet",
                     "bicycle", "coffee cup", "sunset over the sea", "tax return")


# Phantom seeds of the evaluation sets (benchmarks/phantom_chest.py: validation 80000+, test
# 90000+): never drawn for training.
RESERVED_PHANTOM_SEEDS = (80_000, 100_000)


# Context offsets of the phantom example caches (those of the 2.5D networks since stage 4).
PHANTOM_CONTEXT_MM = (-5.0, -2.5, 2.5, 5.0)


def phantom_examples(seed: int, volumes: int, per_volume: int, size: int = 256, offsets_mm=PHANTOM_CONTEXT_MM,
                     negative_fraction: float = 0.35, unrelated_fraction: float = 0.05,
                     positive_sampling: str = "slice") -> ExampleSet:
    """Examples from 3D phantom chest CTs (continuous vessel trees, 3D nodules), with context.

    Each volume gives `per_volume` slices: slices through a nodule prompted for a lung nodule
    (the positives), lesion-free lung slices prompted for a nodule (hard negatives: vessels
    and airway walls that must stay empty), organ prompts (lung, heart, aorta), and now and
    then a prompt that names nothing (empty). images: N x (1 + len(offsets_mm)) x S x S uint8.

    positive_sampling: "slice" draws a positive among all slices through any nodule, so a
    20 mm nodule spread over 15 slices is drawn 15 times as often as a 4 mm one on a single
    slice; "nodule" first draws a nodule (each equally often), then one of its slices.
    """
    if positive_sampling not in ("slice", "nodule"):
        raise ValueError(f"positive_sampling must be 'slice' or 'nodule', got {positive_sampling!r}")
    from scipy import ndimage

    from ..context import context_stack
    from ..synth.lung3d import chest_phantom

    rng = np.random.default_rng([seed, 7331])
    images, masks, prompts, targets = [], [], [], []
    for v in range(volumes):
        vseed = int(rng.integers(1 << 31))
        while RESERVED_PHANTOM_SEEDS[0] <= vseed < RESERVED_PHANTOM_SEEDS[1]:  # the evaluation phantoms
            vseed = int(rng.integers(1 << 31))
        z_mm = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
        px = float(rng.uniform(1.1, 1.6)) * 256 / size
        depth = int(min(96, max(24, round(120 / z_mm))))
        ph = chest_phantom(vseed, shape_zyx=(depth, size, size), spacing_mm=(px, px, z_mm), n_nodules=(1, 6))
        nod = ph.masks["lung_nodule"] > 0
        lung_slices = np.flatnonzero(ph.masks["lung"].reshape(depth, -1).any(1))
        pos = np.flatnonzero(nod.reshape(depth, -1).any(1))
        near_nodule = ndimage.binary_dilation(nod.reshape(depth, -1).any(1), iterations=2)  # not negatives
        neg = np.setdiff1d(lung_slices, np.flatnonzero(near_nodule))
        if positive_sampling == "nodule":
            per_nodule = [np.flatnonzero((ph.nodule_labels == n.label).reshape(depth, -1).any(1)) for n in ph.nodules]
            per_nodule = [zs for zs in per_nodule if len(zs)] or [pos]  # (labels and mask always agree)
        for _ in range(per_volume):
            u = rng.random()
            if u < unrelated_fraction:
                z, target = int(rng.integers(depth)), "none"
            elif u < unrelated_fraction + negative_fraction and len(neg):
                z, target = int(rng.choice(neg)), "lung_nodule"
            elif u < 0.85 and len(pos):
                if positive_sampling == "nodule":
                    z = int(rng.choice(per_nodule[rng.integers(len(per_nodule))]))
                else:
                    z = int(rng.choice(pos))
                target = "lung_nodule"
            else:
                target = ("lung", "heart", "aorta")[rng.integers(3)]
                present = np.flatnonzero(ph.masks[target].reshape(depth, -1).any(1))
                z = int(rng.choice(present)) if len(present) else int(rng.integers(depth))
            phrasings = UNRELATED_PROMPTS if target == "none" else vocab.TARGETS[target].prompts
            prompt = phrasings[rng.integers(len(phrasings))]
            name = "lung" if rng.random() < 0.6 else TRAIN_WINDOWS[rng.integers(len(TRAIN_WINDOWS))]
            if target in ("heart", "aorta") and rng.random() < 0.6:
                name = "mediastinum"
            w = intensity.WINDOWS[name]
            lo_z, hi_z = max(0, z - 8), min(depth, z + 9)  # covers +-5 mm of context at >= 0.7 mm spacing
            span = ph.image[lo_z:hi_z]
            windowed = intensity.apply_window(span, jittered(w, rng))
            stack = context_stack(windowed, [z - lo_z], z_mm, offsets_mm)[0]
            images.append(np.round(stack * 255).astype(np.uint8))
            m = ph.masks.get(target)
            masks.append(np.zeros((size, size), bool) if m is None or target == "none" else m[z] > 0)
            prompts.append(prompt)
            targets.append(target)
    return ExampleSet(np.stack(images), np.stack(masks), prompts, targets)

