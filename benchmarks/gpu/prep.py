"""`python benchmarks/gpu/prep.py` (here, with ../shared/data/real): prepare for benchmarks/gpu/driver.py
what the GPU machine cannot build itself (no SimpleITK, no MiniLM wheel there):
the real train-split volumes as read here (pickled Volume objects, lzma), their cases.csv rows,
and the prompt bank (frozen MiniLM embeddings)."""
import csv, lzma, pickle
from pathlib import Path
from boltzformer.io import read_volume
from boltzformer.evaluate import read_cases, read_split
from boltzformer.network.config import get_config
from boltzformer.network.text import SentenceEncoder
from boltzformer.training import data as d
from boltzformer.training.train import TrainConfig, prompt_vocabulary

out = Path("runs/gpu")
out.mkdir(parents=True, exist_ok=True)
real = Path("../shared/data/real")
split = read_split(d.REAL_SPLIT)
rows = [r for r in read_cases(real) if split.get(r["case_id"]) == "train"]
vols = {}
for r in rows:
    for kind in ("image", "mask"):
        name = f"{r['case_id']}_{kind}.nii.gz"
        vols[name] = read_volume(real / name)
with lzma.open(out / "real_train_volumes.pkl.xz", "wb", preset=6) as f:
    pickle.dump(vols, f)
(out / "real").mkdir(exist_ok=True)
with open(real / "cases.csv") as src, open(out / "real" / "cases.csv", "w", newline="") as dst:
    reader = csv.DictReader(src)
    w = csv.DictWriter(dst, fieldnames=reader.fieldnames)
    w.writeheader()
    for row in reader:
        if split.get(row["case_id"]) == "train":
            w.writerow(row)
print("train cases", len(rows), (out / "real_train_volumes.pkl.xz").stat().st_size / 1e6, "MB")
cfg = TrainConfig.load("resources/boltzformer-s.stage4.json")
net = get_config(cfg.model, **cfg.model_overrides)
all_prompts = [r["prompt"] for r in read_cases(real)]
prompts = prompt_vocabulary(all_prompts) + list(d.UNRELATED_PROMPTS)
enc = SentenceEncoder(net.max_text_tokens)
bank = dict(zip(prompts, enc.encode(prompts)))
pickle.dump({k: (v.tokens, v.pooled) for k, v in bank.items()}, open(out / "bank.pkl", "wb"))
print("bank", len(bank))
