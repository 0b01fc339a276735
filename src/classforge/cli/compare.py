"""`classforge compare`: backbones x strategies on one split, or finished runs, ranked in a leaderboard."""

from __future__ import annotations

from pathlib import Path

import typer

from classforge.cli.console import fail, key_values, split_list
from classforge.cli.console import run_cmd as _run
from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError


def add_commands(app) -> None:

    @app.command("compare")
    def compare_command(
        targets: list[str] = typer.Argument(
            ..., help="DATA (train every combination) or finished RUN_DIRs (table only)"
        ),
        backbones: str | None = typer.Option(
            None,
            "--backbones",
            help="Comma-separated backbones, e.g. efficientnet_lite0,efficientnet_lite2,cnn",
        ),
        strategies: str = typer.Option(
            "linear", "--strategies", help="Comma-separated: linear, two-stage, finetune, scratch"
        ),
        preprocess_options: str | None = typer.Option(
            None,
            "--preprocess-options",
            help="Comma-separated preprocessing variants compared as another axis; combine ops in one variant with '+': none,autocontrast,equalize+gamma=0.8",
        ),
        out: str | None = typer.Option(
            None,
            "--out",
            "-o",
            help="Output folder (default runs/compare-<data>-<time>); re-running into it reuses finished runs of unchanged configuration",
        ),
        config: str | None = typer.Option(None, "--config", help="Base YAML config for every combination"),
        split_file: str | None = typer.Option(
            None, "--split-file", help="Use this split.csv for every combination"
        ),
        split: str | None = typer.Option(
            None, "--split", help="train,val,test fractions when DATA has no split"
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed of the split and training"),
        epochs: int | None = typer.Option(
            None, "--epochs", help="Maximum epochs per combination (default per strategy)"
        ),
        time_budget: str | None = typer.Option(
            None, "--time-budget", help="Training time budget per combination"
        ),
        set_: list[str] | None = typer.Option(
            None, "--set", help="Any config key for every combination: key=value"
        ),
        literal: bool = typer.Option(
            False,
            "--literal-strategies",
            help="Run from-scratch backbones with the strategies as given (e.g. a frozen random CNN under linear) instead of as scratch",
        ),
        no_latency: bool = typer.Option(
            False, "--no-latency", help="Skip measuring operations and CPU latency"
        ),
        track: str | None = typer.Option(None, "--track", help="Also log every run to: mlflow"),
        track_uri: str | None = typer.Option(None, "--track-uri", help="MLflow tracking URI"),
    ):
        """Train backbones x strategies (x preprocessing) on ONE split and rank them: accuracy with its 95%
        interval, macro F1, calibration, training time, parameters, operations and CPU latency per input."""
        from classforge.api import compare, compare_runs

        runs_mode = all((Path(t) / "summary.json").is_file() for t in targets)
        if runs_mode:
            _run(compare_runs, targets, out, latency=not no_latency)
            return
        if len(targets) != 1:
            fail(ClassforgeError("compare takes one DATA folder, or several finished run directories"))
        if not backbones:
            fail(ClassforgeError("--backbones is required when comparing on DATA"))
        base = TrainConfig.load(config) if config else TrainConfig()
        given = {
            "split_file": split_file,
            "split": split,
            "seed": seed,
            "epochs": epochs,
            "time_budget": time_budget,
            "track": track,
            "track_uri": track_uri,
        }
        over = {k: v for k, v in given.items() if v is not None}
        over.update(_run(key_values, set_))
        base = _run(base.replace, **over)
        _run(
            compare,
            targets[0],
            split_list(backbones),
            split_list(strategies),
            split_list(preprocess_options),
            base,
            out,
            literal,
            not no_latency,
        )
