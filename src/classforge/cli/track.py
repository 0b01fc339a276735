"""`classforge track`: log finished runs to MLflow."""

from __future__ import annotations

import typer

from classforge.cli.console import console, run_cmd


def add_commands(app) -> None:
    @app.command("track")
    def track_command(
        run_dirs: list[str] = typer.Argument(..., help="Finished run directories"),
        uri: str | None = typer.Option(
            None,
            "--uri",
            "--track-uri",
            help="MLflow tracking URI (default sqlite:///mlflow.db, artifacts in ./mlruns)",
        ),
        experiment: str | None = typer.Option(
            None, "--experiment", help="Experiment name (default classforge)"
        ),
    ):
        """Log finished runs to MLflow (params, per-epoch metrics, figures, model; model.onnx after export).
        A run logged before is updated in place (its id is in RUN/tracking.json)."""
        from classforge.api import track

        for r in run_dirs:
            run_id = run_cmd(track, r, uri, experiment)
            console.print(f"{r}: MLflow run {run_id}")
