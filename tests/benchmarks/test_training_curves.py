"""benchmarks/training_curves.py: the x axis names the batch size the runs were trained with."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "training_curves.py"


def _script():
    spec = importlib.util.spec_from_file_location("training_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, batch_size) -> Path:
    folder.mkdir()
    (folder / "log.csv").write_text("epoch,step,loss,val_synth_dice\n1,10,0.9,0.2\n2,20,0.7,0.4\n")
    if batch_size is not None:
        (folder / "train_config.json").write_text(json.dumps({"batch_size": batch_size, "steps": 20}))
    return folder / "log.csv"


def test_batch_size_comes_from_the_runs_config(tmp_path):
    curves = _script()
    assert curves.batch_size_of(_run(tmp_path / "a", 8)) == 8
    assert curves.batch_size_of(_run(tmp_path / "b", None)) is None  # no config beside the log: unknown


def test_the_figure_is_drawn_with_the_batch_size(tmp_path, monkeypatch):
    curves = _script()
    labels = []
    monkeypatch.setattr(curves, "save_figure", lambda fig, out, dpi: labels.extend(ax.get_xlabel() for ax in fig.axes))
    assert curves.main([str(_run(tmp_path / "a", 8)), "--out", str(tmp_path / "c.png")]) == 0
    assert labels == ["training step (batch 8)"] * 2
    labels.clear()
    assert curves.main([str(_run(tmp_path / "b", None)), str(tmp_path / "a" / "log.csv"), "--out", str(tmp_path / "c.png")]) == 0
    assert labels == ["training step"] * 2  # a stage of unknown batch size: no size claimed
