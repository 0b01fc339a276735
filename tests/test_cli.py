"""The command line: every command explains itself; errors are messages, not tracebacks."""

from __future__ import annotations

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


def test_every_train_option_is_a_config_key_and_every_key_can_be_set():
    import dataclasses
    import inspect

    from classforge.cli.train import CONFIG_ONLY, OPTION_KEYS, train_options

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = set(inspect.signature(train_options).parameters)
    keys = {OPTION_KEYS.get(o, o) for o in options} - {None}
    assert keys <= fields, f"options without a config key: {sorted(keys - fields)}"
    missing = fields - keys - set(CONFIG_ONLY)
    assert not missing, f"config keys with no option (add one, or list them in CONFIG_ONLY): {sorted(missing)}"
    assert set(CONFIG_ONLY) <= fields


def test_version():
    from importlib.metadata import version

    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"classforge {version('classforge')}"
