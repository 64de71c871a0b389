"""The ablation runner's outputs: a subset or an empty run never replaces the published table."""

from __future__ import annotations

import math

from boltzformer.training import ablations


def test_an_inference_only_run_without_row_0_writes_nothing_over_the_published_results(tmp_path, monkeypatch, capsys):
    """It replaced ablations.md by its header and ablations.png by empty axes, exit 0."""
    monkeypatch.setattr(ablations.data_mod, "default_real_dir", lambda: None)
    published = tmp_path / "results"
    published.mkdir()
    (published / "ablations.md").write_text("the published table\n")
    code = ablations.main(["--inference-only", "--out", str(tmp_path / "runs")], results=published)
    assert code == 1 and "nothing written" in capsys.readouterr().err
    assert (published / "ablations.md").read_text() == "the published table\n"
    assert not (published / "ablations.png").exists()


def test_the_table_and_figure_are_written_whole(tmp_path):
    row = {"synth_dice": 0.5, "synth_dice_small": 0.2, "synth_dice_medium": 0.6, "synth_dice_large": 0.8,
           "negative_fp_rate": 0.1, "real_dice": math.nan, "decoder_ms_per_slice": 1.5}
    ablations.write_markdown_and_plot([dict(row, row="full model"), dict(row, row="uniform sampling")], 10, tmp_path)
    assert (tmp_path / "ablations.md").read_text().count("\n| ") == 3  # the header's rule and two rows
    assert (tmp_path / "ablations.png").stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))
