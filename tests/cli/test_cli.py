"""The command line: every command explains itself; errors are messages, not tracebacks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from classforge.cli import app
from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError

runner = CliRunner()
COMMANDS = ["inspect", "train", "evaluate", "predict", "backbones", "demo", "describe", "calibrate", "export", "serve"]


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


def _panel_options(help_text: str, title: str) -> list[str]:
    """The option names in one rich help panel of `--help` output."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"╭─ {title} "))
    names = []
    for line in lines[start + 1:]:
        if line.startswith("╰"):
            break
        cell = line.strip("│ ").split()
        if cell and cell[0].startswith("--"):
            names.append(cell[0])
    return names


def test_train_help_opens_with_at_most_15_everyday_options_and_groups_the_rest():
    out = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert out.exit_code == 0
    everyday = [o for o in _panel_options(out.output, "Options") if o != "--help"]
    assert 5 <= len(everyday) <= 15, everyday
    assert {"--out", "--backbone", "--strategy", "--epochs", "--time-budget"} <= set(everyday)
    for panel in ("Data", "Model", "Optimisation", "Augmentation", "Hardware", "Tracking", "Advanced"):
        assert _panel_options(out.output, panel), panel
    assert "--cutout" in _panel_options(out.output, "Augmentation")
    assert "(default: 32)" in out.output  # defaults read from TrainConfig are shown, not eaten as markup


def test_train_options_are_the_config_fields():
    """The options are generated from TrainConfig: each field with flags is an option showing the field's help in
    its group's panel; every field has a group and a line of help; the rest are --set/--config keys."""
    import dataclasses

    from classforge.cli.train import EVERYDAY, PANELS

    out = runner.invoke(app, ["train", "--help"], terminal_width=250)
    text = out.output
    fields = dataclasses.fields(TrainConfig)
    for f in fields:
        assert f.metadata["group"] in PANELS and len(f.metadata["help"]) >= 8, f.name
        for flag in f.metadata["flags"]:
            assert flag in text, flag
        if f.metadata["flags"] and f.name not in EVERYDAY and f.metadata["flags"][0].startswith("--"):
            assert f.metadata["flags"][0] in _panel_options(text, PANELS[f.metadata["group"]]), f.name
    assert set(EVERYDAY) <= {f.name for f in fields}
    assert "Registered name (see `classforge backbones`)" in text  # a field's help, as written in config.py


def test_build_config_from_flags_and_set(tmp_path):
    from classforge.cli.train import build_config

    cfg = build_config({"data": "d", "config": None, "batch_size": 8, "pretrained": True, "resplit": True,
                        "backbone_args": ["widths=[8,16]"], "clip_seconds": "1.5", "set_": ["momentum=0.8"]})
    assert (cfg.batch_size, cfg.pretrained, cfg.resplit, cfg.clip_seconds, cfg.momentum) == (8, False, True, 1.5, 0.8)
    assert cfg.backbone_args == {"widths": [8, 16]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 4  # a built config is never changed in place


def test_version():
    from importlib.metadata import version

    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"classforge {version('classforge')}"


@pytest.mark.parametrize("cmd", ["train", "compare", "search"])
def test_set_without_a_value_is_a_clear_error_everywhere(cmd, tmp_path, shapes_dir):
    extra = ["--backbones", "cnn_small"] if cmd == "compare" else []
    out = runner.invoke(app, [cmd, str(shapes_dir), *extra, "--set", "epochs", "--out", str(tmp_path / "o")],
                        terminal_width=200)
    assert out.exit_code == 2 and "--set expects key=value, got 'epochs'" in out.output, out.output
    assert not (tmp_path / "o").exists()


def test_command_help_paragraphs_wrap_to_the_terminal_not_to_the_source():
    """Docstrings wrapped at the source's width would leave ragged half-lines in an 80-column terminal."""
    from classforge.cli import one_line_paragraphs

    doc = """First line.

        A paragraph wrapped
        at the source's width.

        Steps:
        - one
        - two
          indented"""
    assert one_line_paragraphs(doc) == ("First line.\n\nA paragraph wrapped at the source's width.\n\n"
                                        "Steps:\n- one\n- two\n  indented")
    out = runner.invoke(app, ["export", "--help"], terminal_width=80).output
    assert "(random tensors only" in out  # one paragraph, wrapped by rich at 80 columns
    lines = [line.rstrip() for line in out.split("╭")[0].splitlines()]
    for line, after in zip(lines, lines[1:]):
        if line and after:  # a line that its paragraph continues after is filled
            assert len(line) > 40, line
