"""The command line: every command explains itself; errors are messages, not tracebacks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from classforge.cli import app
from classforge.config import TrainConfig
from classforge.models.registry import ClassforgeError

runner = CliRunner()
COMMANDS = ["inspect", "train", "evaluate", "predict", "backbones", "demo", "describe", "tta", "calibrate"]


def test_top_level_help_lists_commands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for c in COMMANDS:
        assert c in out.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    out = runner.invoke(app, [cmd, "--help"])
    assert out.exit_code == 0 and len(out.output) > 200, out.output


def test_train_help_documents_key_options():
    out = runner.invoke(app, ["train", "--help"], terminal_width=200)
    for flag in ("--strategy", "--backbone", "--weights", "--time-budget", "--split-file", "--group-by",
                 "--devices", "--precision", "--lr", "--augment", "--balance", "--resume"):
        assert flag in out.output, flag


def test_backbones_lists_registry():
    out = runner.invoke(app, ["backbones"], terminal_width=200)
    assert out.exit_code == 0
    for name in ("efficientnet_lite0", "efficientnet_lite2", "efficientat_mn04", "cnn_lenet"):
        assert name in out.output


def test_inspect_json_reports_problems(tmp_path, shapes_dir):
    out = runner.invoke(app, ["inspect", str(shapes_dir), "--json"])
    assert out.exit_code == 0, out.output
    js = json.loads(out.output)
    assert js["classes"] == 3 and js["usable"] == 72 and js["task"] == "image"
    assert sum(js["split"]["counts"].values()) == 72


def test_unknown_config_key_suggests_and_yaml_roundtrip(tmp_path):
    with pytest.raises(ClassforgeError, match="Did you mean 'strategy'"):
        TrainConfig().replace(strategyy="linear")
    cfg = TrainConfig(data="x", strategy="two-stage", backbone_args={"widths": [8, 16]})
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nepoch: 3\n")
    with pytest.raises(ClassforgeError, match="epochs"):
        TrainConfig.load(tmp_path / "bad.yaml")


def test_train_errors_are_messages(tmp_path):
    out = runner.invoke(app, ["train", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "Data not found" in out.output
    out = runner.invoke(app, ["train", str(tmp_path), "--strategy", "magic"])
    assert out.exit_code == 2 and "--strategy must be one of" in out.output
