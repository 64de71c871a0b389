"""evaluate's summary: means over cases with lesions, and the groups a reader compares."""

import pytest

from boltzformer.evaluate import format_table, summarise


def _case(cid, prompt, modality, dice, lesions=1):
    return {"case_id": cid, "prompt": prompt, "modality": modality, "dice": dice, "true_lesions": lesions,
            "detected": lesions, "sensitivity": 1.0 if lesions else float("nan"),
            "false_positive_components": 0, "seconds": 0.1}


def test_one_prompt_over_several_sequences_is_reported_per_sequence():
    cases = [_case("a", "multiple sclerosis lesion", "MRI FLAIR", 0.6),
             _case("b", "multiple sclerosis lesion", "MRI FLAIR", 0.4),
             _case("c", "multiple sclerosis lesion", "MRI T1", 0.0),
             _case("d", "multiple sclerosis lesion", "MRI T1", 0.9, lesions=0),  # lesion-free: not in Dice means
             _case("e", "lung tumor", None, 0.7)]
    s = summarise(cases)
    assert s["dice_by_prompt"]["multiple sclerosis lesion"] == {"mean_dice": pytest.approx(1 / 3), "n": 3}
    by = s["dice_by_prompt_and_modality"]
    assert by["multiple sclerosis lesion | MRI FLAIR"] == {"mean_dice": pytest.approx(0.5), "n": 2}
    assert by["multiple sclerosis lesion | MRI T1"] == {"mean_dice": 0.0, "n": 1}
    assert by["lung tumor | ?"]["n"] == 1
    table = format_table(s)
    assert "Dice by prompt and modality: " in table and "multiple sclerosis lesion | MRI T1 0.000 (n=1)" in table


def test_cases_without_a_modality_column_have_no_such_group():
    s = summarise([{"case_id": "x", "prompt": "liver", "dice": 0.5, "true_lesions": 1, "detected": 1,
                    "sensitivity": 1.0, "false_positive_components": 0, "seconds": 0.1}])
    assert "dice_by_prompt_and_modality" not in s and "dice_by_prompt" in s


# -- lesion sensitivity pooled, by lesion size; JSON; splits; masks stored another way ------------------
import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from boltzformer.errors import InputError  # noqa: E402
from boltzformer.evaluate import evaluate_dir, json_bytes, read_split  # noqa: E402
from boltzformer.io import Volume, write_volume  # noqa: E402


def test_lesion_sensitivity_pools_the_lesions_and_the_per_case_mean_is_named_as_such():
    many = _case("brain", "multiple sclerosis lesion", "MR", 0.3, lesions=10)
    many.update(detected=2, sensitivity=0.2)
    one = _case("slice", "multiple sclerosis lesion", "MR", 0.8, lesions=1)  # found: 1/1
    s = summarise([many, one])
    assert s["lesion_sensitivity"] == pytest.approx(3 / 11) and s["true_lesions"] == 11
    assert s["mean_case_sensitivity"] == pytest.approx(0.6)
    assert "lesion sensitivity 0.273 (11 lesions; per-case mean 0.600)" in format_table(s)


class _Stored:
    """A stand-in Segmenter whose 'prediction' is a stored array per case id (by image shape)."""

    def __init__(self, predictions):
        self.predictions = predictions

    def segment_volume(self, image, prompt, **kwargs):
        return SimpleNamespace(mask=self.predictions[image.path.split("/")[-1].split("_image")[0]], min_lesion_mm3=0.0)


def _write_case(folder, cid, truth, direction=None, mask_direction=None, flip_mask_x=False):
    direction = np.eye(3) if direction is None else direction
    image = Volume(np.zeros(truth.shape, np.int16), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), direction, "CT")
    write_volume(image, folder / f"{cid}_image.nii.gz", overwrite=True)
    mask = image.with_array(truth.astype(np.uint8))
    if flip_mask_x:  # the same grid stored right-to-left: flipped voxels, negated x column, moved origin
        d = image.direction.copy()
        d[:, 0] *= -1
        origin = image.index_to_world((0, 0, truth.shape[2] - 1))
        mask = Volume(truth[:, :, ::-1].astype(np.uint8), image.spacing_mm, origin, d, "CT")
    if mask_direction is not None:
        mask = Volume(truth.astype(np.uint8), image.spacing_mm, image.origin_mm, mask_direction, "CT")
    write_volume(mask, folder / f"{cid}_mask.nii.gz", overwrite=True)


def test_evaluate_by_lesion_size_masks_stored_another_way_and_json_without_nan(tmp_path, capsys):
    truth = np.zeros((4, 40, 40), bool)
    truth[1, 5:7, 5:7] = True  # 1.5 mm: missed
    truth[1:3, 20:30, 20:32] = True  # 8 x 8.4 mm, about 11 mm across its diagonals: found
    pred = np.zeros_like(truth)
    pred[1, 22:25, 22:25] = True
    (tmp_path / "cases.csv").write_text("case_id,prompt,modality\n a ,lung nodule,CT\nb,lung nodule,CT\nempty,lung nodule,CT\n")
    _write_case(tmp_path, "a", truth)
    _write_case(tmp_path, "b", truth, flip_mask_x=True)  # same world content: same scores
    _write_case(tmp_path, "empty", np.zeros_like(truth))
    seg = _Stored({"a": pred, "b": pred, "empty": np.zeros_like(pred)})
    s = evaluate_dir(tmp_path, seg, progress=False)
    a, b, empty = s["cases"]
    assert a["case_id"] == "a" and a["true_lesion_detected"] == [True, False]  # largest first
    assert 1.4 < a["true_lesion_diameters_mm"][1] < 3 and 10 < a["true_lesion_diameters_mm"][0] < 12
    assert {k: b[k] for k in ("dice", "detected", "false_positive_components")} == \
        {k: a[k] for k in ("dice", "detected", "false_positive_components")}
    assert s["lesion_sensitivity_by_size"] == {
        "<3 mm": {"detected": 0, "lesions": 2, "sensitivity": 0.0},
        "10-20 mm": {"detected": 2, "lesions": 2, "sensitivity": 1.0}}
    data = json.loads(json_bytes(s))  # strict JSON: no bare NaN
    assert b"NaN" not in json_bytes(s) and data["cases"][2]["sensitivity"] is None
    # a mask on another grid is refused, naming it
    _write_case(tmp_path, "b", truth, mask_direction=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]]))
    with pytest.raises(InputError, match="b_mask.nii.gz: does not lie on its image's voxel grid"):
        evaluate_dir(tmp_path, seg, progress=False, case_ids=["b"])
    with pytest.raises(InputError, match="has no case 'nope' \\(--cases\\)"):
        evaluate_dir(tmp_path, seg, progress=False, case_ids=["a", "nope"])
    # a split naming cases that are not there: a warning; the split's values are stripped
    (tmp_path / "split.csv").write_text("case_id,split\na,heldout \nghost,heldout\nempty,train\n")
    said = []
    s = evaluate_dir(tmp_path, seg, progress=False, split="heldout", split_file=tmp_path / "split.csv", warn=said.append)
    assert [c["case_id"] for c in s["cases"]] == ["a"] and len(said) == 1 and "ghost" in said[0]


def test_a_case_in_two_splits_is_refused(tmp_path):
    (tmp_path / "split.csv").write_text("case_id,split\na,train\nb,heldout\na,heldout\n")
    with pytest.raises(InputError, match="line 4: case 'a' in split 'heldout', but line 2 puts it in 'train'"):
        read_split(tmp_path / "split.csv")
    (tmp_path / "split.csv").write_text("case_id,split\na,train\na,train\n")
    assert read_split(tmp_path / "split.csv") == {"a": "train"}
