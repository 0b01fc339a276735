"""`classforge search`: hyperparameter search with optuna."""

from __future__ import annotations

import typer

from classforge.cli.console import key_values, split_list
from classforge.cli.console import run_cmd as _run
from classforge.core.config import TrainConfig


def add_commands(app) -> None:

    @app.command("search")
    def search_command(
        data: str = typer.Argument(..., help="Data folder (as for train)"),
        trials: int = typer.Option(
            20,
            "--trials",
            help="Finished trials the study should have (all workers and earlier sessions count)",
        ),
        time_budget: str | None = typer.Option(
            None, "--time-budget", help="Stop starting trials (and stop training) after this long: 30m, 2h"
        ),
        storage: str | None = typer.Option(
            None,
            "--storage",
            help="optuna storage: a database URL (sqlite:///x.db, postgresql://...), a .db path, or a .log journal file (default OUT/study.db)",
        ),
        study_name: str | None = typer.Option(
            None, "--study-name", help="Study name (default classforge-<data>)"
        ),
        workers: int = typer.Option(
            1, "--workers", help="Worker processes sharing the study on this machine"
        ),
        out: str | None = typer.Option(
            None, "--out", "-o", help="Output folder (default runs/search-<data>); re-running with it resumes"
        ),
        backbones: str | None = typer.Option(
            None,
            "--backbones",
            "--backbone",
            "-b",
            help="Backbone(s) to search over, comma-separated (default efficientnet_lite0)",
        ),
        strategies: str | None = typer.Option(
            None,
            "--strategies",
            help="Strategies to search over for pretrained backbones (default linear,two-stage); from-scratch backbones use scratch",
        ),
        metric: str = typer.Option(
            "val_acc",
            "--metric",
            help="Objective on the validation split: val_acc (maximise) | val_loss (minimise)",
        ),
        space: str | None = typer.Option(
            None,
            "--space",
            help="YAML overriding the declared space: name: {type: float|int|categorical, low, high, log, choices, when}",
        ),
        config: str | None = typer.Option(None, "--config", help="Base YAML config for every trial"),
        epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs per trial"),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, the trials and the sampler"),
        set_: list[str] | None = typer.Option(
            None, "--set", help="Any config key for every trial: key=value"
        ),
        heartbeat: int = typer.Option(
            10,
            "--heartbeat",
            help="Seconds between trial heartbeats (RDB storages); a trial silent for 2x this is failed and retried",
        ),
        reproduce: bool = typer.Option(
            False,
            "--reproduce",
            help="Afterwards, train best.yaml again and compare its score with the trial's",
        ),
    ):
        """Hyperparameter search (optuna TPE + pruning) over lr, weight decay, dropout, batch size, augmentation,
        CNN widths/depth and strategy; writes best.yaml (for `train --config`) and a report with the study's plots."""
        from classforge.api import search

        base = TrainConfig.load(config) if config else TrainConfig()
        over: dict = {"seed": seed}
        if epochs is not None:
            over["epochs"] = epochs
        over.update(_run(key_values, set_))
        base = _run(base.replace, **over)
        _run(
            search,
            data,
            trials=trials,
            time_budget=time_budget,
            storage=storage,
            study_name=study_name,
            workers=workers,
            out=out,
            base=base,
            backbones=split_list(backbones) or None,
            strategies=split_list(strategies) or None,
            metric=metric,
            space_file=space,
            seed=seed,
            heartbeat=heartbeat,
            reproduce=reproduce,
        )
