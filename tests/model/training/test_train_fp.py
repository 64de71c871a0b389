"""The 3D classifier's training: mining candidates on phantoms (split over miners, with a
deadline) and fitting on them."""
import time

import numpy as np
import pytest

from boltzformer import fp_classifier
from boltzformer.training import train_fp


def test_miners_split_the_volumes_stop_at_their_deadline_and_fit_trains_on_what_they_mined(tmp_path):
    data = tmp_path / "cand"
    train_fp.mine(4, data, seed=7, only={1}, negatives_per_volume=5)
    assert [f.name.split("_")[0] for f in sorted(data.glob("vol*.npz"))] == ["vol0001"]  # its share only
    train_fp.mine(4, data, seed=7, deadline=time.time() - 1)  # past its deadline: starts nothing
    assert len(list(data.glob("vol*.npz"))) == 1
    train_fp.mine(4, data, seed=7, only={0, 1}, negatives_per_volume=5)  # resumes: vol0001 is not redone
    files = sorted(data.glob("vol*.npz"))
    assert [f.name.split("_")[0] for f in files] == ["vol0000", "vol0001"]
    mined = np.load(files[0])
    assert mined["ct"].shape[1:] == fp_classifier.PATCH_SHAPE and (mined["source"] == 1).any()  # nodule masks too

    info = train_fp.fit(data, tmp_path / "fp", steps=2, candidate_share=None)
    assert info["volumes"] == 2 and info["held_out_volumes"] == 1
    clf = fp_classifier.load(tmp_path / "fp" / fp_classifier.WEIGHTS_NAME)
    assert clf.probabilities(np.zeros((1, 2, *fp_classifier.PATCH_SHAPE), np.float32)).shape == (1,)

    with pytest.raises(ValueError, match="reads"):  # coarse patches cannot train a fine network
        train_fp.fit(data, tmp_path / "fine", steps=2, arch="fine")
