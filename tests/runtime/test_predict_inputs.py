"""Predictor.predict / classforge.predict take one input or many, in the forms people hold images in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import classforge
from classforge.core.errors import BadFile
from classforge.data.rundata import run_files


@pytest.fixture(scope="module")
def predictor(linear_run):
    return classforge.load(linear_run)


@pytest.fixture(scope="module")
def photo(linear_run):
    return next(f for f, _, _ in run_files(linear_run, ("test",)))


def test_one_input_gives_one_result_in_every_form(predictor, photo, linear_run):
    want = predictor.predict(str(photo))
    assert isinstance(want, dict) and want["label"] in predictor.labels  # not a list over the path's characters
    rgb = Image.open(photo).convert("RGB")
    arr = np.asarray(rgb)
    forms = {
        "Path": photo, "bytes": photo.read_bytes(), "PIL": rgb, "numpy uint8 HWC": arr,
        "numpy float HWC in [0, 1]": arr.astype(np.float32) / 255,
        "torch float CHW in [0, 1]": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
    }
    for name, x in forms.items():
        got = predictor.predict(x)
        assert isinstance(got, dict), name
        assert got["label"] == want["label"] and abs(got["probability"] - want["probability"]) < 1e-4, name
    assert classforge.predict(linear_run, str(photo))["label"] == want["label"]


def test_lists_and_the_generator_keep_order(predictor, linear_run):
    files = [f for f, _, _ in run_files(linear_run, ("test", "val"))][:7]
    as_list = predictor.predict([str(f) for f in files])
    assert isinstance(as_list, list) and len(as_list) == 7
    one = predictor.predict([str(files[0])])  # a list of one is still a list
    assert isinstance(one, list) and one[0]["label"] == as_list[0]["label"]
    assert one[0]["probability"] == pytest.approx(as_list[0]["probability"], abs=1e-5)
    streamed = list(predictor.predict_iter((str(f) for f in files), batch_size=3))
    assert [r["label"] for r in streamed] == [r["label"] for r in as_list]
    mixed = predictor.predict([files[0], np.asarray(Image.open(files[1]).convert("RGB")), files[2].read_bytes()])
    assert [r["label"] for r in mixed] == [r["label"] for r in as_list[:3]]


def test_grey_and_unusual_arrays(predictor, photo):
    grey = np.asarray(Image.open(photo).convert("L"))
    assert predictor.predict(grey)["label"] in predictor.labels
    assert predictor.predict(grey.astype(np.uint16) * 257)["label"] in predictor.labels
    with pytest.raises(BadFile, match=r"\(H, W\) or \(H, W, 3\|4\)"):
        predictor.predict(np.zeros((4, 5, 6, 7), np.uint8))
