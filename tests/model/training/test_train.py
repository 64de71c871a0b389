"""A short CPU training run: logs, plot, checkpoints, resume, and the loss."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzformer.checkpoint import load_model
from boltzformer.training.train import TrainConfig, component_multipliers, dice_loss, segmentation_loss, train

RESOURCES = Path(__file__).resolve().parents[3] / "resources"


def test_dice_loss_rewards_overlap_and_empty_predictions_for_empty_targets():
    t = torch.zeros(1, 1, 8, 8)
    t[..., 2:5, 2:5] = 1
    good = torch.where(t > 0, 10.0, -10.0)
    bad = -good
    assert dice_loss(good, t) < 0.05 < 0.9 < dice_loss(bad, t)
    empty = torch.zeros_like(t)
    assert dice_loss(torch.full_like(t, -10.0), empty) < 0.01
    loss, parts = segmentation_loss(good, t)
    assert set(parts) == {"dice_loss", "bce"} and float(loss) < 0.1


def test_positive_weighting_revives_saturated_small_lesions():
    """Logits stuck at -20 on a 9-pixel lesion: plain BCE barely pulls them up, balanced BCE does,
    and empty slices are unaffected by the weighting."""
    t = torch.zeros(2, 1, 64, 64)
    t[0, 0, 5:8, 5:8] = 1
    grads = []
    for cap in (1.0, 20.0):
        logits = torch.full_like(t, -20.0, requires_grad=True)
        segmentation_loss(logits, t, positive_weight_max=cap)[0].backward()
        grads.append(logits.grad)
    assert float(grads[1][0, 0, 6, 6]) == pytest.approx(20 * float(grads[0][0, 0, 6, 6]), rel=1e-2)
    assert torch.allclose(grads[1][1], grads[0][1])  # lesion-free slice
    assert torch.allclose(grads[1][0][t[0] == 0], grads[0][0][t[0] == 0])  # background pixels


def test_component_multipliers_count_each_lesion_once():
    """A 4-pixel and a 100-pixel lesion on one slice: with area_ref 64 the small one's pixels weigh
    16x (capped at 10 here), the large one's and the background's 1x; empty slices stay at 1."""
    m = np.zeros((2, 32, 32), bool)
    m[0, 2:4, 2:4] = True  # 4 px
    m[0, 10:20, 10:20] = True  # 100 px
    mult = component_multipliers(m, area_ref_px=64, cap=10)
    assert mult.shape == m.shape and mult.dtype == np.float32
    assert np.all(mult[0, 2:4, 2:4] == 10) and np.all(mult[0, 10:20, 10:20] == 1)
    assert np.all(mult[0][~m[0]] == 1) and np.all(mult[1] == 1)
    # below the cap, the small lesion's total weight equals area_ref
    assert float(component_multipliers(m, 64, 100)[0, 2:4, 2:4].sum()) == pytest.approx(64)
    # diagonal neighbours are one component (8-connectivity)
    d = np.zeros((1, 8, 8), bool)
    d[0, 1, 1] = d[0, 2, 2] = True
    assert np.all(component_multipliers(d, 8, 10)[0][d[0]] == 4)


def test_positive_multiplier_scales_lesion_pixels_only():
    t = torch.zeros(1, 1, 16, 16)
    t[0, 0, 2:4, 2:4] = 1
    mult = torch.from_numpy(component_multipliers(t[:, 0].numpy() > 0, 64, 10))[:, None]
    grads = []
    for m in (None, mult):
        logits = torch.zeros_like(t, requires_grad=True)
        segmentation_loss(logits, t, positive_weight_max=20.0, positive_multiplier=m)[0].backward()
        grads.append(logits.grad)
    lesion = t > 0
    # the BCE part of a lesion pixel's gradient is 10x; Dice's part is unchanged
    bce_plain = -0.5 * 20.0 / t.numel()
    assert float(grads[1][lesion][0] - grads[0][lesion][0]) == pytest.approx(9 * bce_plain, rel=1e-4)
    assert torch.allclose(grads[1][~lesion], grads[0][~lesion])


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(model="boltzformer-test", synth_train=24, synth_val=12, steps=4, steps_per_epoch=2,
                       batch_size=4, workers=1, cache_dir=str(tmp_path / "cache"), use_real=False,
                       warmup_steps=1, device="cpu", real_weight=0.0)


def test_short_run_writes_log_plot_weights_and_resumes(cfg, tmp_path):
    out = tmp_path / "run"
    best = train(cfg, out)
    assert best.is_file() and (out / "curves.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    model, bank, meta, _ = load_model(best)
    assert "lung nodule" in bank and meta["trained_steps"] in (2, 4)
    # resume: two more steps continue from step 4
    cfg.steps = 6
    train(cfg, out)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 6


def test_a_leg_ended_by_max_minutes_exits_75_and_the_same_command_finishes_it(cfg, tmp_path, capsys):
    """--max-minutes ending a leg with steps left exited 0, as a finished run does: a wrapper
    looping "until done" could not tell. Now 75 (EX_TEMPFAIL: run again), then 0 once done."""
    import dataclasses

    from boltzformer.cli import main

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    out = tmp_path / "legs"
    assert main(["train", "--config", str(config), "--out", str(out), "--max-minutes", "1e-9"]) == 75
    said = capsys.readouterr().out
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert step < cfg.steps and f"stopped at step {step} of {cfg.steps}" in said
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == cfg.steps
    assert "best weights:" in capsys.readouterr().out


def test_a_run_stopped_mid_epoch_and_resumed_gives_the_weights_of_a_straight_run(cfg, tmp_path, monkeypatch):
    """Ctrl-C is taken between two steps: the checkpoint holds step 3 (mid-epoch) with the
    random generators' states, and the resumed run ends on the very weights of a run never
    stopped; a resumed run must keep its options."""
    import signal

    from safetensors.torch import load_file

    from boltzformer.errors import BoltzformerError
    from boltzformer.training import train as train_mod

    straight = train(cfg, tmp_path / "straight")
    sample, calls = train_mod.BatchSampler.sample, []

    def ctrl_c_on_third(self, n):
        calls.append(n)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step finishes first
        return sample(self, n)

    monkeypatch.setattr(train_mod.BatchSampler, "sample", ctrl_c_on_third)
    out = tmp_path / "chunks"
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(cfg, out)
    assert "holds step 3" in stopped.value.note
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(train_mod.BatchSampler, "sample", sample)
    changed = TrainConfig(**{**cfg.__dict__, "lr": 0.5})
    with pytest.raises(BoltzformerError, match=r"other options \(lr 0.001 -> 0.5\)"):
        train(changed, out)
    train(cfg, out)
    a, b = load_file(str(straight.with_name("last.safetensors"))), load_file(str(out / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]


def test_bad_training_input_is_one_line_before_any_work(cfg, tmp_path, monkeypatch):
    from boltzformer.errors import BoltzformerError, OutputError

    for field, value, said in (("steps", 0, "steps=0 (at least 1)"), ("lr", -1.0, "lr=-1.0 (0 or more)"),
                               ("batch_size", 0, "batch_size=0"), ("negative_fraction", 1.5, "between 0 and 1"),
                               ("model", "boltzformer-xxl", "boltzformer-xxl"),
                               ("init_weights", str(tmp_path / "none.safetensors"), "init_weights does not exist")):
        with pytest.raises(BoltzformerError, match=said.replace("(", r"\(").replace(")", r"\)")):
            train(TrainConfig(**{**cfg.__dict__, field: value}), tmp_path / field)
        assert not (tmp_path / field).exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot be made a folder"):
        train(cfg, tmp_path / "file")
    (tmp_path / "broken").mkdir()
    for broken in (b"half a checkpoint", b""):  # empty: torch's EOFError has no message (an IndexError escaped)
        (tmp_path / "broken" / "last.pt").write_bytes(broken)
        with pytest.raises(BoltzformerError, match="last.pt: cannot be read as a training checkpoint"):
            train(cfg, tmp_path / "broken")
    from boltzformer.training import train as train_module

    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    for machine_short in (MemoryError(), allocator):  # the machine's memory, not the file: not "move it away"
        def load(*args, error=machine_short, **kwargs):
            raise error

        monkeypatch.setattr(train_module.torch, "load", load)
        with pytest.raises(type(machine_short)):
            train_module._read_checkpoint(tmp_path / "broken" / "last.pt", cfg)
    monkeypatch.undo()
    monkeypatch.setenv("BOLTZFORMER_REAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(BoltzformerError, match="BOLTZFORMER_REAL_DATA=.*nowhere: no cases.csv"):
        train(TrainConfig(**{**cfg.__dict__, "use_real": True}), tmp_path / "real")
    assert not (tmp_path / "real").exists()
    (tmp_path / "c.json").write_text(json.dumps({"steps": "many"}))
    with pytest.raises(BoltzformerError, match='c.json: steps="many": steps takes a value of type int'):
        TrainConfig.load(tmp_path / "c.json")


@pytest.mark.parametrize("item, expected", [
    ("steps=abc", 'steps takes a value of type int (now 3000), not "abc"'),
    ("steps=2.5", "steps takes a value of type int"),
    ("lr=true", "lr takes a value of type float"),
])
def test_set_values_of_the_wrong_type_stop_train_before_it_starts(item, expected, tmp_path, capsys):
    from boltzformer import cli

    out = tmp_path / "run"
    code = cli.main(["train", "--config", str(RESOURCES / "boltzformer-s.train.json"), "--out", str(out), "--set", item])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and not out.exists()


def test_set_accepts_an_int_where_a_float_is_wanted():
    from boltzformer.training.train import _as_option_type

    assert _as_option_type("lr=1", "lr", 1e-4, 1) == 1.0 and isinstance(_as_option_type("lr=1", "lr", 1e-4, 1), float)


def test_config_rejects_unknown_options(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.load(p)


def test_no_synthetic_validation_is_refused_before_any_data_is_made(tmp_path):
    """synth_val=0 passed the check and failed at the first epoch's end ('need at least one array
    to concatenate'): best.safetensors is chosen on that set."""
    from boltzformer.errors import BoltzformerError

    with pytest.raises(BoltzformerError, match=r"synth_val=0 \(at least 1\)"):
        TrainConfig(synth_val=0).check()


def test_the_curves_say_which_epoch_best_holds_and_plot_what_it_was_chosen_on(tmp_path):
    """The phantom figures that choose best.safetensors were not plotted, nor the best epoch."""
    import math

    from boltzformer.training.train import selection_score

    rows = [{"epoch": e, "loss": 1.0 / e, "val_synth_dice": 0.3, "val_synth_dice_small": math.nan,
             "val_synth_negative_fp_rate": 0.2, "val_phantom_dice": d, "val_phantom_dice_small": 0.1,
             "val_phantom_negative_fp_rate": fp} for e, d, fp in ((1, 0.2, 0.1), (2, 0.5, 0.4), (3, 0.4, 0.0))]
    assert [round(selection_score(r), 3) for r in rows] == [0.2, 0.2, 0.35]  # epoch 3: fewer false positives
    plotted = {}
    from boltzformer.plots import pyplot
    from boltzformer.training.train import plot_curves

    plt = pyplot()
    real_subplots = plt.subplots

    def keep(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        plotted["ax"] = ax
        return fig, ax

    plt.subplots = keep
    try:
        plot_curves(rows, tmp_path / "curves.png")
    finally:
        plt.subplots = real_subplots
    labels = plotted["ax"][1].get_legend_handles_labels()[1]
    assert "phantom chests" in labels and "phantom: FP rate on lesion-free slices" in labels
    assert "best.safetensors (epoch 3)" in labels and (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["boltzformer-s.train.json", "boltzformer-s.finetune.json", "boltzformer-s.stage3.json",
                                  "boltzformer-s.stage4.json", "boltzformer-s.stage11.json"])
def test_recorded_training_configs_load(name):
    """The configs that produced the bundled weights stay readable by `boltzformer train`."""
    from pathlib import Path

    from boltzformer.network.config import get_config

    cfg = TrainConfig.load(Path(__file__).parents[3] / "resources" / name)
    get_config(cfg.model, **cfg.model_overrides)  # valid network overrides


def test_warm_start_loads_matching_weights_into_a_changed_network(cfg, tmp_path):
    """Stage 2 of the bundled recipe: a stride-4 run's weights initialise a stride-2 network."""
    from safetensors.torch import load_file

    first = train(cfg, tmp_path / "stride4")
    cfg.model_overrides = {"mask_stride": 2}
    cfg.init_weights = str(first)
    cfg.steps_per_epoch = 1
    cfg.steps = 1
    cfg.lr = 0.0
    best = train(cfg, tmp_path / "stride2")
    old, new = load_file(str(first)), load_file(str(best))
    assert new["pigma.up.weight"].shape != old["pigma.up.weight"].shape
    assert torch.equal(new["encoder.stem.0.weight"], old["encoder.stem.0.weight"])
    assert float(new["encoder.detail.mix.4.weight"].abs().sum()) == 0.0  # starts as "no detail"


def test_small_lesion_fraction_swaps_positive_lesion_items_for_small_ones():
    """With the option on, positive lesion items come from the < 0.1 % band; negatives stay."""
    from boltzformer.training.data import ExampleSet
    from boltzformer.training.testset import SMALL_AREA
    from boltzformer.training.train import BatchSampler

    n, s = 40, 32
    masks = np.zeros((n, s, s), bool)
    for i in range(30):  # 10 small (1 px of 32² = 0.098 % of the slice), 20 large
        if i < 10:
            masks[i, 5, 5] = True
        else:
            masks[i, 4:20, 4:20] = True
    # items 30-39: lesion prompts with an empty mask (negative pairs)
    synth = ExampleSet(np.zeros((n, s, s), np.uint8), masks, ["lung nodule"] * n, ["lung_nodule"] * n)
    empty = ExampleSet(np.zeros((0, s, s), np.uint8), np.zeros((0, s, s), bool), [], [])

    def draw(fraction):
        cfg = TrainConfig(real_weight=0.0, lesion_fraction=1.0, small_lesion_fraction=fraction)
        _, m, _ = BatchSampler(synth, empty, cfg, np.random.default_rng(0)).sample(400)
        area = m.reshape(len(m), -1).mean(1)
        return (area > 0).mean(), ((area > 0) & (area < SMALL_AREA)).sum() / max((area > 0).sum(), 1)

    pos_share_0, small_share_0 = draw(0.0)
    pos_share_1, small_share_1 = draw(1.0)
    assert small_share_0 < 0.5 and small_share_1 == 1.0
    assert abs(pos_share_0 - pos_share_1) < 0.1  # the share of negative items is unchanged (~25 %)


def test_context_model_trains_on_phantom_chests_and_keeps_unrelated_prompts_out_of_its_bank(cfg, tmp_path):
    """2.5D: 3D phantom chests with context, 2D slices repeated as their own context."""
    from boltzformer.training.data import UNRELATED_PROMPTS

    cfg.model_overrides = {"context_offsets_mm": [-2.5, 2.5]}
    cfg.phantom_volumes, cfg.phantom_val_volumes, cfg.phantom_slices_per_volume = 1, 1, 6
    cfg.phantom_weight = 0.5
    best = train(cfg, tmp_path / "ctx")
    model, bank, meta, _ = load_model(best)
    assert model.cfg.in_channels == 3
    rows = list(csv.DictReader(open(tmp_path / "ctx" / "log.csv")))
    assert "val_phantom_dice" in rows[-1] and "val_phantom_negative_fp_rate" in rows[-1]
    assert not set(UNRELATED_PROMPTS) & set(bank)


def test_2d_model_trains_on_channel_0_of_the_shared_phantom_cache(cfg, tmp_path):
    """A network without context reads the slice itself from the phantom cache the 2.5D networks
    use (one cache, same slices), and the per-lesion weighting runs in the loop."""
    from boltzformer.training.train import phantom_cache_path

    cfg.phantom_volumes, cfg.phantom_val_volumes, cfg.phantom_slices_per_volume = 1, 1, 6
    cfg.phantom_weight, cfg.component_area_ref_px = 0.5, 64.0
    best = train(cfg, tmp_path / "flat")
    model, _, meta, _ = load_model(best)
    assert model.cfg.in_channels == 1
    assert meta["training"]["config"]["component_area_ref_px"] == 64.0
    assert phantom_cache_path(cfg, 1, cfg.seed, 64, (-5.0, -2.5, 2.5, 5.0)).is_file()
    rows = list(csv.DictReader(open(tmp_path / "flat" / "log.csv")))
    assert "val_phantom_dice" in rows[-1] and "val_phantom_negative_fp_rate" in rows[-1]


def test_sqrt_group_sampling_lifts_rare_real_targets():
    """real_sampling="sqrt_group": 90 liver slices no longer crowd out 10 lung tumours 9 to 1."""
    from boltzformer.training.data import ExampleSet
    from boltzformer.training.train import BatchSampler, real_draw_probabilities

    s = 16
    masks = np.zeros((100, s, s), bool)
    masks[:, 4:8, 4:8] = True
    targets = ["liver"] * 90 + ["lung_tumor"] * 10
    real = ExampleSet(np.zeros((100, s, s), np.uint8), masks, ["x"] * 100, targets)
    assert real_draw_probabilities(real, "example") is None
    p = real_draw_probabilities(real, "sqrt_group")
    assert p.sum() == pytest.approx(1.0)
    assert p[90:].sum() == pytest.approx(np.sqrt(10) / (np.sqrt(10) + np.sqrt(90)))  # 0.25 instead of 0.10
    with pytest.raises(ValueError, match="real_sampling"):
        real_draw_probabilities(real, "uniform")

    synth = ExampleSet(np.zeros((4, s, s), np.uint8), np.zeros((4, s, s), bool), ["x"] * 4, ["liver"] * 4)
    cfg = TrainConfig(real_weight=1.0, real_sampling="sqrt_group")
    sampler = BatchSampler(synth, real, cfg, np.random.default_rng(0))
    sampler.real.prompts = ["liver"] * 90 + ["lung tumor"] * 10
    _, _, prompts = sampler.sample(800)
    share = np.mean([p in ("lung tumor", "lung tumour", "lung mass", "lung cancer") or "lung" in p for p in prompts])
    assert 0.18 < share < 0.32
