"""Classical preprocessing ops: each checked against a numeric reference, and replayed at predict time."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from classforge.core.errors import ClassforgeError
from classforge.core.spec import InputSpec
from classforge.data.ops import apply_ops, ops_label, parse_ops


def _noisy_step(seed: int = 0, size: int = 64, sigma: float = 20.0) -> tuple[Image.Image, np.ndarray]:
    """A vertical step edge (dark left, light right) plus Gaussian noise; returns (noisy, clean)."""
    clean = np.zeros((size, size, 3), np.float32)
    clean[:, : size // 2] = 60
    clean[:, size // 2:] = 190
    noise = np.random.default_rng(seed).normal(0, sigma, clean.shape)
    noisy = np.clip(clean + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(noisy), clean


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def test_parse_canonical_forms_and_errors():
    assert parse_ops("autocontrast, Gamma=0.80,blur") == ("autocontrast", "gamma=0.8", "blur")
    assert parse_ops("equalize+nlmeans=5") == ("equalize", "nlmeans=5")
    assert parse_ops(["bilateral=20"]) == ("bilateral=20",)
    assert parse_ops("none") == () and parse_ops(None) == () and parse_ops("") == ()
    assert ops_label(parse_ops("autocontrast,gamma=0.8")) == "autocontrast+gamma=0.8"
    assert ops_label(()) == "none"
    with pytest.raises(ClassforgeError, match="Did you mean 'equalize'"):
        parse_ops("equalise")
    with pytest.raises(ClassforgeError, match="needs a value"):
        parse_ops("gamma")
    with pytest.raises(ClassforgeError, match="g > 0"):
        parse_ops("gamma=-1")
    with pytest.raises(ClassforgeError, match="not a number"):
        parse_ops("blur=big")
    with pytest.raises(ClassforgeError, match="takes no value"):
        parse_ops("equalize=3")


def test_gamma_matches_formula():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    img = Image.fromarray(np.stack([ramp] * 3, -1))
    out = np.asarray(apply_ops(img, parse_ops("gamma=0.5")))[0, :, 0]
    ref = np.round(255 * (np.arange(256) / 255) ** 0.5)
    assert np.array_equal(out, ref.astype(np.uint8))


def test_autocontrast_stretches_to_full_range_without_colour_shift():
    rng = np.random.default_rng(0)
    a = rng.integers(80, 161, (32, 32, 1)).astype(np.uint8)
    img = Image.fromarray(np.concatenate([a, a, a], -1))  # grey: must stay grey
    out = np.asarray(apply_ops(img, ["autocontrast"]))
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_equalize_flattens_luminance_histogram():
    rng = np.random.default_rng(1)
    g = np.clip(rng.normal(100, 10, (64, 64)), 0, 255).astype(np.uint8)  # narrow histogram
    img = Image.fromarray(np.stack([g, g, g], -1))
    y = np.asarray(apply_ops(img, ["equalize"]).convert("L"), np.float64)
    assert y.std() > 4 * g.std()  # spread over the range
    # equalised luminance is ~uniform: its quartiles near 64 / 128 / 191
    q = np.percentile(y, [25, 50, 75])
    assert np.allclose(q, [64, 128, 191], atol=20)


def test_blur_is_gaussian_with_given_sigma():
    a = np.zeros((41, 41, 3), np.uint8)
    a[20, 20] = 255
    out = np.asarray(apply_ops(Image.fromarray(a), ["blur=2"]))[..., 0].astype(np.float64)
    _, xs = np.mgrid[:41, :41]
    w = out / out.sum()
    var = (w * (xs - 20) ** 2).sum()
    assert abs(np.sqrt(var) - 2.0) < 0.35  # the spread of the impulse response is sigma


def test_bilateral_denoises_but_keeps_the_edge_sharper_than_blur():
    pytest.importorskip("cv2")
    noisy, clean = _noisy_step()
    bil = np.asarray(apply_ops(noisy, ["bilateral=60"]), np.float64)
    blur = np.asarray(apply_ops(noisy, ["blur=2"]), np.float64)
    assert _psnr(bil, clean) > _psnr(noisy, clean) + 3
    # contrast across the edge (columns 31 -> 32): bilateral keeps most of the 130-level step, blur loses more
    def step(x):
        return x[:, 32:34].mean() - x[:, 30:32].mean()

    assert step(bil) > 100 and step(bil) > step(blur) + 20


def test_nlmeans_denoises():
    pytest.importorskip("cv2")
    noisy, clean = _noisy_step(seed=2)
    out = apply_ops(noisy, ["nlmeans=15"])
    assert out.size == noisy.size and out.mode == "RGB"
    assert _psnr(out, clean) > _psnr(noisy, clean) + 5


def test_ops_compose_left_to_right():
    img, _ = _noisy_step()
    a = apply_ops(apply_ops(img, ["gamma=0.7"]), ["autocontrast"])
    b = apply_ops(img, parse_ops("gamma=0.7,autocontrast"))
    c = apply_ops(img, parse_ops("autocontrast,gamma=0.7"))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(b), np.asarray(c))


def test_spec_carries_ops_and_plain_specs_are_unchanged():
    plain = InputSpec("image", 32)
    assert "preprocess" not in plain.to_dict()  # old runs and embedding-cache keys stay as they were
    spec = InputSpec("image", 32, preprocess=("autocontrast", "gamma=0.8"))
    d = json.loads(json.dumps(spec.to_dict()))
    assert InputSpec.from_dict(d) == spec


def test_saved_run_replays_ops_at_predict_time(shapes_dir, tmp_path):
    """Train with ops, then the Predictor built from the run directory alone gives, for a test file, the
    probability the evaluation wrote; without the ops the same model gives something else."""
    import classforge
    from classforge.core.config import TrainConfig
    from classforge.runtime.predictor import Predictor

    ops = "autocontrast,gamma=0.8,blur=1.0" + (",nlmeans" if _has_cv2() else "")
    run = classforge.train(shapes_dir, tmp_path / "run", backbone="cnn_small", strategy="scratch", epochs=2,
                           preprocess=ops)
    meta = json.loads((run / "model.json").read_text())
    assert meta["spec"]["preprocess"] == list(parse_ops(ops))
    assert TrainConfig.load(run / "config.yaml").preprocess == ops
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    p = Predictor.from_run(run, backend="torch")
    assert p.spec.preprocess == parse_ops(ops)
    files = [str(shapes_dir / r["path"]) for r in rows[:6]]
    probs = p.predict_proba(files)
    labels = p.labels
    for r, pr in zip(rows, probs):
        assert labels[int(pr.argmax())] == r["predicted"]
        assert abs(float(pr.max()) - float(r["probability"])) < 1e-5

    import dataclasses

    bare = Predictor(p.model, dataclasses.replace(p.spec, preprocess=()), labels)
    assert not np.allclose(bare.predict_proba(files), probs, atol=1e-4)


def test_audio_backbone_rejects_image_ops():
    from classforge.data.ops import attach_ops

    class Fake:
        spec = InputSpec("audio", 0, sample_rate=16000, clip_seconds=1.0)

    with pytest.raises(ClassforgeError, match="blur: not an audio operation"):
        attach_ops(Fake(), "blur")


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True



def test_audio_ops_band_limit_and_quantise():
    from classforge.data.ops import apply_audio_ops

    sr = 32000
    t = np.arange(sr) / sr
    low, high = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 9000 * t)
    out = apply_audio_ops((0.4 * low + 0.4 * high).astype(np.float32), sr, parse_ops("lowpass=5000"))
    assert out.shape == (sr,) and out.dtype == np.float32
    spec = np.abs(np.fft.rfft(out[2000:-2000]))
    f = np.fft.rfftfreq(len(out) - 4000, 1 / sr)
    assert spec[np.argmin(np.abs(f - 9000))] < 1e-3 * spec[np.argmin(np.abs(f - 440))]  # 9 kHz gone
    assert np.corrcoef(out[2000:-2000], 0.4 * low[2000:-2000])[0, 1] > 0.999  # 440 Hz kept
    q = apply_audio_ops(np.linspace(-1, 1, 1000).astype(np.float32), sr, parse_ops("bits=3"))
    assert len(np.unique(q)) <= 9 and np.abs(q - np.linspace(-1, 1, 1000)).max() <= 0.125 + 1e-6
    assert np.array_equal(apply_audio_ops(low.astype(np.float32), sr, parse_ops("lowpass=20000")),
                          low.astype(np.float32))  # at or above Nyquist: unchanged


def test_audio_loudness_op_levels_recordings():
    """loudness: a quiet and a loud take of the same word come out at the same level (the sounding part's RMS
    at the target, padding silence ignored); peaks never exceed full scale; silence stays silent."""
    from classforge.data.ops import apply_audio_ops

    sr = 16000
    rng = np.random.default_rng(0)
    word = np.zeros(sr, np.float32)
    word[4000:10000] = (rng.normal(0, 1, 6000) * np.hanning(6000)).astype(np.float32)
    ops = parse_ops("loudness")
    assert ops == ("loudness",) and parse_ops("loudness=-20") == ("loudness=-20",)
    quiet = apply_audio_ops(0.01 * word, sr, ops)
    loud = apply_audio_ops(0.3 * word, sr, ops)
    np.testing.assert_allclose(quiet, loud, rtol=1e-4, atol=1e-6)
    frames = quiet[: sr // 320 * 320].reshape(-1, 320)
    rms = np.sqrt((frames ** 2).mean(1))
    on = rms >= rms.max() * 0.01
    assert abs(20 * np.log10(np.sqrt((rms[on] ** 2).mean())) + 20) < 0.1  # -20 dBFS over the sounding frames
    spike = word.copy()
    spike[5000] = 60.0  # a click: full-scale limit wins over the RMS target
    assert np.abs(apply_audio_ops(0.01 * spike, sr, ops)).max() <= 1.0 + 1e-6
    assert not apply_audio_ops(np.zeros(sr, np.float32), sr, ops).any()
    with pytest.raises(ClassforgeError, match="loudness"):
        parse_ops("loudness=3")


def test_audio_ops_travel_with_an_audio_backbone_only():
    import dataclasses

    from classforge.data.ops import attach_ops
    from classforge.data.preprocess import make_preprocessor
    from classforge.models.registry import create_backbone

    bb = create_backbone("audio_cnn")
    assert attach_ops(bb, "lowpass=4000,bits=8") == ("lowpass=4000", "bits=8")
    assert bb.spec.to_dict()["preprocess"] == ("lowpass=4000", "bits=8")
    with pytest.raises(ClassforgeError, match="not an audio operation"):
        attach_ops(create_backbone("audio_cnn"), "blur=1")
    with pytest.raises(ClassforgeError, match="not an image operation"):
        attach_ops(create_backbone("cnn_small"), "lowpass=4000")
    with pytest.raises(ClassforgeError, match="bits"):
        parse_ops("bits=2.5")
    pre = make_preprocessor(bb.spec)
    plain = make_preprocessor(dataclasses.replace(bb.spec, preprocess=()))
    assert pre.spec.preprocess and not plain.spec.preprocess
