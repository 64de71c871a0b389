"""Training, apart from the runtime core: nothing outside this package (and the CLI) imports it.

`train` (the slice network: `boltzformer train`), `data` (synthetic, phantom and real training
examples; `real_split.csv`, the split of the real cases), `train_fp` (the 3D false-positive
classifier), `testset` (the held-out synthetic evaluation set: `boltzformer testset`),
`ablations` and `accuracy_tables` (the model card's ablation rows and accuracy tables; run by
the scripts in benchmarks/).
"""
