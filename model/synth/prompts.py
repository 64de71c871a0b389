"""The prompt vocabulary: segmentation targets, their phrasings and their CT window.

Synonyms and phrasings teach the text projection that "pulmonary nodule" and "nodule in the
lung" mean the same target; the frozen sentence encoder then carries unseen phrasings nearby.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetSpec:
    key: str
    modality: str  # "CT" or "MR"
    prompts: tuple[str, ...]
    window: str  # CT window the target is best seen in (see intensity.WINDOWS)


_SPECS = [
    TargetSpec("lung_nodule", "CT", ("lung nodule", "pulmonary nodule", "nodule in the lung", "lung nodules",
                                     "solitary pulmonary nodule", "ground-glass nodule", "small lung lesion"), "lung"),
    TargetSpec("lung_tumor", "CT", ("lung tumor", "lung tumour", "lung cancer", "lung mass", "pulmonary mass",
                                    "tumor in the lung"), "lung"),
    TargetSpec("liver_lesion", "CT", ("liver lesion", "liver tumor", "hepatic lesion", "liver metastasis",
                                      "liver mass"), "soft_tissue"),
    TargetSpec("kidney_lesion", "CT", ("kidney lesion", "renal mass", "kidney tumor", "renal cyst"), "soft_tissue"),
    TargetSpec("liver", "CT", ("liver", "the liver", "hepatic parenchyma"), "soft_tissue"),
    TargetSpec("kidney", "CT", ("kidney", "kidneys", "renal"), "soft_tissue"),
    TargetSpec("spleen", "CT", ("spleen", "the spleen", "splenic"), "soft_tissue"),
    TargetSpec("aorta", "CT", ("aorta", "the aorta", "aortic lumen"), "mediastinum"),
    TargetSpec("inferior_vena_cava", "CT", ("inferior vena cava", "ivc", "vena cava"), "soft_tissue"),
    TargetSpec("heart", "CT", ("heart", "the heart", "cardiac"), "mediastinum"),
    TargetSpec("lung", "CT", ("lung", "lungs", "lung field"), "lung"),
    TargetSpec("left_lung", "CT", ("left lung",), "lung"),
    TargetSpec("right_lung", "CT", ("right lung",), "lung"),
    TargetSpec("vertebra", "CT", ("vertebra", "vertebral body", "spine"), "bone"),
    TargetSpec("ms_lesion", "MR", ("multiple sclerosis lesion", "ms lesion", "white matter lesion",
                                   "demyelinating lesion", "ms plaque"), "brain"),
    TargetSpec("brain_tumor", "MR", ("brain tumor", "brain tumour", "glioma", "brain mass", "enhancing tumor"), "brain"),
]

TARGETS: dict[str, TargetSpec] = {s.key: s for s in _SPECS}
_BY_PROMPT = {p.lower(): s.key for s in _SPECS for p in s.prompts}


def all_prompts() -> list[str]:
    return [p for s in _SPECS for p in s.prompts]


def target_of_prompt(prompt: str) -> str | None:
    """The target a known phrasing names (exact match, case-insensitive), else None."""
    return _BY_PROMPT.get(" ".join(prompt.lower().split()))


# Structures with one outline (organ mode in the panel: one row, the largest component), and
# those among them that come in two (the two largest components are kept).
ORGAN_TARGETS = frozenset({"liver", "kidney", "spleen", "aorta", "inferior_vena_cava", "heart", "lung",
                           "left_lung", "right_lung", "vertebra"})
PAIRED_TARGETS = frozenset({"kidney", "lung"})
# Every other target is a lesion, in TARGETS order (training and the test set draw from it by index).
LESION_TARGETS = tuple(k for k in TARGETS if k not in ORGAN_TARGETS)
_LESION_WORDS = ("lesion", "nodul", "tumor", "tumour", "mass", "cancer", "cyst", "metasta", "plaque", "glioma",
                 "carcinoma", "polyp", "abscess")
_ORGAN_WORDS = ("liver", "hepatic", "kidney", "renal", "spleen", "splenic", "aorta", "aortic", "vena cava", "ivc",
                "heart", "cardiac", "lung", "pulmonary", "vertebra", "spine")


def target_kind(target: str | None) -> str:
    """'organ' for a structure with one outline, else 'lesion' (a list of candidates)."""
    return "organ" if target in ORGAN_TARGETS else "lesion"


def kind_of_prompt(prompt: str) -> str:
    """'organ' or 'lesion': a known phrasing by its target; otherwise an organ word without a
    lesion word ("the aortic root") is an organ, anything else a list of lesions (the view that
    hides nothing)."""
    target = target_of_prompt(prompt)
    if target is not None:
        return target_kind(target)
    text = " ".join(prompt.lower().split())
    if any(w in text for w in _LESION_WORDS):
        return "lesion"
    return "organ" if any(w in text for w in _ORGAN_WORDS) else "lesion"
