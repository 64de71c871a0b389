"""Markdown tables for the model card from `boltzformer evaluate --json` outputs.

    python benchmarks/accuracy_tables.py benchmarks/results/eval_synth.json \
        benchmarks/results/eval_real_heldout.json benchmarks/results/eval_real_train.json

(boltzformer.training.accuracy_tables; the numbers are copied from the JSON, never typed by hand.)
"""

from boltzformer.training.accuracy_tables import main

if __name__ == "__main__":
    raise SystemExit(main())
