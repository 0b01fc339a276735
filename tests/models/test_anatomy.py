"""Anatomy: a network counted by hand, FlopCounterMode cross-checks, files and the `describe` command."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import typer
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from classforge.cli.describe import add_commands
from classforge.models.anatomy import describe, operations_per_sample
from classforge.models.registry import Classifier, create_backbone
from classforge.models.small_cnn import Add


class Tiny(nn.Module):
    """1x6x6 -> conv(2@3x3) -> BN -> ReLU -> maxpool 2 -> [conv(2@3x3 p1, no bias) + identity] -> ReLU
    -> global avg pool -> flatten -> linear 2->3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn(self.conv1(x))))
        x = self.relu2(self.add(self.conv2(x), x))
        return self.fc(self.flatten(self.gap(x)))


# (name, Fn, input, output, params, adds, mults, max), counted by hand
TINY_ROWS = [
    # conv1: 2x4x4 = 32 outputs, K = 1*3*3 = 9 -> 32*9 mults; 32*(9-1) adds + 32 bias adds; 2*9 + 2 params
    ("conv1", "Conv2d 2@3x3 s1 p0", "1x6x6", "2x4x4", 2 * 9 + 2, 32 * 8 + 32, 32 * 9, 0),
    # BN (eval) folded: 1 mult + 1 add per element; gamma + beta = 2 + 2 params
    ("bn", "BatchNorm2d 2", "2x4x4", "2x4x4", 4, 32, 32, 0),
    # ReLU: 1 comparison per element
    ("relu1", "ReLU", "2x4x4", "2x4x4", 0, 0, 0, 32),
    # max-pool 2x2: 2x2x2 = 8 outputs, 2*2 - 1 = 3 comparisons each
    ("pool", "MaxPool2d 2x2 s2", "2x4x4", "2x2x2", 0, 0, 0, 8 * 3),
    # conv2: 8 outputs, K = 2*3*3 = 18 -> 8*18 mults, 8*17 adds (no bias); 2*2*9 params
    ("conv2", "Conv2d 2@3x3 s1 p1", "2x2x2", "2x2x2", 36, 8 * 17, 8 * 18, 0),
    # residual add: 1 add per element
    ("add", "Add (residual)", "2x2x2 + 2x2x2", "2x2x2", 0, 8, 0, 0),
    ("relu2", "ReLU", "2x2x2", "2x2x2", 0, 0, 0, 8),
    # global avg pool of 2x2: 2 outputs, (4 - 1) adds + 1 mult (by 1/4) each
    ("gap", "AdaptiveAvgPool2d ->1", "2x2x2", "2x1x1", 0, 2 * 3, 2 * 1, 0),
    ("flatten", "Flatten", "2x1x1", "2", 0, 0, 0, 0),
    # linear 2->3: 3 outputs, K = 2 -> 3*2 mults, 3*(2-1) adds + 3 bias adds; 3*2 + 3 params
    ("fc", "Linear 2->3", "2", "3", 9, 3 * 1 + 3, 3 * 2, 0),
]


def test_hand_counted_network():
    a = describe(Tiny(), (1, 6, 6))
    got = [(r.name, r.fn, " + ".join("x".join(map(str, s)) for s in r.input_shape),
            "x".join(map(str, r.output_shape)), r.params, r.adds, r.mults, r.max) for r in a.rows]
    assert got == TINY_ROWS
    assert [r.n for r in a.rows] == list(range(1, 11))
    assert all(r.other == 0 for r in a.rows)
    assert a.rows[0].weight_shape == [2, 1, 3, 3] and a.rows[0].bias_shape == [2]
    assert a.rows[4].bias_shape is None
    assert a.totals == {
        "params": 20 + 4 + 36 + 9,
        "adds": 288 + 32 + 136 + 8 + 6 + 6,
        "mults": 288 + 32 + 144 + 2 + 6,
        "max": 32 + 24 + 8,
        "other": 0,
        "macs": 288 + 144 + 6,  # conv1 + conv2 + fc
        "ops": (288 + 32 + 136 + 8 + 6 + 6) + (288 + 32 + 144 + 2 + 6) + (32 + 24 + 8),
    }
    assert a.reference_macs == a.totals["macs"] and not a.notes


def test_hand_counted_pooling_and_softmax():
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3, bias=False), nn.Sigmoid(), nn.Softmax(-1))
    rows = describe(model, (1, 4, 4)).rows
    ops = [(r.fn, r.adds, r.mults, r.max, r.other) for r in rows]
    assert ops == [
        ("AvgPool2d 2x2 s2", 4 * 3, 4, 0, 0),  # 4 outputs: 3 adds + 1 mult (by 1/4)
        ("Flatten", 0, 0, 0, 0),
        ("Linear 4->3", 3 * 3, 3 * 4, 0, 0),  # no bias: 3*(4-1) adds
        ("Sigmoid", 0, 0, 0, 3),
        ("Softmax dim=-1", 2, 0, 0, 2 * 3),  # sum of 3 = 2 adds; exp + division per element
    ]


def test_lenet_totals():
    model = Classifier(create_backbone("cnn_lenet", pretrained=False), 10)
    t = operations_per_sample(model, (3, 32, 32))
    # conv1 6x28x28 outputs x 75, conv2 16x10x10 x 150, fc 120x400, 84x120, head 10x84
    macs = 6 * 28 * 28 * 75 + 16 * 10 * 10 * 150 + 120 * 400 + 84 * 120 + 10 * 84
    # ReLU after each conv/fc + pools with 3 comparisons per output
    maxes = 6 * 28 * 28 + 6 * 14 * 14 * 3 + 16 * 10 * 10 + 16 * 5 * 5 * 3 + 120 + 84
    assert t == {"params": 62_006, "adds": macs, "mults": macs, "max": maxes, "other": 0, "macs": macs,
                 "ops": 2 * macs + maxes}
    assert macs == 651_720


@pytest.mark.parametrize("name", ["cnn_lenet", "cnn_resnet20", "capsnet"])
def test_macs_match_flop_counter(name):
    model = Classifier(create_backbone(name, pretrained=False), 10).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert describe(model, (3, 32, 32)).totals["macs"] * 2 * 2 == counter.get_total_flops()  # 2 FLOPs/MAC, batch 2


def test_resnet_rows_show_residual_adds_and_restore_training_mode():
    model = Classifier(create_backbone("cnn_resnet20", pretrained=False), 10)
    model.train()
    a = describe(model, (3, 32, 32))
    assert model.training
    adds = [r for r in a.rows if r.fn == "Add (residual)"]
    assert len(adds) == 9
    assert adds[0].adds == 16 * 32 * 32 and adds[-1].adds == 64 * 8 * 8
    shortcuts = [r for r in a.rows if r.fn.startswith("Shortcut")]
    assert [r.output_shape for r in shortcuts] == [[32, 16, 16], [64, 8, 8]]
    assert a.totals["params"] == 269_722 == sum(r.params for r in a.rows)


def test_csv_and_json(tmp_path):
    a = describe(Tiny(), (1, 6, 6))
    with a.to_csv(tmp_path / "a.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 11 and lines[0]["fn"] == "Conv2d 2@3x3 s1 p0"
    assert lines[-1]["name"] == "total" and int(lines[-1]["mults"]) == a.totals["mults"]
    d = json.loads(a.to_json(tmp_path / "a.json").read_text())
    assert d["totals"] == a.totals and d["input_shape"] == [1, 6, 6] and d["rows"][5]["input_shape"] == "2x2x2 + 2x2x2"


def _app() -> typer.Typer:
    app = typer.Typer()
    add_commands(app)

    @app.command()
    def other() -> None:  # a second command so `describe` stays a subcommand
        pass

    return app


def test_describe_command(tmp_path):
    runner = CliRunner()
    r = runner.invoke(_app(), ["describe", "cnn_lenet", "--input", "3x32x32", "--csv", str(tmp_path / "l.csv"),
                               "--json", str(tmp_path / "l.json")])
    assert r.exit_code == 0, r.output
    assert "62,006" in r.output and "Conv2d 6@5x5 s1 p0" in r.output and "651,720" in r.output
    assert json.loads((tmp_path / "l.json").read_text())["totals"]["params"] == 62_006
    r = runner.invoke(_app(), ["describe", "cnn_lenet", "--num-classes", "3", "-a", "widths=[4,8]"])
    assert r.exit_code == 0 and "Conv2d 4@5x5" in r.output
    r = runner.invoke(_app(), ["describe", "cnn_lenat"])
    assert r.exit_code == 1 and "cnn_lenet" in r.output  # "did you mean"
    r = runner.invoke(_app(), ["describe", "--help"])
    assert "MODEL_OR_RUN_DIR" in r.output and "--num-classes" in r.output


def test_describe_run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("backbone: cnn_lenet\nstrategy: scratch\n")
    (tmp_path / "labels.json").write_text(json.dumps(["ant", "bee", "wasp"]))
    model = Classifier(create_backbone("cnn_lenet", pretrained=False), 3)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    r = CliRunner().invoke(_app(), ["describe", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"{62_006 - 850 + 84 * 3 + 3:,}" in r.output and "3 classes" in r.output  # head for 3 classes
    (tmp_path / "labels.json").write_text(json.dumps(["ant", "bee"]))  # weights no longer match
    r = CliRunner().invoke(_app(), ["describe", str(tmp_path)])
    assert r.exit_code == 1 and "does not match" in r.output


def test_describe_run_dir_with_model_json(tmp_path):
    # model.json (written by training) carries the exact backbone kwargs, e.g. fitted widths
    kwargs = {"widths": [8, 16, 32]}
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "cnn_resnet20", "backbone_kwargs": kwargs,
                                                     "num_classes": 4}))
    model = Classifier(create_backbone("cnn_resnet20", pretrained=False, **kwargs), 4)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    r = CliRunner().invoke(_app(), ["describe", str(tmp_path), "--max-rows", "5"])
    assert r.exit_code == 0, r.output
    assert f"{sum(p.numel() for p in model.parameters()):,}" in r.output and "4 classes" in r.output
