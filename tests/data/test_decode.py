"""Decoding without needless copies: the file's own image is rotated in place and kept when already RGB, while an
image or array the caller passes is never changed, nor later changed through the result."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from classforge.data.image import decode_image, open_image


def _rotated_jpeg(path, orientation: int = 6) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF orientation: 6 = rotate 90 degrees clockwise to display
    img.save(path, quality=90, exif=exif)


def test_a_file_is_decoded_rotated_with_its_format(tmp_path):
    path = tmp_path / "rotated.jpg"
    _rotated_jpeg(path)
    img, fmt = decode_image(path)
    want = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert fmt == "JPEG" and img.mode == "RGB" and img.size == (40, 64) == want.size
    np.testing.assert_array_equal(np.asarray(img), np.asarray(want))
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 9), 77, np.uint8)).save(grey)
    img, fmt = decode_image(grey)
    assert fmt == "PNG" and img.mode == "RGB" and np.asarray(img).min() == 77


def test_the_caller_s_image_and_array_stay_as_they_were(tmp_path):
    path = tmp_path / "rotated.jpg"
    _rotated_jpeg(path)
    theirs = Image.open(path)
    theirs.load()
    pixels, exif = np.asarray(theirs).copy(), theirs.getexif().get(0x0112)
    out = open_image(theirs)
    assert out is not theirs and out.size == (40, 64)
    assert theirs.size == (64, 40) and theirs.getexif().get(0x0112) == exif == 6
    np.testing.assert_array_equal(np.asarray(theirs), pixels)
    rgb = Image.new("RGB", (5, 5), (1, 2, 3))
    assert open_image(rgb) is not rgb  # a copy: what classforge keeps or resizes is never the caller's object
    array = np.zeros((6, 7, 3), np.uint8)
    out = open_image(array)
    array[:] = 255
    assert np.asarray(out).max() == 0
