"""matplotlib is an optional extra: only figures need it, and without it they say so in one line."""

import sys

import pytest

from boltzformer.errors import BoltzformerError
from boltzformer.plots import pyplot


def test_pyplot_draws_to_files():
    assert pyplot().get_backend().lower() == "agg"


def test_without_matplotlib_a_figure_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(BoltzformerError, match=r"needs matplotlib: pip install 'napari-boltzformer\[plots\]'$"):
        pyplot()


def test_train_without_matplotlib_stops_before_training(monkeypatch, tmp_path, capsys):
    from boltzformer.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = tmp_path / "c.json"
    config.write_text('{"steps": 1, "use_real": false}')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "boltzformer: error: this writes a figure and needs matplotlib: pip install 'napari-boltzformer[plots]'\n"
    assert not (tmp_path / "run").exists()


def test_the_runtime_does_not_import_matplotlib():
    import subprocess

    code = ("import sys, boltzformer.segmenter, boltzformer.cli, boltzformer.cohort, boltzformer.evaluate; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
