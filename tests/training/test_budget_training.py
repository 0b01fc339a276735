"""Training that shows its work under a time budget: schedules, per-class evaluation rows, speed columns,
the batched small-image data path."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
import time

import pytest
import torch

import classforge
from classforge.core.errors import ClassforgeError
from classforge.models.registry import Classifier, create_backbone
from classforge.training.module import (
    ClassifierModule,
    FileDataset,
    TensorBatchDataset,
    batch_crop_flip,
    batch_cutout,
)
from classforge.training.schedules import Progress, lr_factor, make_lambda, parse_progressive, size_at
from classforge.training.tricks import MixBatches, SharpnessAware, batch_mix


def read_csv(p):
    with open(p) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ schedules
def test_step_schedule_plateaus_over_a_time_budget():
    """0.01 / 0.001 / 0.0001 over 50% / 25% / 25% of the budget, whatever the step count."""
    now = [0.0]
    prog = Progress(total_steps=10**9, budget_s=3600, clock=lambda: now[0])
    prog.start()
    f = make_lambda("step", prog)
    seen = {}
    for t in range(0, 3600, 60):
        now[0] = t
        seen[t] = 0.01 * f(step=t // 60)
    assert seen[0] == seen[1740] == pytest.approx(0.01)
    assert seen[1800] == seen[2640] == pytest.approx(0.001)
    assert seen[2700] == seen[3540] == pytest.approx(0.0001)
    now[0] = 7200  # overtime: stays on the last plateau
    assert 0.01 * f(10) == pytest.approx(0.0001)


def test_cosine_and_onecycle_reach_their_ends():
    assert lr_factor("cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("onecycle", 0.0) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 0.3) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) < 1e-5
    xs = [lr_factor("onecycle", i / 100) for i in range(101)]
    assert max(xs) == pytest.approx(1.0) and xs.index(max(xs)) == 30
    with pytest.raises(ClassforgeError, match="--schedule"):
        lr_factor("linear-ish", 0.1)


def test_progress_is_the_larger_of_steps_and_time():
    now = [0.0]
    prog = Progress(total_steps=100, budget_s=10, clock=lambda: now[0])
    prog.start()
    assert prog(50) == pytest.approx(0.5)
    now[0] = 8
    assert prog(50) == pytest.approx(0.8)
    now[0] = 20
    assert prog(0) == 1.0


# ---------------------------------------------------------------------------------------- batched data path
def test_batch_crop_flip_is_a_shifted_or_flipped_copy():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    y = batch_crop_flip(x, pad=2, flip=True, gen=g)
    assert y.shape == x.shape
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = any(torch.equal(y[i], c) or torch.equal(y[i], c.flip(2))
                    for oy in range(5) for ox in range(5) for c in [padded[:, oy:oy + 8, ox:ox + 8]])
        assert found
    ds = TensorBatchDataset(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), list(range(10)),
                            (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)
    xb, yb = ds[[3, 1]]
    assert xb.is_contiguous(memory_format=torch.channels_last) and yb.tolist() == [3, 1]
    ref = (ds.images[[3, 1]].float() / 255 - 0.5) / 0.25
    assert torch.allclose(xb, ref, atol=1e-5)


def test_cutout_blanks_one_clipped_square_per_image():
    x = torch.randn(200, 3, 16, 16) + 10  # no value is 0 before cutout
    g = torch.Generator().manual_seed(1)
    y = batch_cutout(x, 6, g)
    assert x.min() > 0  # the input is left as it was
    zero = (y == 0)
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])  # all channels alike
    assert torch.equal(y[~zero], x[~zero])  # everything else untouched
    sizes = set()
    for m in zero[:, 0]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert len(rows) and len(cols)  # the centre is a pixel of the image, so some of the square is always in
        assert int(m.sum()) == len(rows) * len(cols)  # one axis-aligned rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all() and len(rows) <= 6 and len(cols) <= 6
        assert (len(rows) == 6 or rows[0] == 0 or rows[-1] == 15) and (len(cols) == 6 or cols[0] == 0 or cols[-1] == 15)
        sizes.add(int(m.sum()))
    assert 36 in sizes and min(sizes) <= 12  # whole squares inside, clipped ones at the borders
    # In the batched path the square is the mean pixel (0 after normalising); evaluation batches are untouched.
    imgs = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.2, 0.4, 0.6), (0.25, 0.25, 0.25)
    tr = TensorBatchDataset(imgs, list(range(64)), mean, std, train=True, pad=0, flip=False, cutout=4)
    ev = TensorBatchDataset(imgs, list(range(64)), mean, std, train=False, cutout=4)
    xb, _ = tr[list(range(64))]
    ref, _ = ev[list(range(64))]
    blank = (xb == 0).all(1)  # (B, H, W)
    assert blank.any((1, 2)).all() and torch.equal(xb[~blank[:, None].expand_as(xb)], ref[~blank[:, None].expand_as(ref)])
    # Per-sample path (large images): the same operation on each training tensor.
    class Pre:
        def train(self, raw):
            return raw.clone()
        eval = train
    fd = FileDataset([torch.full((3, 10, 10), 5.0)], [0], Pre(), train=True, cutout=3)
    assert (fd[0][0] == 0).all(0).sum() in range(1, 10)
    assert (FileDataset(fd.raws, [0], Pre(), train=False, cutout=3)[0][0] == 5.0).all()


def test_cutout_bad_values_say_what_to_do(tiny, tmp_path, monkeypatch):
    with pytest.raises(ClassforgeError, match="between 1 and 31"):
        classforge.train(tiny, tmp_path / "a", backbone="cnn_small", strategy="scratch", epochs=1, cutout=40)
    with pytest.raises(ClassforgeError, match="--strategy linear"):
        classforge.train(tiny, tmp_path / "b", backbone="cnn_small", strategy="linear", epochs=1, cutout=8)
    # two-stage: refused before its first stage extracts embeddings, not after it
    monkeypatch.setenv("CLASSFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ClassforgeError, match="between 1 and 31"):
        classforge.train(tiny, tmp_path / "c", backbone="cnn_small", strategy="two-stage", epochs=1, cutout=40)
    assert not (tmp_path / "cache" / "embeddings").exists()


def test_channels_last_reaches_weights_and_inputs():
    """oneDNN is fast only when both the conv weights and the activations are channels_last."""
    from classforge.models.registry import Classifier, create_backbone
    from classforge.training.module import ClassifierModule

    model = Classifier(create_backbone("cnn_small", pretrained=False, num_classes=3), 3)
    module = ClassifierModule(model, [(list(model.parameters()), 0.1)], channels_last=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    h = convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    module(torch.randn(2, 3, 32, 32))
    h.remove()
    assert seen == [True]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def budget_run(tiny, tmp_path_factory):
    """cnn_small from scratch with the step schedule under a 20-second budget for the whole run (no --epochs)."""
    out = tmp_path_factory.mktemp("runs") / "budget"
    t0 = time.time()
    run = classforge.train(tiny, out, backbone="cnn_small", strategy="scratch", time_budget="20s", batch_size=8,
                           patience=1000, schedule="step")
    return run, time.time() - t0


def test_pre_training_row_per_class_and_speed_columns(budget_run):
    run, _ = budget_run
    rows = read_csv(run / "metrics.csv")
    assert rows[0]["epoch"] == "0" and rows[0]["val_acc"] != ""  # evaluated before the first epoch
    for name in ("circle", "stripes", "checker"):
        assert f"val_acc_{name}" in rows[0] and rows[0][f"val_acc_{name}"] != ""
        assert all(r[f"val_acc_{name}"] != "" for r in rows)
    for r in rows[1:]:
        assert float(r["epoch_time_s"]) > 0 and float(r["images_per_s"]) > 0 and float(r["ops_per_s"]) > 0
        assert float(r["train_time_s"]) <= float(r["epoch_time_s"]) + 1e-6
    # ops/s follows the documented convention: forward ops per sample x training images/s
    s = json.loads((run / "summary.json").read_text())
    ops = s["trainer"]["forward_ops_per_sample"]
    r = rows[1]
    assert float(r["ops_per_s"]) == pytest.approx(ops * float(r["images_per_s"]), rel=0.02)  # images_per_s is rounded
    per = read_csv(run / "per_class_epochs.csv")
    assert {p["class"] for p in per} == {"circle", "stripes", "checker"}
    assert {p["epoch"] for p in per} == {r["epoch"] for r in rows}
    p0 = [p for p in per if p["epoch"] == "0"]
    assert sum(int(p["correct"]) for p in p0) / sum(int(p["n"]) for p in p0) == pytest.approx(float(rows[0]["val_acc"]), abs=1e-4)


def test_time_budget_stops_training_and_schedule_reaches_its_end(budget_run):
    run, took = budget_run
    s = json.loads((run / "summary.json").read_text())
    assert s["trainer"]["stopped_by"] == "time budget"
    assert s["trainer"]["optimizer"] == "sgd" and s["trainer"]["lr"] == pytest.approx(0.01)
    assert s["trainer"]["data_path"].startswith("batched tensors")
    rows = read_csv(run / "metrics.csv")[1:]
    assert len(rows) >= 3
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.0001)  # the last plateau: the schedule ran to the end of the budget
    assert {round(x, 6) for x in lrs} <= {0.0001, 0.001, 0.01}
    # --time-budget is the whole run's: training got what was left after preparing, minus what scoring keeps
    plan = s["time_budget"]
    assert plan["whole_run_s"] == 20 and plan["before_training_s"] > 0 and plan["reserved_for_scoring_s"] >= 3
    assert plan["training_s"] == pytest.approx(20 - plan["before_training_s"] - plan["reserved_for_scoring_s"],
                                               abs=0.2)
    assert s["trainer"]["time_budget_s"] == plan["training_s"]
    # the last epoch ends at the training share (the Timer checks after every batch), not an epoch count later
    longest = max(float(r["epoch_time_s"]) for r in rows)
    assert 0.75 * plan["training_s"] <= float(rows[-1]["elapsed_s"]) <= plan["training_s"] + longest + 2
    assert took < 120


def test_progressive_resize_plan_and_its_errors():
    assert parse_progressive("", 32) == []
    plan = parse_progressive("16:0.25, 24:0.5", 32)
    assert plan == [(0.25, 16), (0.5, 24)]
    assert [size_at(plan, p) for p in (0.0, 0.2499, 0.25, 0.49, 0.5, 1.0)] == [16, 16, 24, 24, None, None]
    for bad, msg in [("24", "SIZE:UNTIL"), ("a:0.5", "SIZE:UNTIL"), ("32:0.5", "below the model's input size 32"),
                     ("4:0.5", "at least 8"), ("24:1.0", "between 0 and 1"), ("24:0.5,16:0.7", "in order"),
                     ("16:0.5,24:0.4", "in order")]:
        with pytest.raises(ClassforgeError, match=msg):
            parse_progressive(bad, 32)
    with pytest.raises(ClassforgeError, match="SIZE:UNTIL.*got 24"):
        parse_progressive(24, 32)  # `progressive_resize: 24` in a config file


def test_progressive_resize_trains_small_then_full_size(tiny, tmp_path):
    """`--progressive-resize 16:0.5`: the first half of the steps sees 16x16 batches (cheaper: fewer ops per
    image), the second half full-size 32x32 ones; validation and the saved model stay at 32x32."""
    from classforge.models.anatomy import operations_per_sample
    from classforge.runtime.predictor import Predictor

    run = classforge.train(tiny, tmp_path / "p", backbone="cnn_small", strategy="scratch", epochs=4, batch_size=8,
                           patience=1000, progressive_resize="16:0.5", schedule="onecycle", optimizer="sgd", lr="0.05")
    rows = read_csv(run / "metrics.csv")[1:]
    assert [r["train_size"] for r in rows] == ["16", "16", "32", "32"]
    model = Classifier(create_backbone("cnn_small", pretrained=False, num_classes=3), 3)
    ops16 = operations_per_sample(model, (3, 16, 16))["ops"]
    ops32 = operations_per_sample(model, (3, 32, 32))["ops"]
    assert ops16 < ops32 / 3
    for r, ops in zip(rows, (ops16, ops16, ops32, ops32)):  # ops/s counts the size each epoch really trained on
        # images_per_s is rounded to 0.1 (abs term: on a loaded machine it can be ~1 image/s)
        assert float(r["ops_per_s"]) == pytest.approx(ops * float(r["images_per_s"]), rel=0.02, abs=0.051 * ops)
    s = json.loads((run / "summary.json").read_text())
    assert s["trainer"]["progressive_resize"] == [{"until": 0.5, "size": 16}]
    pred = Predictor.from_run(run, backend="torch")
    assert pred.spec.size == 32
    assert pred.predict_proba([str(next(tiny.rglob("*.png")))]).shape == (1, 3)


def test_progressive_resize_bad_input_says_what_to_do(tiny, tmp_path):
    with pytest.raises(ClassforgeError, match="below the model's input size 32"):
        classforge.train(tiny, tmp_path / "a", backbone="cnn_small", strategy="scratch", epochs=1,
                         progressive_resize="40:0.5")
    with pytest.raises(ClassforgeError, match="--strategy linear"):
        classforge.train(tiny, tmp_path / "b", backbone="cnn_small", strategy="linear", epochs=1,
                         progressive_resize="16:0.5")
    assert not (tmp_path / "a" / "model.safetensors").exists()
    cfg = tmp_path / "c.yaml"  # a number where SIZE:UNTIL belongs, through the CLI: the clear error, no traceback
    cfg.write_text(f"data: {tiny}\nout: {tmp_path / 'c'}\nbackbone: cnn_small\nstrategy: scratch\nepochs: 1\n"
                   "progressive_resize: 24\n")
    r = subprocess.run([sys.executable, "-m", "classforge.cli", "train", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=300)
    said = " ".join((r.stderr + r.stdout).split())  # the console wraps long messages
    assert r.returncode != 0 and "takes SIZE:UNTIL" in said and "Traceback" not in said


def test_unknown_schedule_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ClassforgeError, match="--schedule"):
        classforge.train(tiny, tmp_path / "x", backbone="cnn_small", strategy="scratch", epochs=1,
                         schedule="exp")


def test_per_sample_path_for_strong_augmentation(tiny, tmp_path):
    """Augmentations the batched path does not implement go through the per-sample transforms."""
    run = classforge.train(tiny, tmp_path / "strong", backbone="cnn_small", strategy="scratch", epochs=1,
                           batch_size=8, augment="strong", schedule="onecycle")
    s = json.loads((run / "summary.json").read_text())
    assert s["trainer"]["data_path"] == "per-sample" and s["trainer"]["optimizer"] == "adamw"
    rows = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_frozen_whiten_bias_stops_backprop_at_the_first_conv(tiny, tmp_path):
    """whiten_bias=frozen (the default): the same function as a trained bias at the start, the same gradients for
    every weight after the stem, but nothing before the first conv needs a gradient, so backpropagation stops there
    (the speed gain); through the real training path the stem is left exactly as fitted and the saved run reloads
    frozen."""
    from safetensors.torch import load_file

    from classforge.models.small_cnn import PatchWhiten

    torch.manual_seed(0)
    trained = Classifier(create_backbone("cnn_fast_256k", pretrained=False, whiten_bias="train"), 10)
    frozen = Classifier(create_backbone("cnn_fast_256k", pretrained=False), 10)
    frozen.load_state_dict(trained.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    trained.backbone.init_from_data(x)
    frozen.backbone.init_from_data(x)
    stem_out = {}
    for name, m in (("trained", trained), ("frozen", frozen)):
        m.backbone.stages[0].register_forward_hook(lambda mod, i, o, name=name: stem_out.__setitem__(name, o))
        torch.nn.functional.cross_entropy(m(x), y).backward()
    assert stem_out["trained"].requires_grad and not stem_out["frozen"].requires_grad
    torch.testing.assert_close(stem_out["frozen"], stem_out["trained"])
    assert trained.backbone.whiten.bias.grad is not None and frozen.backbone.whiten.bias.grad is None
    for (n, a), b in zip(trained.named_parameters(), frozen.parameters()):
        if not n.startswith("backbone.stages.0."):
            torch.testing.assert_close(b.grad, a.grad, msg=n)

    run = classforge.train(tiny, tmp_path / "frozen", backbone="cnn_fast_256k", epochs=2, batch_size=8)
    sd = load_file(str(run / "model.safetensors"))
    assert torch.count_nonzero(sd["backbone.stages.0.0.bias"]) == 0  # fit() zeroes it; frozen, it stays zero
    loaded = classforge.load(run, backend="torch")
    whiten = [m for m in loaded.model.modules() if isinstance(m, PatchWhiten)]
    assert len(whiten) == 1 and not whiten[0].train_bias
    with pytest.raises(ClassforgeError, match="whiten_bias must be 'train' or 'frozen'"):
        create_backbone("cnn_fast_256k", pretrained=False, whiten_bias="fixed")


def test_whitened_stem_is_fitted_on_training_data_and_saved(tiny, tmp_path):
    """cnn_fast_256k: the patch-whitening stem is fitted from the training images before the first epoch, stays
    frozen while the rest trains, and the saved run predicts with exactly those filters."""
    from safetensors.torch import load_file

    from classforge.models.small_cnn import PatchWhiten

    run = classforge.train(tiny, tmp_path / "fast", backbone="cnn_fast_256k", epochs=3, batch_size=8)
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == "scratch" and "whitening" in s["data_init"]
    w = load_file(str(run / "model.safetensors"))["backbone.stages.0.0.weight"]  # (24, 3, 2, 2)
    fresh = PatchWhiten(3, 2).weight
    assert w.shape == fresh.shape and not torch.allclose(w, fresh)
    torch.testing.assert_close(w[12:], -w[:12])  # still the fitted +/- pairs after training: frozen
    rows = read_csv(run / "predictions.csv")
    root = tiny
    res = classforge.load(run).predict([str(root / r["path"]) for r in rows[:4]])
    assert [p["label"] for p in res] == [r["predicted"] for r in rows[:4]]


def test_colon_values_stay_text_in_set_and_config_files(tmp_path):
    """`24:0.5` and `1:30` stay text in --set, -a and config files (YAML 1.1's safe_load reads them as the base-60
    numbers 1440.5 and 90); numbers, lists and mappings are still parsed."""
    import yaml

    from classforge.cli.train import build_config
    from classforge.core.config import TrainConfig, load_yaml

    assert yaml.safe_load("24:0.5") == 1440.5  # the trap
    cfg = build_config({"data": "d", "set_": ["progressive_resize=24:0.5", "label_smoothing=0.1", "time_budget=1:30"],
                        "backbone_args": ["widths=[16, 32]", "tag=1:30"]})
    assert cfg.progressive_resize == "24:0.5" and cfg.time_budget == "1:30"
    assert cfg.label_smoothing == 0.1 and cfg.backbone_args == {"widths": [16, 32], "tag": "1:30"}
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nprogressive_resize: 24:0.5\nlr: 0.2\nepochs: 3\n")
    loaded = TrainConfig.load(f)
    assert loaded.progressive_resize == "24:0.5" and loaded.lr == 0.2 and loaded.epochs == 3
    assert load_yaml("{a: 0x10, b: .5, c: -3, d: true, e: null}") == {"a": 16, "b": 0.5, "c": -3, "d": True, "e": None}


# ------------------------------------------------------------------------------------------------ SAM
def _one_step(model, x, y, sam, lr=0.1, optimizer="sgd", groups=None, optimizer_args=None):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from classforge.training.module import ClassifierModule

    groups = groups or [(list(model.parameters()), lr)]
    module = ClassifierModule(model, groups, weight_decay=0.0, total_steps=1, optimizer=optimizer, momentum=0.0,
                              schedule="constant", num_classes=3, optimizer_args=optimizer_args,
                              step_rule=SharpnessAware(sam) if sam else None)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(y)))
    return trainer


def _tiny_bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_sam_step_is_the_gradient_at_the_perturbed_weights():
    """One SGD step (no momentum) with --sam rho must equal w - lr * grad L(w + rho * g / ||g||), g = grad L(w),
    computed here by hand; BatchNorm's running statistics move once (the first pass), not twice; the logged
    train loss is the loss at w."""
    net = _tiny_bn_net()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    rho, lr = 0.5, 0.1

    ref = copy.deepcopy(net).train()
    loss0 = torch.nn.functional.cross_entropy(ref(x), y)
    g = torch.autograd.grad(loss0, list(ref.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
    running_after_one = ref[1].running_mean.clone()
    probe = copy.deepcopy(ref)
    with torch.no_grad():
        for p, gi in zip(probe.parameters(), g):
            p.add_(gi * rho / norm)
    g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(probe(x), y), list(probe.parameters()))
    expected = [p.detach() - lr * gi for p, gi in zip(ref.parameters(), g2)]

    trainer = _one_step(net, x, y, sam=rho, lr=lr)
    for p, e in zip(net.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-6)
    assert torch.allclose(net[1].running_mean, running_after_one, atol=1e-7)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(float(loss0), rel=1e-5)

    net2 = _tiny_bn_net()  # without SAM the same step is plain SGD: w - lr * g (so the test above can fail)
    w0 = [p.detach().clone() for p in net2.parameters()]
    _one_step(net2, x, y, sam=0.0, lr=lr)
    for p, w, gi in zip(net2.parameters(), w0, g):
        assert torch.allclose(p.detach(), w - lr * gi, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.parameters(), net2.parameters()))


def test_sam_through_train_and_its_errors(tiny, tmp_path):
    """--sam trains (two passes per batch): images/s counts each image once, ops/s both passes; the summary
    records rho; bad values are clear errors, through the CLI without a traceback."""
    run = classforge.train(tiny, tmp_path / "s", backbone="cnn_small", strategy="scratch", epochs=2, batch_size=8,
                           patience=1000, sam=0.05, schedule="onecycle", optimizer="sgd", lr="0.05")
    rows = read_csv(run / "metrics.csv")[1:]
    assert len(rows) == 2 and all(float(r["train_acc"]) >= 0 for r in rows)
    model = Classifier(create_backbone("cnn_small", pretrained=False, num_classes=3), 3)
    from classforge.models.anatomy import operations_per_sample

    ops = operations_per_sample(model, (3, 32, 32))["ops"]
    for r in rows:
        assert float(r["ops_per_s"]) == pytest.approx(2 * ops * float(r["images_per_s"]), rel=0.02, abs=0.11 * ops)
    assert json.loads((run / "summary.json").read_text())["trainer"]["sam"] == 0.05
    with pytest.raises(ClassforgeError, match="SAM radius"):
        classforge.train(tiny, tmp_path / "b", backbone="cnn_small", strategy="scratch", epochs=1, sam=-1)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(ClassforgeError, match="--strategy linear"):  # the head on cached embeddings has no SAM
        classforge.train(tiny, tmp_path / "l", backbone="cnn_small", strategy="linear", epochs=1, sam=0.05)
    r = subprocess.run([sys.executable, "-m", "classforge.cli", "train", str(tiny), "--backbone", "cnn_small",
                        "--strategy", "scratch", "--epochs", "1", "--out", str(tmp_path / "c"), "--set", "sam=big"],
                       capture_output=True, text=True, timeout=300)
    said = " ".join((r.stderr + r.stdout).split())
    assert r.returncode != 0 and "SAM radius" in said and "Traceback" not in said


# ------------------------------------------------------------------------------------------------ Mixup / CutMix
def test_mixup_blends_pairs_and_cutmix_pastes_one_box():
    import numpy as np

    x = torch.randn(64, 3, 16, 16)
    x0 = x.clone()
    y = torch.arange(64)  # distinct labels: y[perm] reveals the pairing
    xm, ya, yb, lam = batch_mix(x, y, mixup=0.4, cutmix=0.0, prob=1.0, rng=np.random.default_rng(0))
    assert torch.equal(ya, y) and sorted(yb.tolist()) == list(range(64)) and 0 <= lam <= 1
    assert torch.allclose(xm, lam * x + (1 - lam) * x[yb], atol=1e-6)
    assert torch.equal(x, x0)  # the batch itself is left alone
    seen = []
    for seed in range(20):
        xc, ya, yb, lam = batch_mix(x, y, mixup=0.0, cutmix=1.0, prob=1.0, rng=np.random.default_rng(seed))
        moved = yb != y  # samples paired with another one (a permutation may keep some in place)
        own, other = (xc == x).all(1), (xc == x[yb]).all(1)  # (B, H, W) pixel from itself / from its partner
        assert (own | other).all() and torch.equal(x, x0)
        box = ~own[moved]  # pixels that came from the partner, the same box in every image
        assert (box == box[0]).all()
        rows, cols = box[0].any(1), box[0].any(0)
        assert torch.equal(box[0], rows[:, None] & cols[None, :])  # one rectangle
        assert 1 - lam == pytest.approx(box[0].float().mean().item())  # lam = share of own pixels kept
        seen.append(lam)
    assert min(seen) < 0.5 < max(seen)  # Beta(1, 1) draws: boxes of many sizes
    rng = np.random.default_rng(1)
    kinds = []
    for _ in range(400):
        out = batch_mix(x, y, mixup=0.4, cutmix=1.0, prob=0.5, rng=rng)
        if out is None:
            kinds.append("none")
            continue
        blend = out[3] * x + (1 - out[3]) * x[out[2]]  # what mixup gives for this pairing and lam
        kinds.append("mixup" if torch.allclose(out[0], blend, atol=1e-6) else "cutmix")
    assert 150 < kinds.count("none") < 250 and kinds.count("mixup") > 50 and kinds.count("cutmix") > 50
    assert batch_mix(x, y, 0.0, 0.0, 1.0, np.random.default_rng(0)) is None
    a = batch_mix(x, y, 0.0, 1.0, 1.0, np.random.default_rng(7))
    b = batch_mix(x, y, 0.0, 1.0, 1.0, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and a[3] == b[3]  # seeded: the run is reproducible


def test_mixed_loss_blends_both_labels_and_sam_reuses_the_mixed_batch():
    """The training loss of a mixed batch is lam * CE(y) + (1 - lam) * CE(partner); SAM's second pass gets the
    same mixed inputs as its first (a fresh mix would take the step for another batch's gradient)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    module = ClassifierModule(net, [(list(net.parameters()), 0.1)], optimizer="sgd", num_classes=4,
                              step_rule=SharpnessAware(0.05), batch_transforms=[MixBatches(0.0, 1.0, 1.0, seed=3)])
    module.log = lambda *a, **k: None  # no Trainer here: the loss is what is checked
    inputs = []
    net.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    loss = module.training_step((x, y), 0)
    xm, (y2, lam) = module._last_batch
    assert not torch.equal(inputs[0], x) and torch.equal(inputs[0], xm)
    logits = net(xm)
    want = lam * torch.nn.functional.cross_entropy(logits, y) + (1 - lam) * torch.nn.functional.cross_entropy(logits, y2)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    module.repeat_batch = True
    module.training_step((x, y), 0)
    assert torch.equal(inputs[-1], inputs[0])
    module.repeat_batch = False
    module.training_step((x, y), 1)  # the next batch is mixed anew
    assert not torch.equal(inputs[-1], inputs[0])


def test_mix_through_train_and_its_errors(tiny, tmp_path):
    run = classforge.train(tiny, tmp_path / "m", backbone="cnn_small", strategy="scratch", epochs=2, batch_size=8,
                           patience=1000, mixup=0.2, cutmix=1.0, mix_prob=0.5)
    rows = read_csv(run / "metrics.csv")[1:]
    assert len(rows) == 2 and all(0 <= float(r["train_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    trainer = json.loads((run / "summary.json").read_text())["trainer"]
    assert trainer["mix"] == {"mixup": 0.2, "cutmix": 1.0, "prob": 0.5}
    for kw, flag in (({"cutmix": -1}, "--cutmix"), ({"mixup": "lots"}, "--mixup"), ({"mixup": 0.2, "mix_prob": 0},
                                                                                     "--mix-prob")):
        with pytest.raises(ClassforgeError, match=flag):
            classforge.train(tiny, tmp_path / "b", backbone="cnn_small", strategy="scratch", epochs=1, **kw)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(ClassforgeError, match="--strategy linear"):
        classforge.train(tiny, tmp_path / "l", backbone="cnn_small", strategy="linear", epochs=1, mixup=0.2)
    r = subprocess.run([sys.executable, "-m", "classforge.cli", "train", str(tiny), "--backbone", "cnn_small",
                        "--strategy", "scratch", "--epochs", "1", "--out", str(tmp_path / "c"), "--cutmix", "1",
                        "--mix-prob", "2"], capture_output=True, text=True, timeout=300)
    said = " ".join((r.stderr + r.stdout).split())
    assert r.returncode != 0 and "--mix-prob" in said and "Traceback" not in said


