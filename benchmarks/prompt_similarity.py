"""How close free-text prompts come to the prompts the model knows: the refusal threshold.

    python benchmarks/prompt_similarity.py --json benchmarks/results/prompt_similarity.json

A prompt is accepted when the cosine similarity of its sentence embedding to the nearest known
prompt reaches `segmenter.MIN_PROMPT_SIMILARITY`. That number is chosen here, between the
similarities of phrasings a radiologist might type for targets the model knows (which must
pass) and of unrelated words and sentences (which must be refused).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from boltzformer.segmenter import MIN_PROMPT_SIMILARITY, Segmenter

SYNONYMS = (
    "pulmonary nodules", "nodule", "lung nodules please", "small nodule in the right lung", "lung lesion",
    "pulmonary lesion", "lung metastasis", "lung mets", "liver lesions", "hepatic tumour", "liver cyst", "kidney cyst",
    "renal lesion", "renal tumour", "ms lesions", "white matter hyperintensity", "white matter lesions", "brain lesion",
    "brain metastasis", "glioblastoma", "heart chambers", "myocardium", "aortic arch", "descending aorta",
    "vertebral bodies", "spinal column", "right lower lobe", "lungs left", "spleen tissue", "enlarged spleen",
    "liver parenchyma", "cardiac silhouette", "kidneys both", "ground glass opacity", "lung tumour mass", "breast mass",
    "breast tumor", "breast cancer", "tumour", "lesion", "mass", "cyst", "metastases", "vena cava",
)
UNRELATED = (
    "banana", "a red sports car", "what is the weather today", "hello", "dog", "cat", "pizza", "table", "chair",
    "computer", "the eiffel tower", "music", "happy birthday", "airplane", "tree", "window", "blue", "running shoes",
    "coffee", "democracy", "quantum physics", "television", "phone", "book", "river", "yellow submarine", "ice cream",
    "car engine", "elephant", "shopping list", "asdfgh", "xyz", "123", "test", "hello world", "my name is john",
    "football", "sky", "water bottle", "keyboard",
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seg = Segmenter.from_pretrained(args.weights, device="cpu")
    rows = {}
    for group, prompts in (("synonyms", SYNONYMS), ("unrelated", UNRELATED)):
        rows[group] = [{"prompt": p, "nearest": seg.nearest_prompts(p, 1)[0][0],
                        "similarity": seg.nearest_prompts(p, 1)[0][1]} for p in prompts]
    syn = np.array([r["similarity"] for r in rows["synonyms"]])
    unr = np.array([r["similarity"] for r in rows["unrelated"]])
    summary = {"synonyms_min": float(syn.min()), "synonyms_median": float(np.median(syn)),
               "unrelated_max": float(unr.max()), "unrelated_median": float(np.median(unr)),
               "threshold": MIN_PROMPT_SIMILARITY,
               "synonyms_refused": [r["prompt"] for r in rows["synonyms"] if r["similarity"] < MIN_PROMPT_SIMILARITY],
               "unrelated_accepted": [r["prompt"] for r in rows["unrelated"] if r["similarity"] >= MIN_PROMPT_SIMILARITY]}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, **rows}, indent=2))


if __name__ == "__main__":
    main()
