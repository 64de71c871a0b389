"""Segmenter on volumes: geometry, slice ranges, seeds, runs/uncertainty, attention, stopping."""

import numpy as np
import pytest
import torch

from boltzformer.checkpoint import save_model
from boltzformer.errors import BoltzformerError, PromptError
from boltzformer.io import Volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.devices import resolve_device
from boltzformer.segmenter import Segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_segmenter):
    return tiny_segmenter


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    arr = rng.normal(-700, 100, size=(5, 40, 48)).astype(np.int16)
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    return Volume(arr, (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), direction, "CT", None, {})


def test_result_matches_input_geometry(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule")
    assert r.mask.shape == r.probabilities.shape == volume.shape
    assert r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1}
    mv = r.mask_volume()
    assert mv.same_geometry(volume)
    assert r.window == "lung" and r.modality == "CT"


def test_a_blank_image_is_warned_about_and_a_varied_one_is_not(segmenter, volume):
    assert not [w for w in segmenter.segment_volume(volume, "lung nodule").warnings if "every voxel" in w]
    blank = volume.with_array(np.full(volume.shape, -1000, np.int16))
    warned = [w for w in segmenter.segment_volume(blank, "lung nodule").warnings if "every voxel" in w]
    assert len(warned) == 1 and "-1000" in warned[0]
    # constant first slice, varied below: not blank
    arr = volume.array.copy()
    arr[0] = 0
    assert not [w for w in segmenter.segment_volume(volume.with_array(arr), "lung nodule").warnings if "every voxel" in w]


@pytest.mark.parametrize("prompt, modality, warned", [
    ("lung nodule", "MR", True), ("multiple sclerosis lesion", "CT", True), ("Pulmonary Nodule", "MR", True),
    ("lung nodule", "CT", False), ("ms lesion", "MR", False)])
def test_a_target_asked_for_on_the_other_modality_is_warned_about(segmenter, volume, prompt, modality, warned):
    r = segmenter.segment_volume(volume, prompt, modality=modality)
    said = [w for w in r.warnings if "untested on" in w]
    assert bool(said) == warned
    if warned:
        assert said[0].startswith(f"untested on {modality}:")


def test_slice_range_only_touches_those_slices(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule", slices=(1, 3), threshold=0.0)
    assert r.slices == (1, 3)
    assert r.probabilities[[0, 3, 4]].max() == 0 and r.probabilities[1:3].min() > 0


def test_same_seed_reproduces_and_runs_give_uncertainty(segmenter, volume):
    a = segmenter.segment_volume(volume, "lung nodule", seed=3).probabilities
    b = segmenter.segment_volume(volume, "lung nodule", seed=3).probabilities
    c = segmenter.segment_volume(volume, "lung nodule", seed=4).probabilities
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    r = segmenter.segment_volume(volume, "lung nodule", runs=3, seed=3)
    assert r.uncertainty is not None and r.uncertainty.shape == volume.shape and r.uncertainty.max() > 0


def test_cpu_network_runs_channels_last_and_gives_the_default_layouts_probabilities(tmp_path, volume):
    """The CPU segmenter keeps its convolutions channels-last (faster there); the probabilities must not
    depend on the layout beyond float rounding."""
    from boltzformer.checkpoint import save_model
    from boltzformer.network.boltzformer import build_model
    from boltzformer.network.config import get_config

    path = tmp_path / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=1), path, prompt_bank={})
    seg = Segmenter.from_pretrained(path, device="cpu")
    conv = seg.model.encoder.stages[0][0][0].weight  # C_out x C_in x 3 x 3, C_in > 1: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fast = seg.segment_volume(volume, "lung nodule", seed=2).probabilities
    assert seg.model.pigma.up.weight.is_contiguous(memory_format=torch.channels_last)
    seg.model.to(memory_format=torch.contiguous_format)
    default = seg.segment_volume(volume, "lung nodule", seed=2).probabilities
    np.testing.assert_allclose(fast, default, atol=1e-4)
    assert fast.max() > 0.01  # not two empty outputs


def test_attention_maps_have_one_entry_per_decoder_layer(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule", return_attention=True, slices=(1, 4))
    att = r.attention
    cfg = segmenter.config
    grid = cfg.image_size // cfg.finest_stride
    assert att.counts.shape == (cfg.num_layers, 3, grid, grid)
    assert att.slice_start == 1
    assert att.grid_scale_yx == pytest.approx((40 / grid, 48 / grid))
    # Every layer's counts add up to K tokens x m queries per slice.
    for layer, k in enumerate(att.tokens_per_query):
        stride = att.strides[layer]
        cell = (stride // cfg.finest_stride) ** 2  # nearest upsampling repeats each token
        assert att.counts[layer, 0].astype(np.float64).sum() == pytest.approx(k * cfg.num_queries * cell)


def test_rethreshold_changes_mask_without_inference(segmenter, volume, monkeypatch):
    r = segmenter.segment_volume(volume, "lung nodule", fp_reduction=False)  # rethreshold alone, no 3D filter
    monkeypatch.setattr(type(segmenter), "predict_batch", lambda *a, **k: pytest.fail("rethreshold ran the network"))
    r.rethreshold(0.0, min_lesion_mm3=0)
    assert r.mask.all()
    r.rethreshold(1.0)
    assert not r.mask.any()


def test_a_thin_lung_ct_says_the_3d_classifier_was_not_applied(segmenter, volume):
    def stack(array):
        return Volume(array, volume.spacing_mm, volume.origin_mm, volume.direction, "CT", None, {})

    thin = stack(volume.array[:1])  # one 2.5 mm slice: thinner than the classifier's 32 mm
    r = segmenter.segment_volume(thin, "lung nodule", threshold=0.0, min_lesion_mm3=0)
    assert any("3D nodule classifier was not applied" in w for w in r.warnings)
    assert all(row["nodule_score"] != row["nodule_score"] for row in r.lesions)  # NaN: not scored
    deep = segmenter.segment_volume(stack(np.repeat(volume.array, 3, axis=0)), "lung nodule",
                                    threshold=0.0, min_lesion_mm3=0)  # 15 slices, 37.5 mm
    assert not any("classifier" in w for w in deep.warnings)


def test_should_stop_returns_a_partial_result(segmenter, volume):
    calls = iter([False, True])
    r = segmenter.segment_volume(volume, "lung nodule", batch_size=2, should_stop=lambda: next(calls))
    assert not r.complete and r.slices_done == 2 and r.finished_slices == (0, 2)


def test_a_stopped_run_names_its_finished_slices_on_the_input_grid(segmenter, volume):
    """slices_done was start + count, read as 'slices before it are valid': on a z-flipped input
    the finished slices are the last ones, and on a sagittal one they are no slices of its own."""
    flipped = Volume(volume.array[::-1].copy(), volume.spacing_mm, volume.origin_mm,
                     volume.direction @ np.diag([1.0, 1.0, -1.0]), "CT", None, {})
    calls = iter([False, True])
    r = segmenter.segment_volume(flipped, "lung nodule", batch_size=2, should_stop=lambda: next(calls))
    n = volume.shape[0]
    assert r.slices_done == 2 and r.finished_slices == (n - 2, n)
    assert r.probabilities[n - 2:].any() and not r.probabilities[: n - 2].any()
    sagittal = Volume(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), volume.spacing_mm[::-1],
                      volume.origin_mm, volume.direction[:, ::-1].copy(), "CT", None, {})
    calls = iter([False, True])
    r = segmenter.segment_volume(sagittal, "lung nodule", batch_size=2, should_stop=lambda: next(calls))
    assert not r.complete and r.finished_slices is None and "stopped early: 2 axial slices done" in repr(r)


def test_progress_is_reported_per_batch(segmenter, volume):
    """A first Progress at 0 slices (with the warnings known before the network runs), then one
    per batch."""
    gen = segmenter.iter_segment(volume, "lung nodule", batch_size=2)
    done = [p.slices_done for p in gen]
    assert done == [0, 2, 4, 5]


def test_bad_arguments_are_user_errors(segmenter, volume):
    with pytest.raises(PromptError):
        segmenter.segment_volume(volume, "   ")
    with pytest.raises(BoltzformerError):
        segmenter.segment_volume(volume, "x", slices=(4, 2))
    with pytest.raises(BoltzformerError):
        resolve_device("tpu")


@pytest.fixture(scope="module")
def segmenter_with_prompts(tmp_path_factory):
    from boltzformer.network.text import SentenceEncoder

    prompts = ["lung nodule", "pulmonary nodule", "liver lesion", "heart", "multiple sclerosis lesion"]
    bank = dict(zip(prompts, SentenceEncoder(4).encode(prompts)))
    path = tmp_path_factory.mktemp("wp") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=0), path, prompt_bank=bank)
    return Segmenter.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("prompt", ["banana", "a red sports car", "what is the weather today"])
def test_prompts_that_name_nothing_known_are_refused_unless_forced(segmenter_with_prompts, volume, prompt):
    with pytest.raises(PromptError, match="names nothing this model was trained to find.*'lung nodule'|names nothing"):
        segmenter_with_prompts.segment_volume(volume, prompt)
    forced = segmenter_with_prompts.segment_volume(volume, prompt, force_prompt=True)
    assert any("forced" in w for w in forced.warnings)


@pytest.mark.parametrize("prompt", ["pulmonary nodules", "small nodule in the right lung", "liver lesions"])
def test_phrasings_of_known_targets_are_accepted(segmenter_with_prompts, prompt):
    text, warnings = segmenter_with_prompts.check_prompt(prompt)
    assert text == prompt and not warnings


def test_a_page_of_text_is_not_a_prompt(segmenter, volume):
    with pytest.raises(PromptError, match="10000 characters long; at most 500"):
        segmenter.segment_volume(volume, "nodule " * 1428 + "lung")


def test_mirror_averaging_mirrors_exactly_and_keeps_the_first_pass(segmenter, volume):
    """mirror=True is the mean of the slice's pass and its mirrored pass (mirrored back), both with
    the same sampling noise: a mirrored input gives the mirrored output, and the attention and the
    draws of later batches stay those of mirror=False."""
    volume = Volume(volume.array, volume.spacing_mm, volume.origin_mm, np.eye(3), "CT", None, {})  # already canonical
    mirrored = volume.with_array(np.ascontiguousarray(volume.array[:, :, ::-1]))  # left-right
    on = segmenter.segment_volume(volume, "lung nodule", mirror=True, return_attention=True, batch_size=2)
    flip = segmenter.segment_volume(mirrored, "lung nodule", mirror=True, batch_size=2)
    off = segmenter.segment_volume(volume, "lung nodule", mirror=False, return_attention=True, batch_size=2)
    assert on.mirror and not off.mirror
    np.testing.assert_allclose(on.probabilities, flip.probabilities[:, :, ::-1], atol=1e-5)
    assert not np.allclose(off.probabilities, on.probabilities, atol=1e-3)  # the mirror pass does something
    np.testing.assert_array_equal(on.attention.counts, off.attention.counts)
    # the mean of the two passes, computed by hand on one batch with the same seed
    slices = np.random.default_rng(1).random((2, 40, 48), dtype=np.float32)
    emb = segmenter.embed(["lung nodule"])[0]
    p, _ = segmenter.predict_batch(slices, emb, segmenter._generator(5), mirror=True)
    a, _ = segmenter.predict_batch(slices, emb, segmenter._generator(5))
    b, _ = segmenter.predict_batch(np.ascontiguousarray(slices[..., ::-1]), emb, segmenter._generator(5))
    np.testing.assert_allclose(p, (a + b[..., ::-1]) / 2, atol=1e-6)
    g_on, g_off = segmenter._generator(5), segmenter._generator(5)
    segmenter.predict_batch(slices, emb, g_on, mirror=True)
    segmenter.predict_batch(slices, emb, g_off)
    assert torch.equal(g_on.get_state(), g_off.get_state())


# -- the Python API's arguments (a review as a notebook user) -------------------------------------
@pytest.mark.parametrize("kwargs, says", [
    (dict(batch_size=-1), "batch_size must be a whole number of at least 1"),  # ran no slice: an empty "result"
    (dict(batch_size=0), "batch_size must be"),  # was taken as the default
    (dict(batch_size=2.5), "batch_size must be"),
    (dict(runs="2"), "runs must be a whole number"),
    (dict(runs=1.5), "runs must be"),
    (dict(seed=None), "seed must be a whole number from 0"),
    (dict(seed=-1), "seed must be"),
    (dict(seed=2**63), "seed must be"),  # gave seed 0's result
    (dict(seed=1.5), "seed must be"),
    (dict(slices=(2,)), "slices must be (start, stop)"),
    (dict(slices="2:4"), "slices must be (start, stop)"),
    (dict(slices=(-5, 3)), "slice indices count from 0"),
    (dict(threshold=float("nan")), "threshold must be between 0 and 1"),
    (dict(min_lesion_mm3=float("nan")), "min_lesion_mm3 must be a finite number"),  # emptied the mask
    (dict(min_lesion_mm3=-1), "min_lesion_mm3 must be"),
    (dict(min_nodule_score=2), "min_nodule_score must be between 0 and 1"),
    (dict(mirror="no"), "mirror must be True or False"),  # "no" turned mirroring on
    (dict(fp_reduction="False"), "fp_reduction must be True or False"),
    (dict(modality="PET"), "modality must be 'CT', 'MR' or 'auto'"),
])
def test_bad_arguments_are_refused_before_any_work(segmenter, volume, kwargs, says, monkeypatch):
    monkeypatch.setattr(Segmenter, "predict_batch", lambda *a, **k: pytest.fail("the network ran"))
    with pytest.raises(BoltzformerError) as err:
        segmenter.segment_volume(volume, "lung nodule", **kwargs)
    assert says in str(err.value)


def test_what_is_not_one_prompt_or_a_volume_is_refused(segmenter, volume):
    for prompt in (["lung nodule", "heart"], b"lung nodule"):  # were segmented as "['lung nodule', 'heart']"
        with pytest.raises(PromptError, match="one text"):
            segmenter.segment_volume(volume, prompt)
    with pytest.raises(TypeError, match="Volume.array_zyx|wrap an array with Volume"):
        segmenter.segment_volume(volume.array, "lung nodule")  # was an AttributeError from deep inside


def test_auto_modality_and_numpy_flags_are_accepted(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule", modality="auto", mirror=np.bool_(False), batch_size=np.int64(2))
    assert r.modality == "CT" and r.complete


def test_rethreshold_refuses_what_segment_refuses(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule")
    for bad in (2.0, float("nan")):
        with pytest.raises(BoltzformerError, match="threshold must be between 0 and 1"):
            r.rethreshold(bad)
    assert r.threshold == 0.5


@pytest.mark.parametrize("change, says", [
    (dict(spacing_mm=(1.0, 1.0, float("nan"))), "spacing_mm must be positive and finite"),  # gave an empty mask
    (dict(spacing_mm=(1.0, 1.0, float("inf"))), "spacing_mm must be positive and finite"),
    (dict(origin_mm=(0.0, float("nan"), 0.0)), "origin_mm must be finite"),
    (dict(direction=np.zeros((3, 3))), "direction must hold the x, y, z axes' unit vectors"),
    (dict(direction=[[1, .5, 0], [0, 1, 0], [0, 0, 1]]), "direction must hold the x, y, z axes' unit vectors"),
    (dict(direction=[[1, 0, 0], [0, 1, 1], [0, 0, 0]]), "direction must hold"),  # two axes the same: degenerate
    (dict(array=np.zeros((0, 10, 10))), "holds no voxel"),  # a TypeError from the range message
    (dict(array=np.zeros((2, 10, 10), np.complex64)), "must hold real numbers"),
])
def test_a_volume_refuses_geometry_read_volume_would_refuse(change, says):
    base = dict(array=np.zeros((2, 10, 10), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        Volume(**{**base, **change})


def test_a_notebook_prints_a_summary_not_the_arrays(segmenter, volume):
    r = segmenter.segment_volume(volume, "lung nodule", return_attention=True)
    for obj in (r, r.attention, volume):
        text = repr(obj)
        assert len(text) < 400 and "array(" not in text, text
    assert "prompt='lung nodule'" in repr(r) and "(5, 40, 48)" in repr(volume)


def test_an_image_whose_values_cannot_tell_takes_the_prompts_modality():
    """An 8-bit or 0-1 CT export with no modality in its file was taken as MR and MR-normalised,
    while the bundled weights learnt their CT targets on such images scaled as CT (a review of
    training against inference): on the 155 such real cases, mean Dice 0.566 -> 0.582 (train
    split) and 0.507 -> 0.514 (held out) with the modality left to the program."""
    seg = Segmenter.from_pretrained(device="cpu")
    rng = np.random.default_rng(0)
    grey = Volume(rng.integers(0, 256, size=(1, 64, 64)).astype(np.uint8), (0.8, 0.8, 1.0))
    r = seg.segment_volume(grey, "liver")
    assert r.modality == "CT" and any("taken as CT, on which 'liver' was learnt" in w for w in r.warnings)
    assert seg.segment_volume(grey, "multiple sclerosis lesion").modality == "MR"  # an MR target: MR
    said = grey.with_array(grey.array, modality="MR")  # the file says MR: it is MR
    assert seg.segment_volume(said, "liver").modality == "MR"
    raw = Volume(rng.normal(300, 50, size=(1, 64, 64)).astype(np.float32), (0.8, 0.8, 1.0))  # MR-like values
    assert seg.segment_volume(raw, "liver").modality == "MR"


def test_a_slice_range_is_normalised_as_the_whole_volume():
    """MR percentiles were taken over the range asked for: one slice got other values than in the
    whole-volume run (and than in training, which normalises per volume)."""
    from boltzformer.intensity import prepare_slices

    rng = np.random.default_rng(1)
    mr = rng.gamma(2.0, 100.0, size=(12, 32, 32)).astype(np.float32)
    mr[:3] *= 4  # bright top slices: a range without them would be stretched differently
    whole, _ = prepare_slices(mr, modality="MR")
    part, _ = prepare_slices(mr[5:7], modality="MR", reference=mr)
    np.testing.assert_array_equal(part, whole[5:7])
    alone, _ = prepare_slices(mr[5:7], modality="MR")
    assert np.abs(alone - whole[5:7]).max() > 0.05  # what a range got before


def test_inputs_at_the_edges_of_scale_are_refused_or_warned_about(segmenter, volume):
    """A review on hospital-archive extremes: float32's largest value as voxels crashed in the 3D
    filter (LinAlgError); a 22 mm pixel grid, a tiny matrix or a two-valued image returned
    confident lesions without a word."""
    from boltzformer.errors import InputError

    huge = volume.with_array(volume.array.astype(np.float32))
    huge.array[2, 5, 5] = 1e38
    with pytest.raises(InputError, match="has voxels of 1e\\+38: no CT or MR intensity is that large"):
        segmenter.segment_volume(huge, "lung nodule")
    coarse = Volume(volume.array[:, :16, :16].copy(), (22.4, 22.4, 12.0), direction=np.eye(3), modality="CT")
    said = " | ".join(segmenter.segment_volume(coarse, "lung nodule").warnings)
    assert "pixels are 22.4 mm" in said and "slices are 12.0 mm apart" in said and "16 x 16 pixels" in said
    two = volume.with_array(np.where(volume.array > -700, 100, -1000).astype(np.int16))
    assert any("only two values" in w for w in segmenter.segment_volume(two, "lung nodule").warnings)
    plain = " | ".join(segmenter.segment_volume(volume, "lung nodule").warnings)
    assert "pixels are" not in plain and "only two values" not in plain


def test_a_lesion_table_in_json_holds_no_bare_nan(tmp_path):
    """A scan thinner than the 3D classifier has no nodule_score: the JSON said NaN, which JSON
    parsers refuse."""
    import json

    from boltzformer.postprocess import lesion_table_bytes

    rows = [{"lesion_id": 1, "volume_mm3": 12.0, "nodule_score": float("nan"), "centroid_world_mm": [1.0, np.nan, 2.0]}]
    text = lesion_table_bytes(rows, tmp_path / "t.json").decode()
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert parsed[0]["nodule_score"] is None and parsed[0]["centroid_world_mm"] == [1.0, None, 2.0]
