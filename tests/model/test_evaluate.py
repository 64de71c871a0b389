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
